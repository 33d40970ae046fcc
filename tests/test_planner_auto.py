"""The automatic planner inside the real planner service (real nats-server and redis-server,
fake workers that answer the control commands and report the loads a test sets): it drops by
itself under an overload and restores by itself when calm, records each reconfiguration in the
ledger's ``plans`` table and in the counters ``/metrics`` exports, backs off after failed drops,
and spans each reconfiguration with its phases."""

from __future__ import annotations

import asyncio
import time

import msgspec
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kunserve.ledger import PlanLedger
from kunserve.planner.reconfiguration_recorder import ReconfigurationRecorder
from kunserve.protocol import (
    PlannerStats,
    PrepareGroup,
    ReconfigureReply,
    RedisKeys,
    RestoreGroup,
    Topology,
)
from tests import test_planner_reconfigure as reconfigure

pytest_plugins = ["tests.mesh_fixtures"]
mesh = reconfigure.mesh  # the fixture: fake workers and the planner on real servers
entries = reconfigure.entries

KIB = 1024
SOLO_BLOCKS = 24
MEMORY = dict(block_size=16, blocks_total=SOLO_BLOCKS, kv_bytes=SOLO_BLOCKS * 16 * KIB,
              budget_bytes=854 * KIB + 6 * KIB * KIB + SOLO_BLOCKS * 16 * KIB,
              reserve_bytes=6 * KIB * KIB, parameter_bytes=854 * KIB)
OVERLOADED = dict(blocks_used=SOLO_BLOCKS, running=6, waiting=4, queued_tokens=160)
IDLE = dict(blocks_used=0, running=0, waiting=0, queued_tokens=0)
FAST = dict(overload_window=0.2, restore_window=0.5)


async def stats(redis) -> PlannerStats:
    return msgspec.convert(await redis.hgetall(RedisKeys.PLANNER_STATS), PlannerStats,
                           strict=False)


async def test_an_overload_drops_by_itself_and_calm_restores_it(mesh, tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    workers = await mesh.add_workers("w0", "w1")
    for worker in workers:
        worker.report(**MEMORY, **IDLE)
    await mesh.start_planner(num_layers=4, database_url=url, **FAST)
    start = (await mesh.stored()).epoch
    await asyncio.sleep(1.0)  # idle: nothing happens
    assert mesh.since(start) == []

    overloaded_at = time.monotonic()
    for worker in workers:
        worker.report(**OVERLOADED)
    pipelined = await mesh.wait_for(
        lambda t: {i.state for i in t.instances} == {"pipelined"}, timeout=10)
    (prepared_at, prepare), = [c for c in workers[0].commands if isinstance(c[1], PrepareGroup)]
    assert prepared_at - overloaded_at < 0.2 + 1.0  # the window, plus a few refreshes
    group = pipelined.instances[0].group_id
    assert sorted(prepare.plan.members) == ["w0", "w1"]

    # pipelined and still busy: it stays; then calm for the window: restored by itself
    await asyncio.sleep(1.0)
    assert all(not w.received(RestoreGroup) for w in workers)
    for worker in workers:
        worker.report(**IDLE)
    back = await mesh.wait_for(lambda t: t.epoch > pipelined.epoch and {
        i.state for i in t.instances} == {"solo"}, timeout=10)
    assert [w.received(RestoreGroup)[0].group_id for w in workers] == [group, group]

    # exactly one drop and one restore, each recorded
    await asyncio.sleep(1.0)
    assert [t.epoch for t in mesh.since(start)] == list(range(start + 1, back.epoch + 1))
    assert len(mesh.since(start)) == 4  # preparing, pipelined, restoring, solo
    counted = await stats(mesh.redis)
    assert (counted.drops_ok, counted.restores_ok, counted.plans) == (1, 1, 1)
    assert 0 < counted.plan_seconds_sum < 0.1
    await mesh.stop_planner()
    ledger = PlanLedger(url)
    rows = await ledger.plans()
    await ledger.close()
    assert [(r["action"], r["trigger"], r["outcome"], r["group_id"]) for r in rows] == [
        ("drop", "auto", "ok", group), ("restore", "auto", "ok", group)]
    drop, restore = rows
    assert drop["epoch"] == pipelined.epoch and restore["epoch"] == back.epoch
    assert sorted(drop["members"]) == ["w0", "w1"]
    assert drop["groups_before"] == [["w0"], ["w1"]]
    assert sorted(map(sorted, drop["groups_after"])) == [["w0", "w1"]]
    assert set(drop["phase_seconds"]) == {"prepare", "commit"}
    assert set(restore["phase_seconds"]) == {"restore"}
    assert drop["figures"]["overloaded"] == ["w0", "w1"]
    assert drop["figures"]["need_tokens"] == 2 * 10 * 16  # ceil(160/16) blocks each, none free
    assert drop["plan_seconds"] > 0
    assert restore["figures"]["calm"] == [group]


async def test_a_failing_drop_backs_off_instead_of_retrying_in_a_loop(mesh):
    workers = await mesh.add_workers("w0", "w1", answers={"prepare": "fail"})
    for worker in workers:
        worker.report(**MEMORY, **OVERLOADED)
    await mesh.start_planner(num_layers=4, overload_window=0.1, drop_retry_backoff=1.0)

    def prepares() -> list[float]:
        return [t for t, c in workers[0].commands if isinstance(c, PrepareGroup)]

    async with asyncio.timeout(10):  # the first after the overload window (~0.1 s)
        while not prepares():
            await asyncio.sleep(0.01)
    # the next 1 s after it failed, the third not before 2 s after that: look in between
    await asyncio.sleep(max(0.0, prepares()[0] + 2.5 - time.monotonic()))
    prepares = prepares()
    assert len(prepares) == 2, prepares
    assert prepares[1] - prepares[0] >= 1.0
    counted = await stats(mesh.redis)
    assert (counted.drops_ok, counted.drops_failed) == (0, 2)
    assert {s[0] for s in entries(await mesh.stored()).values()} == {"solo"}


async def test_an_operator_group_is_left_to_the_operator(mesh):
    workers = await mesh.add_workers("w0", "w1")
    for worker in workers:
        worker.report(**MEMORY, **IDLE)
    await mesh.start_planner(num_layers=4, **FAST)
    dropped = await mesh.reconfigure(action="drop")
    assert dropped.ok, dropped.error
    await asyncio.sleep(1.5)  # calm for three windows
    assert all(not w.received(RestoreGroup) for w in workers)
    counted = await stats(mesh.redis)
    assert (counted.drops_ok, counted.plans) == (1, 0)  # admin drops count too


async def test_with_auto_drop_off_an_overload_changes_nothing(mesh):
    workers = await mesh.add_workers("w0", "w1")
    for worker in workers:
        worker.report(**MEMORY, **OVERLOADED)
    await mesh.start_planner(num_layers=4, auto_drop=False, overload_window=0.1)
    start = (await mesh.stored()).epoch
    await asyncio.sleep(1.0)
    assert mesh.since(start) == [] and all(w.commands == [] for w in workers)


class _Topology:
    def __init__(self, *states: Topology) -> None:
        self.states = list(states)

    @property
    def current(self) -> Topology:
        return self.states[0]


async def test_each_reconfiguration_is_a_span_with_its_phases():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    recorder = ReconfigurationRecorder(_Topology(Topology()),
                                       tracer=provider.get_tracer("test"))

    async def drop() -> ReconfigureReply:
        return ReconfigureReply(ok=True, epoch=7, group="g6",
                                phase_seconds={"prepare": 0.25, "commit": 1.5})

    async def refused() -> ReconfigureReply:
        return ReconfigureReply(ok=False, status=409, error="busy")

    await recorder.recorded("drop", "auto", drop, members=["w0", "w1"])
    await recorder.recorded("restore", "admin", refused)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"planner.drop", "planner.drop.prepare", "planner.drop.commit",
                          "planner.restore"}
    parent, prepare, commit = (spans[n] for n in ("planner.drop", "planner.drop.prepare",
                                                   "planner.drop.commit"))
    assert prepare.parent.span_id == commit.parent.span_id == parent.context.span_id
    assert parent.attributes["kunserve.group"] == "g6"
    assert parent.attributes["kunserve.trigger"] == "auto"
    assert (prepare.end_time - prepare.start_time) / 1e9 == 0.25
    assert commit.start_time == prepare.end_time
    assert (commit.end_time - commit.start_time) / 1e9 == 1.5
    assert not spans["planner.restore"].status.is_ok


