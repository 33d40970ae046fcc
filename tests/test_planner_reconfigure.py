"""The planner's two-phase reconfiguration against real nats-server and redis-server.

The planner runs in this process (``serve``, as ``python -m kunserve.planner`` does); the
workers are stand-ins: each keeps a load hash alive in Redis and answers the control commands
on ``Subjects.control(id)`` as a test tells it to (ok, fail, stay silent, answer late), and
reports in its load what a worker reports after each command. What is checked is what others
rely on: the replies to ``Reconfigure``, the commands each member got, and the topologies the
planner published (NATS messages and the Redis key).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import nats
import pytest
import torch.distributed as dist
from redis.asyncio import Redis

from kunserve.planner.service import serve
from kunserve.planner.settings import PlannerSettings
from kunserve.protocol import (
    AbortGroup,
    CommitGroup,
    ControlCommand,
    ControlReply,
    GroupPlan,
    InstanceLoad,
    PrepareGroup,
    Reconfigure,
    ReconfigureReply,
    RedisKeys,
    RestoreGroup,
    Subjects,
    Topology,
    decode,
    encode,
)

pytest_plugins = ["tests.mesh_fixtures"]

LIVENESS_TTL_MS = 500


@dataclass
class FakeWorker:
    """A worker as the planner sees it. ``answers``: phase (prepare, commit, abort, restore)
    -> "ok" | "fail" | "silent"; ``delays``: phase -> seconds before answering."""

    instance_id: str
    nc: nats.NATS
    redis: Redis
    answers: dict[str, str] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    commands: list[tuple[float, ControlCommand]] = field(default_factory=list)  # (when, what)
    load: InstanceLoad | None = None  # what the next refresh writes
    plan: GroupPlan | None = None  # the last prepare's

    async def start(self) -> None:
        self.load = InstanceLoad(instance_id=self.instance_id, group_id=self.instance_id)
        self._subscription = await self.nc.subscribe(Subjects.control(self.instance_id),
                                                     cb=self._on_command)
        await self._write_load()
        self._refresh = asyncio.create_task(self._keep_alive())
        self._answering: set[asyncio.Task] = set()

    async def die(self) -> None:
        """Stop answering and refreshing: the load key expires within the TTL."""
        self._refresh.cancel()
        await self._subscription.unsubscribe()

    def received(self, kind: type) -> list:
        return [command for _, command in self.commands if isinstance(command, kind)]

    def report(self, **fields) -> None:
        """What the load says from the next refresh on (state, group_id, stage, ...)."""
        self.load = msgspec.structs.replace(self.load, **fields)

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            await self._write_load()

    async def _write_load(self) -> None:
        key = RedisKeys.load(self.instance_id)
        fields = {k: str(v) for k, v in json.loads(encode(self.load)).items()}
        async with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping=fields)
            pipe.pexpire(key, LIVENESS_TTL_MS)
            pipe.sadd(RedisKeys.INSTANCES, self.instance_id)
            await pipe.execute()

    async def _on_command(self, msg) -> None:
        command = decode(msg.data, ControlCommand)
        self.commands.append((time.monotonic(), command))
        task = asyncio.create_task(self._answer(msg, command))  # a late answer blocks nothing
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, msg, command: ControlCommand) -> None:
        phase = {PrepareGroup: "prepare", CommitGroup: "commit", AbortGroup: "abort",
                 RestoreGroup: "restore"}[type(command)]
        await asyncio.sleep(self.delays.get(phase, 0.0))
        answer = self.answers.get(phase, "ok")
        if answer == "silent":
            return
        if answer == "ok":
            self._act(command)
        error = None if answer == "ok" else f"{phase} failed on purpose"
        reply = ControlReply(instance_id=self.instance_id, ok=answer == "ok", error=error)
        await msg.respond(encode(reply))

    def _act(self, command: ControlCommand) -> None:
        if isinstance(command, PrepareGroup):
            self.plan = command.plan
        elif isinstance(command, CommitGroup):
            self.report(state="pipelined", group_id=command.group_id,
                        stage=self.plan.members.index(self.instance_id))
        else:  # abort, restore: solo again
            self.report(state="solo", group_id=self.instance_id, stage=0)


class Mesh:
    """NATS and Redis of one test, the topologies the planner publishes, fake workers and an
    in-process planner."""

    def __init__(self, nc: nats.NATS, redis: Redis, nats_url: str, redis_url: str,
                 tmp_path) -> None:
        self.nc, self.redis = nc, redis
        self.nats_url, self.redis_url, self.tmp_path = nats_url, redis_url, tmp_path
        self.topologies: list[Topology] = []
        self.workers: dict[str, FakeWorker] = {}
        self._planner: tuple[asyncio.Event, asyncio.Task] | None = None

    async def add_workers(self, *ids: str, **behaviour) -> list[FakeWorker]:
        workers = [FakeWorker(i, self.nc, self.redis, **behaviour) for i in ids]
        for worker in workers:
            await worker.start()
            self.workers[worker.instance_id] = worker
        return workers

    async def start_planner(self, num_layers: int, **settings) -> None:
        """The planner on a model of ``num_layers`` layers; returns once it published a
        topology with every fake worker in it."""
        model = self.tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({
            "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": num_layers,
            "num_attention_heads": 4, "num_key_value_heads": 2}))
        planner_settings = PlannerSettings(nats_url=self.nats_url, redis_url=self.redis_url,
                                           model=str(model), topology_poll_interval=0.05,
                                           **settings)
        stop = asyncio.Event()
        self._planner = (stop, asyncio.create_task(serve(planner_settings, stop)))
        await self.wait_for(lambda t: {i.instance_id for i in t.instances} == set(self.workers))

    async def stop_planner(self) -> None:
        if self._planner is not None:
            stop, task = self._planner
            stop.set()
            await asyncio.wait_for(task, 30)

    async def reconfigure(self, timeout: float = 30.0, **request) -> ReconfigureReply:
        msg = await self.nc.request(Subjects.RECONFIGURE, encode(Reconfigure(**request)),
                                    timeout=timeout)
        return decode(msg.data, ReconfigureReply)

    async def wait_for(self, condition: Callable[[Topology], bool],
                       timeout: float = 10.0) -> Topology:
        """The first published topology meeting ``condition`` (waiting for it if need be)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for topology in self.topologies:
                if condition(topology):
                    return topology
            await asyncio.sleep(0.02)
        raise AssertionError(f"no such topology; published: {self.topologies}")

    def since(self, epoch: int) -> list[Topology]:
        return [t for t in self.topologies if t.epoch > epoch]

    async def stored(self) -> Topology:
        return decode(await self.redis.get(RedisKeys.TOPOLOGY), Topology)


