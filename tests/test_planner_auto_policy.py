"""What the planner decides by itself (pure): demand per group, the overload window, the
restore window with its hysteresis, the back-off after failed drops, and a recorded load
series with two bursts that must give exactly drop, restore, drop, restore."""

from __future__ import annotations

import msgspec
import pytest

from kunserve.planner.auto_policy import AutoPolicy, AutoSettings, DropDecision, RestoreDecision
from kunserve.planner.demand import GroupDemand, Reserved, group_demands
from kunserve.planner.group_transitions import back_to_solo, begin_drop, commit_drop
from kunserve.planner.membership import solo_instance
from kunserve.planner.overload_detector import OverloadDetector
from kunserve.planner.restore_policy import RestorePolicy
from kunserve.protocol import InstanceLoad, Topology

L = 4
KIB = 1024
TICK = 0.125  # a binary fraction: window arithmetic is exact
SOLO_BLOCKS, GROUP_BLOCKS, BLOCK_SIZE = 24, 100, 16
MEMORY = dict(budget_bytes=854 * KIB + 6 * KIB * KIB + SOLO_BLOCKS * 16 * KIB,
              reserve_bytes=6 * KIB * KIB, parameter_bytes=854 * KIB,
              kv_bytes=SOLO_BLOCKS * 16 * KIB)


def solo_load(instance_id: str, used: int, queued_blocks: int = 0, **fields) -> InstanceLoad:
    return InstanceLoad(instance_id=instance_id, group_id=instance_id, blocks_total=SOLO_BLOCKS,
                        blocks_used=used, block_size=BLOCK_SIZE,
                        queued_tokens=queued_blocks * BLOCK_SIZE,
                        waiting=(queued_blocks + 1) // 2, running=1 if used else 0,
                        **MEMORY, **fields)


def solo_topology(*ids: str) -> Topology:
    return Topology(epoch=1, instances=[solo_instance(i, L) for i in ids])


def demand(used: int, queued: int, total: int = 24, waiting: int = 0,
           kv_bound: bool = False) -> GroupDemand:
    return GroupDemand("g", ("a",), "solo", 16, total, used, queued, waiting, kv_bound)


# -- demand ----------------------------------------------------------------------------------


def test_demand_counts_running_blocks_plus_what_the_queue_and_reservations_need():
    topology = solo_topology("w0", "w1")
    loads = {"w0": msgspec.structs.replace(solo_load("w0", used=20), queued_tokens=17,
                                           waiting=2),
             "w1": solo_load("w1", used=24)}
    demands = group_demands(topology, loads, {"w0": Reserved(tokens=5, requests=1)})
    w0, w1 = demands
    assert (w0.queued_blocks, w0.waiting) == (2 + 1, 3)  # ceil(17/16) + ceil(5/16)
    assert w0.demand_tokens == (20 + 3) * 16 and w0.deficit_tokens == 0
    assert w1.deficit_tokens == 0 and w1.free_blocks == 0


def test_a_group_counts_only_when_its_leaders_load_confirms_it():
    topology = commit_drop(begin_drop(solo_topology("w0", "w1", "w2"), ["w0", "w1"], L), "g2",
                           ["w0", "w1"], L)
    stale = {"w0": solo_load("w0", used=3), "w1": solo_load("w1", used=3),
             "w2": solo_load("w2", used=3)}
    assert [d.group_id for d in group_demands(topology, stale)] == ["w2"]
    confirmed = {**stale, "w0": msgspec.structs.replace(
        stale["w0"], state="pipelined", group_id="g2", blocks_total=GROUP_BLOCKS)}
    groups = {d.group_id: d for d in group_demands(topology, confirmed)}
    assert groups["g2"].members == ("w0", "w1") and groups["g2"].blocks_total == GROUP_BLOCKS
    preparing = begin_drop(solo_topology("w0", "w1"), ["w0", "w1"], L)
    assert group_demands(preparing, stale) == []


def test_overload_is_a_queue_that_does_not_fit_in_a_mostly_used_cache():
    assert demand(used=22, queued=3).overloaded(0.8)
    assert not demand(used=20, queued=3).overloaded(0.8)  # fits the free blocks
    assert not demand(used=10, queued=20, total=100, waiting=1).overloaded(0.8)  # usage low
    # a small cache held back by long prompts: 12 of 16 blocks used, 4 free, requests of 6
    assert demand(used=12, queued=12, total=16, waiting=2).overloaded(0.8)
    assert not demand(used=12, queued=12, total=16, waiting=4).overloaded(0.8)  # 3 each fit
    # requests just finished and freed blocks; the last step could not admit the queue's
    # head: still an overload (the next step admits some, the rest waits for memory)
    assert demand(used=8, queued=20, total=16, waiting=4, kv_bound=True).overloaded(0.8)
    assert not demand(used=8, queued=20, total=16, waiting=4).overloaded(0.8)
    assert not demand(used=8, queued=8, total=16, waiting=4, kv_bound=True).overloaded(0.8)