def test_the_gateway_exports_the_planner_counters():
    from prometheus_client import CollectorRegistry, generate_latest

    from kunserve.gateway.metrics import ClusterCollector

    registry, collector = CollectorRegistry(), ClusterCollector("m")
    registry.register(collector)
    collector.update([], 9, PlannerStats(drops_ok=2, drops_failed=1, restores_ok=2, plans=3,
                                         plan_seconds_sum=0.0006))
    text = generate_latest(registry).decode()
    for sample in ['kunserve:drops_total{outcome="ok"} 2.0',
                   'kunserve:drops_total{outcome="failed"} 1.0',
                   'kunserve:restores_total{outcome="ok"} 2.0',
                   'kunserve:restores_total{outcome="failed"} 0.0',
                   "kunserve:plan_seconds_count 3.0", "kunserve:plan_seconds_sum 0.0006"]:
        assert sample in text, text


async def test_a_migration_counts_the_requests_it_moved(rclient):
    """The recorder adds each migration's moved requests to the planner's counters in Redis
    (a refusal moves none); the gateway reads them back and exports them."""
    from prometheus_client import CollectorRegistry, generate_latest

    from kunserve.gateway.cluster_view import ClusterView
    from kunserve.gateway.metrics import ClusterCollector

    recorder = ReconfigurationRecorder(_Topology(Topology()), redis=rclient)
    for moved in (3, 0, 2):
        async def migrate(moved=moved) -> ReconfigureReply:
            return ReconfigureReply(ok=True, epoch=1, group="migrate-x", moved_requests=moved,
                                    phase_seconds={"prepare": 0.01, "migrate": 0.2})

        await recorder.recorded("migration", "auto", migrate, members=["w0", "w1"])
    stats = await ClusterView(rclient).planner_stats()
    assert (stats.migrations_ok, stats.migrated_requests) == (3, 5)
    registry, collector = CollectorRegistry(), ClusterCollector("m")
    registry.register(collector)
    collector.update([], 1, stats)
    assert "kunserve:migrated_requests_total 5.0" in generate_latest(registry).decode()