@pytest.fixture
async def mesh(nats_server, redis_url, tmp_path):
    nc = await nats.connect(nats_server.url)
    redis = Redis.from_url(redis_url, decode_responses=True)
    mesh = Mesh(nc, redis, nats_server.url, redis_url, tmp_path)

    async def on_topology(msg):
        mesh.topologies.append(decode(msg.data, Topology))

    await nc.subscribe(Subjects.TOPOLOGY, cb=on_topology)
    await nc.flush()
    yield mesh
    await mesh.stop_planner()
    for worker in mesh.workers.values():
        worker._refresh.cancel()
    await nc.close()
    await redis.aclose()


def entries(topology: Topology) -> dict[str, tuple]:
    """instance -> (state, group, stage, first layer, end layer)."""
    return {i.instance_id: (i.state, i.group_id, i.stage, i.layer_start, i.layer_end)
            for i in topology.instances}


def solo(*ids: str, layers: int) -> dict[str, tuple]:
    return {i: ("solo", i, 0, 0, layers) for i in ids}


# -- drop ------------------------------------------------------------------------------------


async def test_a_drop_prepares_then_commits_and_publishes_the_stages(mesh):
    """5 layers over 2 stages (not divisible): stage 0 takes the extra layer."""
    w1, w2, w3 = await mesh.add_workers("w1", "w2", "w3")
    await mesh.start_planner(num_layers=5)
    start = (await mesh.stored()).epoch

    reply = await mesh.reconfigure(action="drop", instances=["w3", "w1"])

    assert reply.ok and reply.status == 200, reply.error
    e = start + 1
    assert reply.group == f"g{e}" and reply.epoch == e + 1
    assert set(reply.phase_seconds) == {"prepare", "commit"}
    preparing, pipelined = mesh.since(start)
    assert preparing.epoch == e and entries(preparing) == {
        "w1": ("preparing", f"g{e}", 0, 0, 5), "w2": ("solo", "w2", 0, 0, 5),
        "w3": ("preparing", f"g{e}", 0, 0, 5)}
    assert pipelined.epoch == e + 1 and entries(pipelined) == {
        "w1": ("pipelined", f"g{e}", 1, 3, 5), "w2": ("solo", "w2", 0, 0, 5),
        "w3": ("pipelined", f"g{e}", 0, 0, 3)}
    assert await mesh.stored() == pipelined

    # both members got the same plan at about the same time, then the commit; w2 nothing
    (t1, prepare1), (t3, prepare3) = w1.commands[0], w3.commands[0]
    assert prepare1 == prepare3 and abs(t1 - t3) < 0.5
    plan = prepare1.plan
    assert (plan.epoch, plan.group_id, plan.members) == (e, f"g{e}", ["w3", "w1"])
    assert w1.received(CommitGroup) == w3.received(CommitGroup) == \
        [CommitGroup(epoch=e, group_id=f"g{e}")]
    assert w2.commands == []

    # the plan's store takes clients: what the members build their process group on
    def use_store() -> bytes:
        client = dist.TCPStore(plan.store_host, plan.store_port, is_master=False,
                               timeout=datetime.timedelta(seconds=10))
        client.set("epoch-check", "ok")
        return client.get("epoch-check")

    assert await asyncio.to_thread(use_store) == b"ok"

    # loads that still say solo, then say pipelined, leave the group alone
    await asyncio.sleep(0.5)
    assert mesh.since(start) == [preparing, pipelined]


