"""Drop and restore between real engine processes, without the mesh around them.

``g`` spawned processes each run a solo ``LLMEngine`` with its own requests for a few steps,
drop into one pipeline group over a real gloo link (``reconfigure.drop``), serve pipelined,
restore (``reconfigure.restore``) and finish solo. Every request's tokens, concatenated across
the three phases and whichever process produced them, must be exactly transformers' greedy
tokens; the memory each member reports must follow the documented formula; after the restore
every number is back to its solo value. ``test_mesh_drop.py`` does the same through NATS."""

from __future__ import annotations

import datetime
from collections import defaultdict

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from kunserve.worker.engine import EngineConfig, LLMEngine
from kunserve.worker.instance_memory import kv_geometry
from kunserve.worker.layer_range import LayerRange
from kunserve.worker.sampling_params import SamplingParams
from tests.conftest import collect_members, hf_greedy, make_prompts

HOST = "127.0.0.1"
MAX_TOKENS = 20
EVEN_LLAMA = dict(arch="llama", layers=4, hidden_size=64, heads=4, kv_heads=2,
                  intermediate_size=128, vocab_size=512, seed=3)


def die_in(phase: str) -> None:
    """Make this process die the moment it enters ``phase`` of a reconfiguration (a member
    killed during the KV exchange, or while pulling layers back during a restore)."""
    import os

    from kunserve.worker.pipeline import reconfigure

    target = {"exchange": "move_kv", "restore": "_pull_layers"}[phase]
    setattr(reconfigure, target, lambda *args, **kwargs: os._exit(1))


def member_main(port: int, rank: int, size: int, config: EngineConfig,
                prompts: dict[str, list[int]], steps: tuple[int, int], results: mp.Queue,
                dies_in: str | None = None) -> None:
    from kunserve.worker.pipeline.reconfigure import (
        DropRefused,
        GroupFailed,
        drop,
        plan_restore,
        restore,
    )
    from kunserve.worker.pipeline.stage_link import StageLink

    if dies_in:
        die_in(dies_in)
    try:
        engine = LLMEngine(config)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        for rid, prompt in prompts.items():
            engine.add_request(prompt, params, rid)
        tokens: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))

        def take(phase, outputs):
            for out in outputs:
                assert out.error is None, out.error
                tokens[phase][out.request_id] += out.new_token_ids

        for _ in range(steps[0]):
            take("solo", engine.step())
        results.put((rank, "solo", dict(tokens.pop("solo", {}))))
        report = {"solo": engine.memory_report()}
        store = dist.TCPStore(HOST, port, is_master=False,
                              timeout=datetime.timedelta(seconds=60))
        link = StageLink(store, rank, size, epoch=1, timeout_s=60, bind_host=HOST)
        try:
            membership = drop(engine, link, "g1")
        except DropRefused as exc:  # everyone stays solo with its requests
            report["refused"] = str(exc)
            link.close()
            while engine.has_unfinished():
                take("restored", engine.step())
            results.put((rank, {p: dict(t) for p, t in tokens.items()}, report, None))
            return
        except GroupFailed as exc:  # a peer died: solo again, the leader with every request
            report["failed"] = str(exc)
            while engine.has_unfinished():
                take("restored", engine.step())
            results.put((rank, {p: dict(t) for p, t in tokens.items()}, report, None))
            return
        report["group"] = engine.memory_report()
        report["kept_layers"] = (membership.layers.start, membership.layers.end)
        if link.is_leader:  # the moved requests go first: a cap until an output of each
            report["capped_until"] = sorted(engine.scheduler.capped_until)
            report["budget_at_drop"] = engine.scheduler.token_budget
            for _ in range(steps[1]):
                take("group", engine.step())
            take("group", engine.drain())
            begin = plan_restore(engine, membership)
        else:
            begin = membership.stage_runner.run()
        try:
            restore(engine, membership, begin)
        except GroupFailed as exc:
            report["failed"] = str(exc)
        report["restored"] = engine.memory_report()
        while engine.has_unfinished():
            take("restored", engine.step())
        results.put((rank, {p: dict(t) for p, t in tokens.items()}, report, None))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        import traceback

        results.put((rank, {}, {}, traceback.format_exc() or repr(exc)))


