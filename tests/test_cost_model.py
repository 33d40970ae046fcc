"""The micro-batch cost model: features, the least-squares fit (recovers known coefficients,
keeps them non-negative), the lookahead split's bound with every term, persistence next to the
checkpoint (older four-term files too), and the engine picking it up."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kunserve.worker.cost_model import (
    FILE_NAME,
    TERMS,
    CostModel,
    features,
    fit,
    relative_errors,
)
from kunserve.worker.lookahead import Work, cost, split

TRUE = CostModel(prefix_attention=2e-9, self_attention=1.5e-9, linear=4e-6, constant=3e-3,
                 decode_attention=8e-9, prefix_gather=5e-8)
SCALES = (1e-8, 1e-8, 1e-5, 1e-2, 1e-8, 1e-7)  # a coefficient's typical size, per term


def random_batches(count: int, seed: int = 0) -> list[list[tuple[int, int]]]:
    """Mixed micro-batches: a few prefill chunks (any prefix) and some decodes."""
    rng = random.Random(seed)
    batches = []
    for _ in range(count):
        chunks = [(rng.choice([0, 0, 64, 512, 1500]), rng.randint(2, 512))
                  for _ in range(rng.randint(0, 3))]
        chunks += [(rng.randint(1, 2000), 1) for _ in range(rng.randint(0, 40))]
        batches.append(chunks or [(0, 8)])
    return batches


def test_features_sum_over_chunks_with_one_constant():
    # decodes (n = 1) read their prefix in the decode kernel; prefill chunks after a prefix
    # gather it once
    assert features([(10, 4), (0, 6), (99, 1), (7, 1)]) == [
        10 * 4 + 99 + 7, 16 + 36 + 1 + 1, 12, 1.0, 99 + 7, 10]
    chunks = [(10, 4), (0, 6), (99, 1)]
    assert TRUE.predict(chunks) == pytest.approx(
        3e-3 + sum(TRUE.chunk_cost(p, n) for p, n in chunks))
    assert TRUE.chunk_cost(99, 1) == pytest.approx(99 * (2e-9 + 8e-9) + 1.5e-9 + 4e-6)
    assert TRUE.chunk_cost(10, 4) == pytest.approx(4 * (10 * 2e-9 + 4 * 1.5e-9 + 4e-6) + 10 * 5e-8)
    assert TRUE.chunk_cost(500, 0) == 0.0


def test_fit_recovers_known_coefficients_from_exact_times():
    batches = random_batches(40)
    model = fit(batches, [TRUE.predict(b) for b in batches])
    assert model.coefficients == pytest.approx(TRUE.coefficients, rel=1e-6)
    assert max(relative_errors(model, batches, [TRUE.predict(b) for b in batches])) < 1e-9


def test_fit_with_measurement_noise_stays_close_and_predicts_held_out_batches():
    rng = np.random.default_rng(1)
    batches = random_batches(120, seed=1)
    times = [TRUE.predict(b) * (1 + 0.02 * rng.standard_normal()) for b in batches]
    model = fit(batches[:90], times[:90])
    # the terms that carry most of the time come out within a few percent
    assert model.linear == pytest.approx(TRUE.linear, rel=0.1)
    assert model.constant == pytest.approx(TRUE.constant, rel=0.1)
    errors = relative_errors(model, batches[90:], [TRUE.predict(b) for b in batches[90:]])
    assert np.mean(errors) < 0.02


def test_coefficients_stay_non_negative():
    """Times that only grow with tokens, noisily: no term may come out negative (a cut would
    then think a longer chunk is cheaper)."""
    rng = np.random.default_rng(2)
    batches = [[(0, n)] for n in range(1, 60)]
    times = [1e-4 * n * (1 + 0.05 * rng.standard_normal()) for b in batches for _, n in b]
    model = fit(batches, times)
    assert all(c >= 0 for c in model.coefficients)
    assert model.linear == pytest.approx(1e-4, rel=0.1)


def test_the_fit_is_the_non_negative_optimum():
    """Times a negative term would fit better: that term is 0 and the rest are refitted, and
    no non-negative model does better on the fitted batches."""
    rng = np.random.default_rng(3)
    batches = random_batches(60, seed=3)
    decode_free = CostModel(*TRUE.coefficients[:4], decode_attention=-1e-9)
    times = [max(decode_free.predict(b), 1e-4) for b in batches]
    model = fit(batches, times)
    assert model.decode_attention == 0 and all(c >= 0 for c in model.coefficients)

    def loss(m: CostModel) -> float:
        return float(np.sum(np.square(relative_errors(m, batches, times))))

    for _ in range(200):  # nearby non-negative models are no better
        other = np.maximum(0.0, np.array(model.coefficients) * (1 + 0.05 * rng.standard_normal(6))
                           + 1e-3 * np.array(SCALES) * np.abs(rng.standard_normal(6)))
        assert loss(CostModel(*other)) >= loss(model) * (1 - 1e-9)


@settings(max_examples=40, deadline=None)
@given(coefficients=st.tuples(*[st.floats(0.0, 1.0)] * 3, st.floats(0.01, 1.0),
                              *[st.floats(0.0, 1.0)] * 2),
       seed=st.integers(0, 1000))
def test_fit_recovers_any_non_negative_coefficients(coefficients, seed):
    """(Some constant, so that every time is positive.)"""
    truth = CostModel(*(c * s for c, s in zip(coefficients, SCALES, strict=True)))
    batches = random_batches(30, seed)
    model = fit(batches, [truth.predict(b) for b in batches])
    for got, want, scale in zip(model.coefficients, truth.coefficients, SCALES, strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6 * scale)


@settings(max_examples=150, deadline=None)
@given(work=st.lists(st.builds(Work, st.sampled_from("abcdefgh"), st.integers(0, 3000),
                               st.integers(1, 600)),
                     min_size=1, max_size=10, unique_by=lambda w: w.request_id),
       coefficients=st.tuples(*[st.floats(0.0, 1.0)] * len(TERMS)))
def test_lookahead_halves_stay_within_the_bound_with_every_term(work, coefficients):
    """The per-prefix terms jump when a cut turns a chunk into a decode or a prefill chunk;
    ``token_cost_bound`` covers the jumps, so the split's halves still cost the same within
    it."""
    model = CostModel(*(c * s for c, s in zip(coefficients, SCALES, strict=True)))
    pieces = split(work, 2, model)
    if len(pieces) == 2:
        bound = model.token_cost_bound((w.prefix, w.num_tokens) for w in work)
        assert abs(cost(pieces[0], model) - cost(pieces[1], model)) <= bound * (1 + 1e-9) + 1e-15


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="as many"):
        fit([[(0, 1)]], [])
    with pytest.raises(ValueError, match="positive"):
        fit([[(0, 1)]], [0.0])


def test_saved_next_to_the_model_and_loaded_back(tmp_path):
    model = CostModel(*TRUE.coefficients, info={"held_out_mean_error": 0.03})
    path = model.save(tmp_path)
    assert path == tmp_path / FILE_NAME
    assert CostModel.find(tmp_path) == model
    assert CostModel.load(path).info == {"held_out_mean_error": 0.03}
    assert CostModel.find(tmp_path / "elsewhere") is None
    assert "form" in json.loads(path.read_text())


def test_a_four_term_file_reads_the_other_terms_as_zero(tmp_path):
    data = CostModel(1.0, 2.0, 3.0, 4.0).to_json()
    for term in ("decode_attention", "prefix_gather"):
        del data["coefficients"][term]
    (tmp_path / FILE_NAME).write_text(json.dumps(data))
    assert CostModel.find(tmp_path) == CostModel(1.0, 2.0, 3.0, 4.0, 0.0, 0.0)


def test_a_broken_or_negative_file_is_refused(tmp_path):
    (tmp_path / FILE_NAME).write_text("{}")
    with pytest.raises(ValueError, match="not a cost model"):
        CostModel.find(tmp_path)
    data = CostModel(1.0, 1.0, 1.0, 1.0).to_json()
    data["coefficients"]["linear"] = -1.0
    (tmp_path / FILE_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=">= 0"):
        CostModel.find(tmp_path)


def test_the_engine_uses_the_saved_model_only_with_micro_batches_in_flight(llama_dir, tmp_path):
    import shutil

    from kunserve.worker.engine import EngineConfig, LLMEngine

    assert LLMEngine(EngineConfig(model=llama_dir)).cost_model is None  # nothing saved
    guessed = LLMEngine(EngineConfig(model=llama_dir, lookahead=True)).cost_model
    assert guessed is not None and guessed.linear > 0 and guessed.constant == 0
    model_dir = shutil.copytree(llama_dir, tmp_path / "model")
    TRUE.save(model_dir)
    engine = LLMEngine(EngineConfig(model=str(model_dir)))
    assert engine.cost_model == TRUE
    assert engine.scheduler.config.cost_model == TRUE
    assert engine.scheduler.config.num_micro_batches == 1  # one process: lookahead idles
    assert LLMEngine(EngineConfig(model=str(model_dir), lookahead=False)).cost_model is None