async def test_a_drop_of_every_live_instance_and_its_restore(mesh):
    workers = await mesh.add_workers("w1", "w2", "w3")
    await mesh.start_planner(num_layers=5)
    start = (await mesh.stored()).epoch

    dropped = await mesh.reconfigure(action="drop")
    assert dropped.ok, dropped.error
    pipelined = mesh.since(start)[-1]
    assert entries(pipelined) == {"w1": ("pipelined", dropped.group, 0, 0, 2),
                                  "w2": ("pipelined", dropped.group, 1, 2, 4),
                                  "w3": ("pipelined", dropped.group, 2, 4, 5)}

    restored = await mesh.reconfigure(action="restore", group=dropped.group)

    assert restored.ok and restored.group == dropped.group, restored.error
    assert set(restored.phase_seconds) == {"restore"}
    restoring, back = mesh.since(pipelined.epoch)
    assert restoring.epoch == pipelined.epoch + 1
    assert {s[0] for s in entries(restoring).values()} == {"restoring"}
    assert entries(restoring)["w3"][2:] == (2, 4, 5)  # still holds its stage while restoring
    assert back.epoch == restored.epoch == restoring.epoch + 1
    assert entries(back) == solo("w1", "w2", "w3", layers=5)
    for worker in workers:
        assert worker.received(RestoreGroup) == [RestoreGroup(epoch=restoring.epoch,
                                                              group_id=dropped.group)]

    again = await mesh.reconfigure(action="restore", group=dropped.group)
    assert (again.ok, again.status) == (False, 400) and "unknown group" in again.error


# -- failures --------------------------------------------------------------------------------


async def test_a_member_failing_prepare_aborts_everyone_and_they_stay_solo(mesh):
    w1, w2, w3 = await mesh.add_workers("w1", "w2", "w3")
    w2.answers["prepare"] = "fail"
    await mesh.start_planner(num_layers=4)
    start = (await mesh.stored()).epoch

    reply = await mesh.reconfigure(action="drop", instances=["w1", "w2", "w3"])

    assert (reply.ok, reply.status) == (False, 503)
    assert reply.error == "prepare failed: w2: prepare failed on purpose"
    assert set(reply.phase_seconds) == {"prepare"}
    preparing, aborted = mesh.since(start)
    assert {s[0] for s in entries(preparing).values()} == {"preparing"}
    assert aborted.epoch == reply.epoch == start + 2
    assert entries(aborted) == solo("w1", "w2", "w3", layers=4)
    for worker in (w1, w2, w3):
        assert [type(c) for _, c in worker.commands] == [PrepareGroup, AbortGroup]
        assert worker.received(AbortGroup)[0].epoch == start + 1


async def test_a_member_silent_past_the_prepare_timeout_aborts_the_drop(mesh):
    w1, w2 = await mesh.add_workers("w1", "w2")
    w2.answers["prepare"] = "silent"
    await mesh.start_planner(num_layers=4, prepare_timeout=0.5)
    start = (await mesh.stored()).epoch

    reply = await mesh.reconfigure(action="drop", instances=["w1", "w2"])

    assert (reply.ok, reply.status) == (False, 503)
    assert reply.error.startswith("prepare failed: w2: no answer within")
    assert 0.5 <= reply.phase_seconds["prepare"] < 10
    assert w1.received(PrepareGroup)[0].plan.timeout_s == 0.5
    assert len(w1.received(AbortGroup)) == len(w2.received(AbortGroup)) == 1
    assert w1.received(CommitGroup) == []
    assert entries(mesh.since(start)[-1]) == solo("w1", "w2", layers=4)