@pytest.fixture(scope="module")
def models(model_dirs, tmp_path_factory) -> dict[str, str]:
    from kunserve.tiny_model import make_tiny_model

    even = make_tiny_model(tmp_path_factory.mktemp("drop") / "llama4", **EVEN_LLAMA)
    return {"llama4": str(even), "llama5": model_dirs["llama-gqa"]}


def run_group(model: str, size: int, prompts: list[list[int]], steps=(3, 4),
              dies: tuple[int, str] | None = None, **overrides):
    """Run the members; ``dies``: (rank, phase) of a member that dies in that phase."""
    ctx = mp.get_context("spawn")
    store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    results = ctx.Queue()
    config = EngineConfig(model=model, num_threads=1, **overrides)
    share = {r: {f"m{r}-{i}": p for i, p in enumerate(prompts) if i % size == r}
             for r in range(size)}
    processes = [ctx.Process(target=member_main, daemon=True,
                             args=(store.port, r, size, config, share[r], steps, results,
                                   dies[1] if dies and dies[0] == r else None))
                 for r in range(size)]
    for process in processes:
        process.start()
    solo_tokens, got = collect_members(results, processes, size - (dies is not None), size)
    by_rank = {rank: (tokens, report) for rank, tokens, report, _ in sorted(got)}
    merged: dict[str, list[int]] = defaultdict(list)
    for tokens in solo_tokens.values():
        for rid, ids in tokens.items():
            merged[rid] += ids
    for phase in ("group", "restored"):
        for tokens, _ in by_rank.values():
            for rid, ids in tokens.get(phase, {}).items():
                merged[rid] += ids
    expected_ids = {rid: prompts[int(rid.split("-")[1])] for r in share for rid in share[r]}
    return merged, expected_ids, {r: rep for r, (_, rep) in by_rank.items()}, config


