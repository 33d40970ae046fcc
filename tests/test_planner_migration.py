"""The llumnix baseline's decision: migrate from the instance short of KV to the one with room,
up to half that room; nothing when balanced."""

from __future__ import annotations

from kunserve.planner.membership import solo_instance
from kunserve.planner.migration_policy import Migration, decide_migration, freeness
from kunserve.planner.migrator import Migrator
from kunserve.protocol import InstanceInfo, InstanceLoad, ReconfigureReply, Topology


def load(instance_id: str, used: int, queued_tokens: int = 0, waiting: int = 0,
         total: int = 100, running: int = 4) -> InstanceLoad:
    return InstanceLoad(instance_id=instance_id, blocks_total=total, blocks_used=used,
                        block_size=16, queued_tokens=queued_tokens, waiting=waiting,
                        running=running)


def topology(*ids: str, pipelined: tuple[str, ...] = ()) -> Topology:
    instances = [solo_instance(i, 4) for i in ids]
    instances += [InstanceInfo(instance_id=i, state="pipelined", group_id="g1", stage=s)
                  for s, i in enumerate(pipelined)]
    return Topology(epoch=3, instances=instances)


def test_short_instance_hands_requests_to_the_freest():
    loads = {"a": load("a", 95, queued_tokens=16 * 20, waiting=3), "b": load("b", 40),
             "c": load("c", 70)}
    assert freeness(loads["a"]) == -15
    assert decide_migration(topology("a", "b", "c"), loads, ()) == Migration("a", "b", 30)
    # half the room: b has 10 free blocks, c 8
    loads["b"], loads["c"] = load("b", 90), load("c", 92)
    assert decide_migration(topology("a", "b", "c"), loads, ()) == Migration("a", "b", 5)


def test_no_migration_when_nobody_is_short_or_nobody_has_room():
    balanced = {"a": load("a", 50), "b": load("b", 60)}
    assert decide_migration(topology("a", "b"), balanced, ()) is None
    crowded = {"a": load("a", 95, 16 * 20, 3), "b": load("b", 96, waiting=0)}
    assert decide_migration(topology("a", "b"), crowded, ()) is None  # 4 free < 10%
    queued_everywhere = {"a": load("a", 95, 16 * 20, 3), "b": load("b", 10, 16, 1)}
    assert decide_migration(topology("a", "b"), queued_everywhere, ()) is None
    # a burst just queued on a: short, but nothing running yet that could move
    just_queued = {"a": load("a", 0, 16 * 200, 16, running=0), "b": load("b", 0)}
    assert decide_migration(topology("a", "b"), just_queued, ()) is None
    just_queued["a"] = load("a", 30, 16 * 170, 14, running=2)  # its first requests started
    assert decide_migration(topology("a", "b"), just_queued, ()) == Migration("a", "b", 50)


def test_busy_and_pipelined_instances_are_left_alone():
    loads = {"a": load("a", 95, 16 * 20, 3), "b": load("b", 10), "p": load("p", 0)}
    assert decide_migration(topology("a", "b"), loads, busy={"b"}) is None
    assert decide_migration(topology("a", pipelined=("p",)), loads, ()) is None


class Coordinator:
    """What ``Migrator`` calls: ``migrate`` answers from a script of moved-request counts."""

    def __init__(self, moved: list[int]) -> None:
        self.busy: set[str] = set()
        self.moved, self.calls = moved, 0

    async def migrate(self, source: str, destination: str, blocks: int) -> ReconfigureReply:
        self.calls += 1
        return ReconfigureReply(ok=True, moved_requests=self.moved.pop(0))


async def test_the_migrator_looks_again_at_once_only_after_a_migration_that_moved_nothing():
    """After a move it waits ``interval_s`` (the loads must show it first); when the requests
    it picked all ended during the copy, nothing moved and it decides again at the next look."""
    now = [0.0]
    coordinator = Coordinator(moved=[0, 1, 1])
    migrator = Migrator(coordinator, interval_s=0.5, clock=lambda: now[0])
    short = {"a": load("a", 95, queued_tokens=16 * 20, waiting=3), "b": load("b", 40)}

    async def look() -> None:
        migrator.observe(topology("a", "b"), short, {})
        if migrator.running:
            await migrator._running

    await look()
    assert coordinator.calls == 1  # moved nothing
    await look()
    assert coordinator.calls == 2  # at once; this one moved a request
    now[0] = 0.4
    await look()
    assert coordinator.calls == 2  # within the interval
    now[0] = 0.6
    await look()
    assert coordinator.calls == 3