def test_kv_bound_goes_from_the_leaders_load_into_its_demand():
    loads = {"w0": solo_load("w0", used=8, queued_blocks=20, kv_bound=1),
             "w1": solo_load("w1", used=8, queued_blocks=20)}
    w0, w1 = group_demands(solo_topology("w0", "w1"), loads)
    assert w0.kv_bound and w0.overloaded(0.8)
    assert not w1.kv_bound and not w1.overloaded(0.8)


# -- the windows -----------------------------------------------------------------------------


def test_the_overload_window_must_hold_without_a_break():
    detector = OverloadDetector(window_s=0.5, usage_threshold=0.8)
    hot, cool = demand(used=24, queued=4), demand(used=10, queued=0)
    assert detector.observe(0.0, [hot]) == []
    assert detector.observe(0.25, [hot]) == []
    assert detector.observe(0.375, [cool]) == []  # a break: the window starts again
    assert detector.observe(0.5, [hot]) == []
    assert detector.observe(0.875, [hot]) == []
    assert detector.observe(1.0, [hot]) == [hot]


def test_the_restore_window_caps_every_observation_and_the_mean():
    # solo capacity 24 blocks: calm below 19.2 blocks (0.8), ready once calm for the window
    # with a mean below 12 (0.5) over its last second; queued blocks count
    policy = RestorePolicy(window_s=1.0, usage_fraction=0.5, peak_fraction=0.8)
    solo = {"a": 24 * 16}
    low, spike = demand(used=2, queued=0), demand(used=10, queued=6, waiting=1)  # 16 blocks
    assert policy.observe(0.0, [low], solo) == []
    assert policy.observe(0.5, [spike], solo) == []  # a request waiting, 16 blocks: calm
    assert policy.observe(1.0, [low], solo) == [low]  # calm since 0.0, mean 6.7 blocks
    over = demand(used=12, queued=8, waiting=2)  # 20 blocks: at the peak, not calm
    assert policy.observe(1.25, [over], solo) == []
    assert policy.observe(1.5, [low], solo) == []  # a new window from 1.5
    assert policy.observe(2.5, [low], solo) == [low]
    policy.reset()  # as the planner does once it decided
    high = demand(used=14, queued=0)  # calm (below 19.2) but above half on average
    for now in (3.0, 3.5, 4.0, 4.5):
        assert policy.observe(now, [high], solo) == []
    # the mean is over the window's last second (4.0, 4.5, 5.0): (14 + 14 + 2) / 3 = 10
    assert policy.observe(5.0, [low], solo) == [low]
    assert policy.observe(5.5, [low], {}) == []  # solo capacity unknown: never


# -- the recorded series ---------------------------------------------------------------------


def series() -> list[int]:
    """The cluster's KV demand in blocks, one value per tick (1/8 s): idle, a first burst
    with a one-tick break in its overload, a tail that falls in steps, idle, a second burst,
    idle."""
    return ([4] * 10 + [60] * 3 + [40] + [80] * 27 + [20] * 10 + [30] * 2 + [10] * 8
            + [12] * 39 + [90] * 31 + [0] * 40)


def loads_for(topology: Topology, demand_blocks: int) -> dict[str, InstanceLoad]:
    """What the two workers report for that demand: split evenly when solo (the router
    balances), all on the leader when pipelined."""
    by_id = {i.instance_id: i for i in topology.instances}
    if by_id["w0"].state == "pipelined":
        group = by_id["w0"].group_id
        used = min(demand_blocks, GROUP_BLOCKS)
        fields = dict(state="pipelined", group_id=group, blocks_total=GROUP_BLOCKS)
        return {"w0": msgspec.structs.replace(
                    solo_load("w0", used, demand_blocks - used), **fields),
                "w1": msgspec.structs.replace(solo_load("w1", 0), stage=1, **fields)}
    half = demand_blocks // 2
    used = min(half, SOLO_BLOCKS)
    return {i: solo_load(i, used, half - used) for i in ("w0", "w1")}


