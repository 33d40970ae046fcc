"""``kunserve profile`` (measured steps -> a fitted, saved cost model the engine picks up) and
the pipeline bench's ideal-pipeline bubble, at a tiny size."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from kunserve.bench.pipeline import ideal_bubble
from kunserve.profile import ProfiledBatch, measure, plan_batches
from kunserve.worker.cost_model import FILE_NAME, CostModel
from tests.test_cli import kunserve


def test_planned_batches_fit_the_engine_limits():
    batches = plan_batches(random.Random(0), max_tokens=256, max_seqs=16, max_context=600,
                           num_blocks=200, block_size=16, num_mixed=30)
    kinds = {b.kind for b in batches}
    assert kinds == {"prefill", "decode", "mixed"}
    for b in batches:
        assert 1 <= b.num_tokens <= 256 and len(b.chunks) <= 16 and b.kv_blocks(16) <= 200
        assert all(p >= 0 and n >= 1 and p + n <= 600 for p, n in b.chunks)
    assert {p for b in batches if b.kind == "prefill" for p, _ in b.chunks} >= {0, 128, 512}


def test_cheap_batches_run_more_times_and_the_fastest_run_counts(monkeypatch):
    """Every batch runs ``repeats`` times, cheap ones again until their runs add up to
    ``min_seconds`` (at most ``max_repeats``); the KV blocks are all given back."""
    from types import SimpleNamespace

    import kunserve.profile
    from kunserve.worker.block_manager import BlockManager

    now = [0.0]
    slow_first = {}  # each batch's first run is twice as slow

    def execute(out):
        tokens = sum(len(c.token_ids) for c in out.chunks)
        now[0] += 0.01 * tokens * (1 if slow_first.setdefault(tokens, False) else 2)
        slow_first[tokens] = True

    monkeypatch.setattr(kunserve.profile, "step_clock", lambda: lambda: now[0])
    engine = SimpleNamespace(model_config=SimpleNamespace(vocab_size=50),
                             block_manager=BlockManager(64, 16),
                             runner=SimpleNamespace(execute=execute))
    cheap, dear, tiny = (ProfiledBatch("prefill", [(0, 8)]),
                         ProfiledBatch("mixed", [(100, 100), (40, 1)]),
                         ProfiledBatch("decode", [(3, 1)]))
    measure(engine, [cheap, dear, tiny], 2, random.Random(0), min_seconds=0.5, max_repeats=10)
    assert len(dear.runs) == 2 and dear.seconds == pytest.approx(1.01)
    assert len(cheap.runs) == 6 and sum(cheap.runs) >= 0.5 > sum(cheap.runs[:-1])
    assert cheap.seconds == pytest.approx(0.08) and cheap.runs[0] == pytest.approx(0.16)
    assert len(tiny.runs) == 10 and tiny.seconds == pytest.approx(0.01)
    assert engine.block_manager.num_free == 64


def test_profile_writes_a_model_the_engine_uses(llama_dir, tmp_path):
    from kunserve.worker.engine import EngineConfig, LLMEngine

    model_dir = shutil.copytree(llama_dir, tmp_path / "model")
    report = tmp_path / "report.json"
    out = kunserve("profile", "--model", str(model_dir), "--repeats", "1", "--mixed-batches",
                   "8", "--max-num-batched-tokens", "128", "--json", str(report))
    assert out.returncode == 0, out.stderr
    assert "held-out error" in out.stdout and f"wrote {model_dir / FILE_NAME}" in out.stdout
    saved = CostModel.find(model_dir)
    assert saved is not None and all(c >= 0 for c in saved.coefficients)
    assert saved.info["threads"] == 1 and saved.info["held_out_batches"] > 0
    assert 0 <= saved.info["held_out_mean_error"] <= saved.info["held_out_max_error"]
    measured = json.loads(report.read_text())
    assert [row["kind"] for row in measured["rows"]] == ["prefill", "decode", "mixed", "all",
                                                          "all, four terms"]
    assert all(b["seconds"] == min(b["runs"]) > 0 for b in measured["batches"])
    assert LLMEngine(EngineConfig(model=str(model_dir))).cost_model == saved


def test_the_ideal_pipeline_bubble():
    assert ideal_bubble([], 2, 2) == 0.0
    # one micro-batch in flight: every other stage waits for it
    assert ideal_bubble([1.0] * 10, 2, 1) == pytest.approx(0.5)
    assert ideal_bubble([1.0] * 10, 4, 1) == pytest.approx(0.75)
    # equal micro-batches, one per stage: only filling and draining the pipeline idles
    assert ideal_bubble([1.0] * 100, 2, 2) == pytest.approx(1 - 100 / 101)
    # dear and cheap in turn: each pair takes two dear ones' time
    alternating = ideal_bubble([3.0, 1.0] * 100, 2, 2)
    assert alternating == pytest.approx((3 - 1) / (2 * 3), abs=0.01)
