"""Pipelined serving across real processes: a group of 2 or 4 ranks (this process is rank 0,
the leader; the others are spawned member processes) computes exactly what transformers does,
with micro-batches in flight, chunked prefill and recompute preemption; seeded sampling on the
last rank gives the single-process engine's tokens; a dead or hung stage makes the leader
raise within the timeout instead of hanging."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from kunserve.worker.engine import EngineConfig, LLMEngine
from kunserve.worker.pipeline.pipeline_engine import PipelineEngine
from kunserve.worker.pipeline.stage_link import StageLinkError
from kunserve.worker.pipeline.stage_pool import StagePool
from kunserve.worker.sampling_params import SamplingParams
from tests.conftest import hf_greedy, make_prompts

MAX_TOKENS = 24
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
EVEN_LLAMA = dict(arch="llama", layers=4, hidden_size=64, heads=4, kv_heads=2,
                  intermediate_size=128, vocab_size=512, seed=3)

# name -> (model, stages, engine config overrides, group KV blocks (None: the budget's))
VARIANTS = {
    "llama5-2stages": ("llama-gqa", 2, {}, None),
    "qwen2-3layers-2stages-chunked": ("qwen2-tied-mha", 2, {"max_num_batched_tokens": 16}, None),
    "llama5-4stages-chunked": ("llama-gqa", 4, {"max_num_batched_tokens": 13}, None),
    "llama4-4stages-chunked-preempting": ("llama4", 4, {"max_num_batched_tokens": 16}, 12),
    "llama4-2stages-preempting": ("llama4", 2, {}, 12),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Leader and members get one thread each (2 cores, up to 4 processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(model_dirs, tmp_path_factory) -> dict[str, str]:
    from kunserve.tiny_model import make_tiny_model

    even = make_tiny_model(tmp_path_factory.mktemp("pipeline") / "llama4", **EVEN_LLAMA)
    return {**model_dirs, "llama4": str(even)}


@pytest.fixture(scope="module")
def references(models) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    prompts = make_prompts(10, vocab=500)
    return {name: (prompts, [hf_greedy(path, p, MAX_TOKENS) for p in prompts])
            for name, path in models.items()}


@pytest.fixture(scope="module")
def pool():
    pool = StagePool(3)
    yield pool
    pool.close()


def config(model_dir: str, **overrides) -> EngineConfig:
    return EngineConfig(model=model_dir, num_threads=1, **overrides)


def track_depth(engine: PipelineEngine) -> list[int]:
    """Micro-batches in flight right after each submit."""
    seen: list[int] = []
    runner = engine.leader_runner
    submit = runner.submit

    def tracked(out):
        submit(out)
        seen.append(runner.num_in_flight)

    runner.submit = tracked
    return seen


# -- exactness -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_transformers(variant, pool, models, references):
    model, stages, overrides, num_blocks = VARIANTS[variant]
    prompts, expected = references[model]
    with pool.group(stages, config(models[model], **overrides), num_blocks=num_blocks) as engine:
        depth = track_depth(engine)
        results = engine.generate(prompts, GREEDY)
        assert [r.token_ids for r in results] == expected
        assert all(r.finish_reason == "length" for r in results)
        assert engine.block_manager.usage().used == 0  # every block came back
        assert max(depth) == stages  # one micro-batch per stage was in flight
        if num_blocks is not None:
            assert engine.block_manager.num_blocks == num_blocks
            assert engine.scheduler.num_preemptions > 0
        report = engine.memory_report()
        assert report["group_size"] == stages and report["blocks_total"] > 0
    busy = engine.busy_seconds
    assert busy is not None and len(busy) == stages and all(b > 0 for b in busy)


# name -> (model, stages, engine config overrides, group KV blocks): lookahead micro-batches
LOOKAHEAD_VARIANTS = {
    "llama5-2stages": ("llama-gqa", 2, {"max_num_batched_tokens": 48}, None),
    "llama4-4stages-preempting": ("llama4", 4, {"max_num_batched_tokens": 24}, 12),
}


@pytest.mark.parametrize("variant", LOOKAHEAD_VARIANTS)
def test_lookahead_micro_batches_give_transformers_tokens(variant, pool, models, references):
    """Micro-batches of equal estimated cost (the model's shape stands in for a profile):
    prefills cut across micro-batches in flight, the rest going out before the first part is
    back, and the tokens are still transformers' greedy ones."""
    model, stages, overrides, num_blocks = LOOKAHEAD_VARIANTS[variant]
    prompts, expected = references[model]
    cfg = config(models[model], lookahead=True, lookahead_min_tokens=4, **overrides)
    with pool.group(stages, cfg, num_blocks=num_blocks) as engine:
        assert engine.scheduler.config.cost_model is not None
        ahead: list[str] = []  # chunks sent while their request's previous chunk was out
        runner, submit = engine.leader_runner, engine.leader_runner.submit

        def tracked(out):
            ahead.extend(c.request_id for c in out.chunks if c.start_position
                         > engine.scheduler.requests[c.request_id].num_computed_tokens)
            submit(out)

        runner.submit = tracked
        results = engine.generate(prompts, GREEDY)
        assert [r.token_ids for r in results] == expected
        assert ahead
        assert engine.block_manager.usage().used == 0
        if num_blocks is not None:
            assert engine.scheduler.num_preemptions > 0


def test_seeded_sampling_matches_the_single_process_engine(pool, models):
    prompts = make_prompts(9, vocab=500, seed=7)
    params = [SamplingParams(max_tokens=16, temperature=0.6 + 0.1 * i, top_p=0.9,
                             top_k=0 if i % 2 else 50, seed=100 + i, ignore_eos=True,
                             presence_penalty=0.5 if i % 3 == 0 else 0.0,
                             frequency_penalty=0.3 if i % 4 == 0 else 0.0)
              for i in range(len(prompts) - 1)] + [GREEDY]
    solo = LLMEngine(config(models["llama-gqa"])).generate(prompts, params)
    with pool.group(4, config(models["llama-gqa"], max_num_batched_tokens=16),
                    num_blocks=12) as engine:
        piped = engine.generate(prompts, params)
        assert engine.scheduler.num_preemptions > 0  # recompute does not change a stream
    assert [r.token_ids for r in piped] == [r.token_ids for r in solo]
    assert len({tuple(r.token_ids) for r in piped}) == len(prompts)


def test_abort_while_in_flight_leaves_the_others_exact(pool, models, references):
    prompts, expected = references["llama-gqa"]
    with pool.group(2, config(models["llama-gqa"])) as engine:
        ids = [engine.add_request(p, GREEDY) for p in prompts]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        for _ in range(3):
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
        victim = next(i for i in ids if engine.scheduler.is_in_flight(i))
        engine.abort_request(victim)
        with pytest.raises(ValueError, match="still in flight"):
            engine.add_request(prompts[0], GREEDY, request_id=victim)
        while engine.has_unfinished():
            for out in engine.step():
                assert out.request_id != victim
                tokens[out.request_id] += out.new_token_ids
        assert engine.block_manager.usage().used == 0
    for request_id, want in zip(ids, expected, strict=True):
        if request_id != victim:
            assert tokens[request_id] == want


def test_one_process_serves_many_epochs_and_sizes(pool, models, references):
    """Members form a new group per epoch, of any size, on the same store."""
    prompts, expected = references["llama4"]
    for stages in (2, 4, 3):
        with pool.group(stages, config(models["llama4"])) as engine:
            assert engine.link.epoch == pool.epoch
            results = engine.generate(prompts[:3], GREEDY)
        assert [r.token_ids for r in results] == expected[:3]


def test_the_group_holds_what_its_smallest_member_can(pool, models):
    """Each member's budget is the instance's: the layers it does not hold become KV blocks
    (thinner ones), and the group takes the smallest member's count."""
    from kunserve.worker.checkpoint import load_stage
    from kunserve.worker.instance_memory import model_parameter_bytes, plan_instance_memory
    from kunserve.worker.layer_range import LayerRange

    cfg = config(models["llama-gqa"])
    solo = LLMEngine(cfg)
    model = solo.model_config
    whole = model_parameter_bytes(model, cfg.dtype)
    assert whole == solo.memory.parameter_bytes
    capacities = []
    for rank in range(4):
        layers = LayerRange.for_stage(rank, 4, model.num_layers)
        stage = load_stage(cfg.model, layers)
        capacities.append(plan_instance_memory(cfg, model, stage.parameter_bytes(), layers.size,
                                               whole_model_bytes=whole).num_blocks)
    with pool.group(4, cfg) as engine:
        assert engine.block_manager.num_blocks == min(capacities)
        assert engine.memory.budget_bytes == solo.memory.budget_bytes
    assert min(capacities) > 2 * solo.block_manager.num_blocks


# -- failures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def failure_pool():
    pool = StagePool(2)
    yield pool
    pool.close()


def step_until_error(engine: PipelineEngine, limit_s: float) -> tuple[StageLinkError, float]:
    start = time.monotonic()
    with pytest.raises(StageLinkError) as raised:
        while time.monotonic() - start < limit_s:
            engine.step()
    return raised.value, time.monotonic() - start


def test_a_group_that_cannot_hold_the_blocks_does_not_form(failure_pool, models):
    with pytest.raises(StageLinkError, match="needs 1000000 KV blocks"):
        with failure_pool.group(2, config(models["llama-gqa"]), num_blocks=10**6,
                                check_members=False):
            pass
    (result,) = failure_pool.member_results(1, timeout_s=10)
    assert not result.ok and "needs 1000000 KV blocks" in result.error


def test_a_hung_stage_makes_the_leader_raise_after_the_timeout(failure_pool, models):
    member = failure_pool.member_pid(1)
    with failure_pool.group(2, config(models["llama-gqa"]), timeout_s=2.0,
                            check_members=False) as engine:
        for prompt in make_prompts(8, vocab=500):
            engine.add_request(prompt, GREEDY)
        engine.step()
        os.kill(member, signal.SIGSTOP)
        try:
            error, elapsed = step_until_error(engine, limit_s=30)
        finally:
            os.kill(member, signal.SIGCONT)
    assert 1.5 <= elapsed < 6
    assert "did not answer within 2 s" in str(error)
    with pytest.raises(StageLinkError, match="broken"):
        engine.step()
    (result,) = failure_pool.member_results(1, timeout_s=10)  # it noticed the leader left
    assert not result.ok


def test_a_killed_stage_makes_the_leader_raise_at_once(models):
    pool = StagePool(2)
    try:
        with pool.group(3, config(models["llama-gqa"]), timeout_s=20.0,
                        check_members=False) as engine:
            for prompt in make_prompts(8, vocab=500):
                engine.add_request(prompt, GREEDY)
            for _ in range(3):
                engine.step()
            os.kill(pool.member_pid(1), signal.SIGKILL)  # the middle stage
            error, elapsed = step_until_error(engine, limit_s=60)
        assert elapsed < 20  # the closed connection is noticed, not waited out
        assert "epoch" in str(error) and "died" in str(error)
    finally:
        pool.close()
