"""Fused CPU paged decode attention.

Decode attention of ``D`` single-token queries over the paged, block-major KV cache, computed
by a C++ kernel (``csrc/paged_decode.cpp``) that reads each key and value row once, straight
from the cache blocks named by the block tables: no gathered copy of K/V is made. Work is
split over (sequence, span of kv heads) on torch's intra-op thread pool, so it follows
``torch.set_num_threads``; results do not depend on the thread count. Scores, softmax and
accumulation are float32 for every input dtype (float32, bfloat16, float16); the output has the
dtype of ``q``. In float32 it agrees with SDPA on the gathered K/V to ~1e-6.

The kernel is compiled with ``torch.utils.cpp_extension.load`` on first use and cached in
torch's extension directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``),
so later processes only load it. If it cannot be built or loaded, or
``KUNSERVE_DISABLE_CPP_KERNELS=1`` is set, :func:`available` is False, one warning is logged
(none for the flag), and :func:`paged_decode_attention` runs the gather + SDPA path instead.

Where its job ends: it only reads the cache. Writing the step's new keys/values into their
slots, building block tables and context lengths, and prefill attention stay with the caller
(``attention.py``). Contexts must be non-empty (the decoded token itself is in the cache).
Block-table entries past a context are never read by the kernel, but the fallback gathers
them, so they must still name real blocks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DISABLE_ENV", "available", "gather_sdpa", "paged_decode_attention"]

logger = logging.getLogger(__name__)

DISABLE_ENV = "KUNSERVE_DISABLE_CPP_KERNELS"
_SOURCE = Path(__file__).resolve().parent / "csrc" / "paged_decode.cpp"
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# -march=native: the build is tuned to this CPU, so the extension name carries a digest of the
# CPU's feature flags; a cache directory shared by different machines then holds one build per
# CPU type instead of an illegal-instruction crash.
# The three math flags (a subset of -ffast-math that keeps inf/NaN semantics) let gcc vectorise
# the dot-product and softmax-sum reductions by reassociating them.
_CFLAGS = ["-O3", "-march=native", "-fopenmp",
           "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]

_lock = threading.Lock()
_op: Callable[..., Tensor] | None = None
_load_attempted = False


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip() not in ("", "0")


def _cpu_tag() -> str:
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _load() -> Callable[..., Tensor] | None:
    global _op, _load_attempted
    if _load_attempted:  # the per-call path: no lock once the outcome is known
        return _op
    with _lock:
        if _load_attempted:
            return _op
        _load_attempted = True
        start = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load

            # is_python_module=False: the library registers torch.ops.kunserve.paged_decode
            # with the dispatcher when loaded (no pybind, a much shorter build)
            load(
                name=f"kunserve_paged_decode_{_cpu_tag()}",
                sources=[str(_SOURCE)],
                extra_cflags=_CFLAGS,
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
            op = torch.ops.kunserve.paged_decode
        except Exception as exc:  # no compiler, build error, missing source: degrade, never crash
            lines = str(exc).strip().splitlines()
            logger.warning("fused paged decode kernel unavailable, using gather + SDPA: %s: %s",
                           type(exc).__name__, lines[-1] if lines else "")
            logger.debug("paged decode kernel build output:\n%s", exc)
            return None
        _op = op
        logger.info("paged decode kernel ready in %.2f s", time.perf_counter() - start)
        return _op


def available() -> bool:
    """True when the compiled kernel is loaded (building it on first call) and not disabled."""
    return not _disabled() and _load() is not None


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, scale: float) -> Tensor:
    """Attention of one query token per sequence over its paged context; returns (D, heads, hd).

    ``q``: (D, heads, hd); ``k_cache``, ``v_cache``: (num_blocks, block_size, kv_heads, hd)
    views of one layer (any dim-0 stride; each block contiguous); ``block_tables``:
    (D, max_blocks) int64; ``context_lens``: (D,) int64, keys ``0 .. len-1`` visible.
    Query head ``h`` attends with kv head ``h // (heads // kv_heads)``.
    """
    if (not available() or q.dtype not in _SUPPORTED_DTYPES or q.device.type != "cpu"
            or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype):
        return gather_sdpa(q, k_cache, v_cache, block_tables, context_lens, scale)
    assert _op is not None
    return _op(q.contiguous(), k_cache, v_cache, block_tables.long().contiguous(),
               context_lens.long().contiguous(), float(scale))


def gather_sdpa(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                context_lens: Tensor, scale: float) -> Tensor:
    """The unfused path (gather each sequence's blocks, masked SDPA); same contract."""
    num, heads, hd = q.shape
    kv_heads = k_cache.shape[2]
    keys = k_cache[block_tables].view(num, -1, kv_heads, hd).transpose(1, 2)  # (D, kvh, T, hd)
    values = v_cache[block_tables].view(num, -1, kv_heads, hd).transpose(1, 2)
    positions = torch.arange(keys.shape[2], device=q.device)
    hidden = positions >= context_lens.to(q.device).unsqueeze(1)  # (D, T)
    bias = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device)
    bias.masked_fill_(hidden, float("-inf"))
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=bias[:, None, None],
                                         scale=scale, enable_gqa=True)  # (D, h, 1, hd)
    return out.squeeze(2)
