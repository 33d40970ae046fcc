"""Fused CPU paged decode attention: equality with SDPA on gathered K/V, and the fallback."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from kunserve.worker.model import paged_decode as pd

BLOCK = 16
# 1 token, block edges (15/16/17, 32), long, and odd lengths in between
LENS = [1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 77, 300, 5]


@pytest.fixture(scope="module")
def kernel() -> None:
    if pd._disabled():
        pytest.skip(f"{pd.DISABLE_ENV} is set")
    if not pd.available():
        pytest.skip("paged decode C++ kernel could not be built (see the logged warning)")


def make_case(heads: int, kv_heads: int, hd: int, lens: list[int], dtype: torch.dtype = torch.float32,
              seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random q and a 3-layer block-major cache; returns q, layer-1 K/V views, tables, lens."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // BLOCK) for n in lens) + 1  # one spare column of padding
    num_blocks = len(lens) * max_blocks + 7
    storage = torch.randn(num_blocks, 3, 2, BLOCK, kv_heads, hd, generator=g).to(dtype)
    k_cache, v_cache = storage[:, 1, 0], storage[:, 1, 1]  # strided: dim-0 stride covers 3 layers
    perm = torch.randperm(num_blocks, generator=g)  # distinct blocks in random order
    tables = perm[: len(lens) * max_blocks].view(len(lens), max_blocks).contiguous()
    context = torch.tensor(lens, dtype=torch.int64)
    for d, n in enumerate(lens):  # slots past the context hold NaN: they must never be read
        last, used = divmod(n, BLOCK)
        if used:
            k_cache[tables[d, last], used:] = float("nan")
            v_cache[tables[d, last], used:] = float("nan")
    q = torch.randn(len(lens), heads, hd, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, context


def reference(q, k_cache, v_cache, tables, lens, scale) -> torch.Tensor:
    """SDPA per sequence on its gathered, truncated K/V (float32, GQA)."""
    kv_heads, hd = k_cache.shape[2], k_cache.shape[3]
    outs = []
    for d, n in enumerate(lens.tolist()):
        keys = k_cache[tables[d]].reshape(-1, kv_heads, hd)[:n].transpose(0, 1).float()
        values = v_cache[tables[d]].reshape(-1, kv_heads, hd)[:n].transpose(0, 1).float()
        out = F.scaled_dot_product_attention(q[d].float().unsqueeze(1), keys, values, scale=scale,
                                             enable_gqa=True)  # (h, 1, hd)
        outs.append(out.squeeze(1))
    return torch.stack(outs)


@pytest.mark.parametrize("heads,kv_heads,hd", [(8, 4, 64), (4, 4, 32), (16, 2, 128), (6, 1, 64)],
                         ids=["gqa-64", "mha-32", "gqa-128", "mqa-64"])
def test_float32_matches_sdpa(kernel, heads: int, kv_heads: int, hd: int) -> None:
    q, k_cache, v_cache, tables, lens = make_case(heads, kv_heads, hd, LENS, seed=hd + heads)
    scale = hd**-0.5
    out = pd.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, reference(q, k_cache, v_cache, tables, lens, scale),
                               atol=2e-6, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_dtypes_accumulate_in_float32(kernel, dtype: torch.dtype, atol: float) -> None:
    q, k_cache, v_cache, tables, lens = make_case(8, 2, 64, LENS, dtype=dtype, seed=3)
    out = pd.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    assert out.dtype == dtype
    # the reference sees the same rounded inputs; only the output rounding differs
    torch.testing.assert_close(out.float(), reference(q, k_cache, v_cache, tables, lens, 0.125),
                               atol=atol, rtol=0)


def test_random_batches_and_thread_counts_agree(kernel) -> None:
    gen = torch.Generator().manual_seed(11)
    # 5 sequences x 4 kv heads: 1, 2 and 3 threads give units of 4, 2 and 1 kv heads
    lens = torch.randint(1, 400, (5,), generator=gen).tolist()
    q, k_cache, v_cache, tables, context = make_case(8, 4, 64, lens, seed=5)
    ref = reference(q, k_cache, v_cache, tables, context, 0.125)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):  # the work split changes, the results must not, to the bit
            torch.set_num_threads(n)
            results.append(pd.paged_decode_attention(q, k_cache, v_cache, tables, context, 0.125))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(results[0], ref, atol=2e-6, rtol=0)
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_single_sequence_and_batched_fallback_agree(kernel) -> None:
    q, k_cache, v_cache, tables, lens = make_case(8, 4, 64, [1], seed=7)
    out = pd.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    torch.testing.assert_close(out, v_cache[tables[0, 0], 0].repeat_interleave(2, dim=0)[None],
                               atol=1e-6, rtol=0)  # one visible key: the output is its value
    q, k_cache, v_cache, tables, lens = make_case(8, 4, 64, [3, 40, 16], seed=8)
    k_cache.nan_to_num_(0.0)  # the batched gather path multiplies masked slots by zero weights
    v_cache.nan_to_num_(0.0)
    torch.testing.assert_close(pd.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.2),
                               pd.gather_sdpa(q, k_cache, v_cache, tables, lens, 0.2),
                               atol=2e-6, rtol=0)


def test_bad_inputs_raise_instead_of_reading_out_of_bounds(kernel) -> None:
    q, k_cache, v_cache, tables, lens = make_case(8, 4, 64, [20, 3], seed=9)
    bad = tables.clone()
    bad[0, 1] = k_cache.shape[0]  # second block of a 20-token context: read, so checked
    with pytest.raises(RuntimeError, match="not a block of the cache"):
        pd.paged_decode_attention(q, k_cache, v_cache, bad, lens, 0.125)
    with pytest.raises(RuntimeError, match="context_lens"):
        pd.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor([0, 3]), 0.125)
    padded = tables.clone()
    padded[1, 1:] = -1  # entries past a context are never read, whatever they hold
    pd.paged_decode_attention(q, k_cache, v_cache, padded, lens, 0.125)


def test_disable_flag_forces_the_gather_path(monkeypatch) -> None:
    def no_build() -> None:
        raise AssertionError("the kernel must not be built or loaded when disabled")

    monkeypatch.setenv(pd.DISABLE_ENV, "1")
    monkeypatch.setattr(pd, "_load", no_build)
    assert not pd.available()
    q, k_cache, v_cache, tables, lens = make_case(8, 4, 32, [9, 33], seed=10)
    k_cache.nan_to_num_(0.0)
    v_cache.nan_to_num_(0.0)
    out = pd.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25)
    torch.testing.assert_close(out, reference(q, k_cache, v_cache, tables, lens, 0.25),
                               atol=2e-6, rtol=0)


def test_build_failure_warns_once_and_falls_back(monkeypatch, caplog, tmp_path) -> None:
    monkeypatch.delenv(pd.DISABLE_ENV, raising=False)
    monkeypatch.setattr(pd, "_SOURCE", tmp_path / "missing.cpp")
    monkeypatch.setattr(pd, "_op", None)
    monkeypatch.setattr(pd, "_load_attempted", False)
    q, k_cache, v_cache, tables, lens = make_case(4, 2, 32, [5], seed=12)
    k_cache.nan_to_num_(0.0)
    v_cache.nan_to_num_(0.0)
    with caplog.at_level(logging.WARNING, logger=pd.__name__):
        assert not pd.available()
        assert not pd.available()
        out = pd.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.5)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    torch.testing.assert_close(out, reference(q, k_cache, v_cache, tables, lens, 0.5),
                               atol=2e-6, rtol=0)