def replay(policy: AutoPolicy, demands: list[int], drops_succeed: bool = True) -> list[tuple]:
    """Feed the series tick by tick; apply each decision's outcome to the topology as the
    coordinator would; return (tick, action, what) for every decision."""
    topology, decisions = solo_topology("w0", "w1"), []
    for tick, blocks in enumerate(demands):
        decision = policy.decide(tick * TICK, topology, loads_for(topology, blocks))
        if isinstance(decision, DropDecision):
            members = decision.plan.new_groups[0]
            group = f"g{topology.epoch + 1}"
            decisions.append((tick, "drop", members))
            if drops_succeed:
                topology = commit_drop(begin_drop(topology, members, L), group, members, L)
            policy.drop_finished(tick * TICK, members, group, drops_succeed)
        elif isinstance(decision, RestoreDecision):
            (group,) = decision.groups
            decisions.append((tick, "restore", group.group_id))
            topology = back_to_solo(topology, group.members, L)
            policy.restore_finished(group.group_id)
    return decisions


def test_two_bursts_give_exactly_drop_restore_drop_restore():
    settings = AutoSettings(overload_window_s=0.5, overload_usage=0.8, restore_window_s=2.0,
                            restore_usage=0.5)
    decisions = replay(AutoPolicy(settings, L), series())
    # burst 1 overloaded from tick 10, broken at 13, again from 14: 0.5 s later, tick 18;
    # calm (below 0.8 x 48 blocks) from 41 and, 2 s (16 ticks) later, a mean of 18 blocks
    # over them, below 24 (half): tick 57; burst 2 from tick 100: tick 104; calm from 131:
    # tick 147
    assert decisions == [(18, "drop", ("w0", "w1")), (57, "restore", "g2"),
                         (104, "drop", ("w0", "w1")), (147, "restore", "g5")]


def test_the_drop_decision_carries_its_trigger_figures():
    policy = AutoPolicy(AutoSettings(overload_window_s=0.0), L)
    topology = solo_topology("w0", "w1")
    decision = policy.decide(0.0, topology, loads_for(topology, 80))
    assert isinstance(decision, DropDecision)
    assert decision.trigger["overloaded"] == ["w0", "w1"]
    assert decision.trigger["need_tokens"] == 2 * (40 - 24) * 16
    assert decision.trigger["demand_tokens"] == 80 * 16
    assert decision.plan.sufficient and decision.plan_seconds >= 0


def test_a_failing_drop_is_retried_only_after_a_growing_back_off():
    settings = AutoSettings(overload_window_s=0.5, retry_backoff_s=5.0, max_backoff_s=120.0)
    decisions = replay(AutoPolicy(settings, L), [80] * 130, drops_succeed=False)
    # at 0.5 s, then 5 s after that failure (5.5 s = tick 44), then 10 s later (tick 124)
    assert [tick for tick, *_ in decisions] == [4, 44, 124]


def test_a_group_an_operator_dropped_is_not_restored_automatically():
    policy = AutoPolicy(AutoSettings(restore_window_s=0.0), L)
    topology = solo_topology("w0", "w1")
    policy.decide(0.0, topology, loads_for(topology, 4))  # learns the solo capacities
    topology = commit_drop(begin_drop(topology, ["w0", "w1"], L), "g2", ["w0", "w1"], L)
    for tick in range(1, 20):
        assert policy.decide(tick * TICK, topology, loads_for(topology, 0)) is None
    policy.owned.add("g2")
    assert isinstance(policy.decide(3.0, topology, loads_for(topology, 0)), RestoreDecision)


@pytest.mark.parametrize("busy", [{"w0"}, {"w1"}])
def test_instances_under_reconfiguration_are_left_out(busy):
    policy = AutoPolicy(AutoSettings(overload_window_s=0.0), L)
    topology = solo_topology("w0", "w1")
    assert policy.decide(0.0, topology, loads_for(topology, 80), busy=busy) is None


def test_a_restarted_planner_restores_its_group_with_the_estimated_solo_capacity():
    """It never saw the members solo; a solo instance like them gives the estimate."""
    policy = AutoPolicy(AutoSettings(restore_window_s=0.0), L, owned={"g2"})
    topology = commit_drop(begin_drop(solo_topology("w0", "w1", "w2"), ["w0", "w1"], L), "g2",
                           ["w0", "w1"], L)
    loads = {**loads_for(topology, 0), "w2": solo_load("w2", 3)}
    decision = policy.decide(0.0, topology, loads)
    assert isinstance(decision, RestoreDecision)
    assert decision.trigger["solo_tokens"] == 2 * SOLO_BLOCKS * BLOCK_SIZE
