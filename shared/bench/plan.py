"""``kunserve bench plan``: how long the planner takes to decide a drop for a large cluster.

A synthetic cluster of ``--instances`` solo instances (default 1,024) of a model shaped like
Qwen-2.5-14B on 80 GB GPUs (``--layers`` 48, parameters 34% of the budget, 8 KV heads of 128
in bf16, blocks of 16 tokens), every one of them overloaded by a seeded random deficit. For
each scenario the need (the KV tokens the plan must free) is set so the greedy makes a given
amount of work:

* ``one pair``: one merge covers it;
* ``half``: half the instances pair up;
* ``everything``: more than merging every instance gains, so the plan merges as far as it
  helps and falls short.

Two timings per scenario, each over ``--repeats`` runs (median, p99, fastest): ``plan`` is
``drop_plan.plan_drop`` alone (what ``kunserve:plan_seconds`` records), ``decide`` the
planner's whole look at the loads (``AutoPolicy.decide``: demand per instance from the loads,
the overload window, the plan). Pure Python, no servers.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass

from kunserve.planner.auto_policy import AutoPolicy, AutoSettings, DropDecision
from kunserve.planner.drop_plan import PlanGroup, plan_drop
from kunserve.planner.group_capacity import GroupCapacity
from kunserve.planner.membership import solo_instance
from kunserve.protocol import InstanceLoad, Topology

GIB = 1 << 30
BLOCK_SIZE = 16


@dataclass
class PlanBenchRow:
    scenario: str
    instances: int
    layers: int
    need_tokens: int
    merges: int
    new_groups: int
    shortfall_tokens: int
    plan_ms_p50: float
    plan_ms_p99: float
    plan_ms_min: float
    decide_ms_p50: float
    decide_ms_p99: float


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="time of the drop plan and the planner's decision for a "
                                    "large cluster")
    p.add_argument("--instances", type=int, default=1024)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = measure(args.instances, args.layers, args.repeats, args.seed)
    _print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(row) for row in rows], f, indent=2)
    return 0


def capacity_of(layers: int) -> GroupCapacity:
    """An 80 GiB budget, 28 GiB of parameters (34%), 4 GiB of activation reserve; a layer's
    KV of one token: K and V of 8 heads of 128 in bf16."""
    return GroupCapacity(num_layers=layers, budget_bytes=80 * GIB, reserve_bytes=4 * GIB,
                         parameter_bytes=28 * GIB, layer_block_bytes=2 * 8 * 128 * 2 * BLOCK_SIZE,
                         block_size=BLOCK_SIZE)


def measure(instances: int, layers: int, repeats: int, seed: int) -> list[PlanBenchRow]:
    capacity = capacity_of(layers)
    rng = random.Random(seed)
    solo = capacity.tokens(1)
    deficits = [rng.randrange(1, solo) for _ in range(instances)]
    groups = [PlanGroup((f"worker-{i}",), d) for i, d in enumerate(deficits)]
    pair = capacity.gain(2, [1, 1])
    scenarios = {"one pair": pair, "half": pair * (instances // 4),
                 "everything": capacity.tokens(layers) * instances}
    rows = []
    for name, need in scenarios.items():
        plan = plan_drop(groups, need, capacity)
        plan_times = _times(lambda need=need: plan_drop(groups, need, capacity), repeats)
        decide_times = _decide_times(capacity, deficits, need, repeats)
        rows.append(PlanBenchRow(
            scenario=name, instances=instances, layers=layers, need_tokens=need,
            merges=plan.merges, new_groups=len(plan.new_groups),
            shortfall_tokens=plan.shortfall_tokens,
            plan_ms_p50=_ms(statistics.median(plan_times)), plan_ms_p99=_ms(_p99(plan_times)),
            plan_ms_min=_ms(min(plan_times)),
            decide_ms_p50=_ms(statistics.median(decide_times)),
            decide_ms_p99=_ms(_p99(decide_times))))
    return rows


def _decide_times(capacity: GroupCapacity, deficits: list[int], need: int,
                  repeats: int) -> list[float]:
    """``AutoPolicy.decide`` from loads whose deficits add up to ``need`` (spread like
    ``deficits``)."""
    ids = [f"worker-{i}" for i in range(len(deficits))]
    topology = Topology(epoch=1, instances=[solo_instance(i, capacity.num_layers) for i in ids])
    blocks = capacity.tokens(1) // BLOCK_SIZE
    scale = need / sum(deficits)
    loads = {i: _load(i, capacity, blocks, max(1, int(d * scale) // BLOCK_SIZE))
             for i, d in zip(ids, deficits, strict=True)}
    times = []
    for _ in range(repeats):
        policy = AutoPolicy(AutoSettings(overload_window_s=0.0), capacity.num_layers)
        started = time.perf_counter()
        decision = policy.decide(0.0, topology, loads)
        times.append(time.perf_counter() - started)
        assert isinstance(decision, DropDecision)
    return times


def _load(instance_id: str, capacity: GroupCapacity, blocks: int,
          queued_blocks: int) -> InstanceLoad:
    return InstanceLoad(
        instance_id=instance_id, group_id=instance_id, running=32, waiting=queued_blocks,
        blocks_total=blocks, blocks_used=blocks, block_size=BLOCK_SIZE,
        queued_tokens=queued_blocks * BLOCK_SIZE, budget_bytes=capacity.budget_bytes,
        reserve_bytes=capacity.reserve_bytes, parameter_bytes=capacity.parameter_bytes,
        kv_bytes=blocks * capacity.layer_block_bytes * capacity.num_layers)


def _times(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def _p99(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)


def _print_table(rows: list[PlanBenchRow]) -> None:
    print(f"{'scenario':<12} {'instances':>9} {'layers':>6} {'merges':>6} {'groups':>6} "
          f"{'short':>5} | {'plan p50':>9} {'p99':>7} {'min':>7} | {'decide p50':>10} "
          f"{'p99':>7}  (ms)")
    for r in rows:
        print(f"{r.scenario:<12} {r.instances:>9} {r.layers:>6} {r.merges:>6} "
              f"{r.new_groups:>6} {'yes' if r.shortfall_tokens else 'no':>5} | "
              f"{r.plan_ms_p50:>9.3f} {r.plan_ms_p99:>7.3f} {r.plan_ms_min:>7.3f} | "
              f"{r.decide_ms_p50:>10.3f} {r.decide_ms_p99:>7.3f}")