async def test_a_failed_commit_publishes_the_members_solo(mesh):
    w1, w2 = await mesh.add_workers("w1", "w2")
    w1.answers["commit"] = "fail"
    await mesh.start_planner(num_layers=4)
    start = (await mesh.stored()).epoch

    reply = await mesh.reconfigure(action="drop", instances=["w1", "w2"])

    assert (reply.ok, reply.status) == (False, 503)
    assert reply.error == "commit failed: w1: commit failed on purpose"
    assert set(reply.phase_seconds) == {"prepare", "commit"}
    assert [t.epoch for t in mesh.since(start)] == [start + 1, start + 2] == \
        [start + 1, reply.epoch]
    assert entries(mesh.since(start)[-1]) == solo("w1", "w2", layers=4)


async def test_a_failed_restore_still_publishes_the_members_solo(mesh):
    w1, w2 = await mesh.add_workers("w1", "w2")
    w2.answers["restore"] = "fail"
    await mesh.start_planner(num_layers=4)
    dropped = await mesh.reconfigure(action="drop", instances=["w1", "w2"])

    reply = await mesh.reconfigure(action="restore", group=dropped.group)

    assert (reply.ok, reply.status) == (False, 503)
    assert reply.error == "restore failed: w2: restore failed on purpose"
    assert reply.epoch == dropped.epoch + 2
    assert entries(await mesh.stored()) == solo("w1", "w2", layers=4)


# -- requests refused, and concurrent ones ---------------------------------------------------


async def test_requests_that_cannot_work_are_400(mesh):
    await mesh.add_workers("w1", "w2", "w3")
    await mesh.start_planner(num_layers=2)

    for request, error in [
        (dict(action="drop", instances=["w1", "w9"]), "unknown or not live instances: w9"),
        (dict(action="drop", instances=["w1"]), "a drop needs at least 2 instances, got 1"),
        (dict(action="drop"), "cannot split the model's 2 layers over 3 instances"),
        (dict(action="restore", group="g42"), "unknown group g42"),
        (dict(action="split"), "unknown action 'split'"),
    ]:
        reply = await mesh.reconfigure(**request)
        assert (reply.ok, reply.status) == (False, 400), request
        assert error in reply.error
    msg = await mesh.nc.request(Subjects.RECONFIGURE, b"{not json", timeout=10)
    assert decode(msg.data, ReconfigureReply).status == 400
    assert all(w.commands == [] for w in mesh.workers.values())


async def test_reconfigurations_of_other_instances_run_concurrently_the_same_ones_are_409(mesh):
    w1, w2, w3, w4 = await mesh.add_workers("w1", "w2", "w3", "w4")
    w1.delays["prepare"] = 2.0  # the other drop must be done well within it
    await mesh.start_planner(num_layers=4)

    slow = asyncio.create_task(mesh.reconfigure(action="drop", instances=["w1", "w2"]))
    await mesh.wait_for(lambda t: entries(t)["w1"][0] == "preparing")
    overlapping = await mesh.reconfigure(action="drop", instances=["w3", "w2"])
    assert (overlapping.status, overlapping.error) == (409, "instance w2 is being reconfigured")
    other = await mesh.reconfigure(action="drop", instances=["w3", "w4"])
    assert other.ok, other.error
    assert not slow.done()  # w1 is still preparing: the other group did not wait for it

    first = await slow
    assert first.ok, first.error
    stored = entries(await mesh.stored())
    assert stored["w1"][:3] == ("pipelined", first.group, 0)
    assert stored["w4"][:3] == ("pipelined", other.group, 1)
    taken = await mesh.reconfigure(action="drop", instances=["w1", "w3"])
    assert (taken.status, taken.error) == (409, f"instance w1 is already in group {first.group} "
                                                "(pipelined)")


# -- membership with groups ------------------------------------------------------------------


async def test_a_member_whose_load_expires_leaves_the_survivors_solo(mesh):
    w1, w2, w3 = await mesh.add_workers("w1", "w2", "w3")
    await mesh.start_planner(num_layers=4)
    dropped = await mesh.reconfigure(action="drop", instances=["w1", "w2"])
    assert dropped.ok, dropped.error

    await w2.die()

    after = await mesh.wait_for(lambda t: t.epoch > dropped.epoch)
    assert after.epoch == dropped.epoch + 1
    assert entries(after) == solo("w1", "w3", layers=4)


async def test_a_member_that_fell_back_to_solo_breaks_its_group(mesh):
    w1, w2, w3 = await mesh.add_workers("w1", "w2", "w3")
    await mesh.start_planner(num_layers=4)
    dropped = await mesh.reconfigure(action="drop", instances=["w1", "w2"])
    await asyncio.sleep(0.4)  # the loads say pipelined by now
    assert (await mesh.stored()).epoch == dropped.epoch

    w1.report(state="solo", group_id="w1", stage=0)  # w2's link broke; w1 serves solo

    after = await mesh.wait_for(lambda t: t.epoch > dropped.epoch)
    assert entries(after) == solo("w1", "w2", "w3", layers=4)