@pytest.mark.parametrize("model,size,overrides", [
    ("llama4", 2, {}),
    ("llama5", 2, {"max_num_batched_tokens": 24}),  # uneven layers, chunked prefill
    ("llama4", 4, {}),
], ids=["even-2", "uneven-2-chunked", "even-4"])
def test_drop_and_restore_keep_greedy_tokens_and_accounting(models, model, size, overrides):
    prompts = make_prompts(2 * size, vocab=500, lengths=[5 + 9 * i for i in range(2 * size)])
    merged, prompt_of, reports, config = run_group(models[model], size, prompts, **overrides)
    for rid, prompt in prompt_of.items():
        assert merged[rid] == hf_greedy(models[model], prompt, MAX_TOKENS), rid
    # no overlap here: every request's KV is in place when the group serves, and they all
    # go before anything new (a queued prefill), a micro-batch of about their decodes' cost
    assert reports[0]["capped_until"] == sorted(prompt_of)
    assert (reports[0]["budget_at_drop"] < config.max_num_batched_tokens
            or config.max_num_batched_tokens <= config.lookahead_min_tokens)  # the cap's floor

    from kunserve.worker.model_config import ModelConfig

    model_config = ModelConfig.from_dir(models[model])
    num_layers = model_config.num_layers
    solo_tokens = sum(r["solo"]["blocks_total"] for r in reports.values()) * 16
    whole = reports[0]["solo"]["parameter_bytes"]
    capacities = []
    for rank, report in reports.items():
        solo, group = report["solo"], report["group"]
        layers = LayerRange.for_stage(rank, size, num_layers)
        assert report["kept_layers"] == (layers.start, layers.end)
        assert group["parameter_bytes"] < solo["parameter_bytes"]
        block_bytes = kv_geometry(config, model_config, layers.size).block_bytes
        assert group["block_bytes"] == block_bytes
        kv = solo["budget_bytes"] - group["parameter_bytes"] - solo["reserve_bytes"]
        capacities.append(kv // block_bytes)  # the documented formula, per member
        assert group["kv_bytes"] == group["blocks_total"] * block_bytes
        def totals(memory):  # what the restore must give back (usage depends on the requests)
            return {k: v for k, v in memory.items() if k not in ("blocks_used", "blocks_free")}

        assert totals(report["restored"]) == totals(solo)
    group_blocks = reports[0]["group"]["blocks_total"]
    assert all(r["group"]["blocks_total"] == group_blocks for r in reports.values())
    assert group_blocks == min(capacities)
    # the group holds one model copy: (g - 1) copies' worth of parameters became KV. Every
    # member holds the group's block count, so a member whose budget holds more (it kept
    # fewer parameter bytes: no embedding, fewer layers) leaves that slack unused
    freed = size * whole - sum(r["group"]["parameter_bytes"] for r in reports.values())
    slack = sum((capacities[r] - group_blocks) * reports[r]["group"]["block_bytes"]
                for r in reports)
    full_geometry = kv_geometry(config, model_config, num_layers)
    gained = group_blocks * 16 - solo_tokens
    assert gained > 0
    rounding = 2 * size * full_geometry.block_bytes  # whole blocks, before and after
    assert abs(gained * full_geometry.bytes_per_token - (freed - slack)) <= rounding


def test_a_group_that_would_not_gain_kv_is_refused_and_everyone_serves_on(models):
    """5 layers over 4 members: stage 0 holds 2 layers per block, and every member must hold
    the group's block count, so the group would hold less than the members solo."""
    prompts = make_prompts(4, vocab=500, lengths=[7, 19, 30, 3])
    merged, prompt_of, reports, _ = run_group(models["llama5"], 4, prompts)
    assert all("gains no KV cache" in r["refused"] for r in reports.values())
    for rid, prompt in prompt_of.items():
        assert merged[rid] == hf_greedy(models["llama5"], prompt, MAX_TOKENS), rid


@pytest.mark.parametrize("phase", ["exchange", "restore"])
def test_a_member_dying_mid_reconfiguration_loses_no_request(models, phase):
    """Rank 1 dies as it starts the KV exchange of the drop (its requests already belong to
    the leader) or as it starts pulling layers back in the restore: the leader falls back to
    solo and finishes every request, rank 1's too, by recomputing prompt plus the tokens
    already generated: no token lost, none repeated."""
    prompts = make_prompts(4, vocab=500, lengths=[6, 25, 11, 3])
    merged, prompt_of, reports, _ = run_group(models["llama4"], 2, prompts, dies=(1, phase))
    assert "the group broke" in reports[0]["failed"]
    assert set(reports) == {0}
    for rid, prompt in prompt_of.items():
        assert merged[rid] == hf_greedy(models["llama4"], prompt, MAX_TOKENS), rid


def test_the_members_that_entered_the_drop_first_are_served_first():
    """Each member enters a drop after its own last solo step; the leader serves the requests
    of those that entered first (they have waited longest for a token) first, in each
    member's own order, whatever the ranks."""
    from kunserve.worker.handover import RequestState
    from kunserve.worker.pipeline.reconfigure import longest_waiting_first
    from kunserve.worker.pipeline.stage_messages import DropHello

    def hello(rank: int, entered_at: float, ids: list[str]) -> DropHello:
        states = [RequestState(request_id=rid, prompt_token_ids=[1, 2], output_token_ids=[3],
                               sampling_params=SamplingParams(), eos_token_ids=[],
                               num_computed_tokens=2, running=True, block_table=[0])
                  for rid in ids]
        return DropHello(rank=rank, capacity_blocks=8, solo_blocks=4, tables={},
                         requests=states, generators={}, entered_at=entered_at)

    hellos = [hello(0, 10.020, ["a0", "a1"]), hello(1, 10.000, ["b0", "b1"]),
              hello(2, 10.010, ["c0"])]
    assert [s.request_id for s in longest_waiting_first(hellos)] == ["b0", "b1", "c0", "a0",
                                                                      "a1"]
