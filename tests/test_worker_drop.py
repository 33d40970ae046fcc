"""Worker processes on real NATS and Redis obey the planner's control commands: prepare and
commit merge them into a pipeline group while requests stream, restore splits them back, a
failed prepare leaves them solo, and a member killed while pipelined leaves the survivor solo
with every request finishing. This test plays the planner's part itself (hosting the TCPStore,
sending the commands); ``test_mesh_drop.py`` runs the real planner and gateway."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal

import pytest
import torch.distributed as dist

from kunserve.protocol import (
    AbortGroup,
    AbortRequest,
    CommitGroup,
    ControlReply,
    GroupPlan,
    PrepareGroup,
    RestoreGroup,
    Subjects,
    decode,
    encode,
)
from tests.conftest import hf_greedy, make_prompts
from tests.test_worker_server import make_request, read_load, send, wait_for_load

pytest_plugins = ["tests.mesh_fixtures"]

MAX_TOKENS = 40
MIGRATED_TOKENS = 250
LONG_TOKENS = 1500  # streams that outlast a drop and a restore (then aborted: ``stop_after``)
KILLED_TOKENS = 600  # streams still running when a member is killed, served to the end


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=30))


async def command(nc, instance_id: str, message, timeout: float = 60.0) -> ControlReply:
    reply = await nc.request(Subjects.control(instance_id), encode(message), timeout=timeout)
    return decode(reply.data, ControlReply)


async def to_all(nc, ids: list[str], message) -> list[ControlReply]:
    return list(await asyncio.gather(*(command(nc, i, message) for i in ids)))


def plan(store, ids: list[str], epoch: int, timeout_s: float = 20.0) -> GroupPlan:
    return GroupPlan(epoch=epoch, group_id=f"g{epoch}", members=ids, store_host="127.0.0.1",
                     store_port=store.port, timeout_s=timeout_s)


async def drop(nc, ids, group: GroupPlan) -> None:
    replies = await to_all(nc, ids, PrepareGroup(plan=group))
    assert all(r.ok for r in replies), replies
    replies = await to_all(nc, ids, CommitGroup(epoch=group.epoch, group_id=group.group_id))
    assert all(r.ok for r in replies), replies


async def start_streams(nc, ids, prompts, max_tokens: int = MAX_TOKENS):
    streams = [await send(nc, ids[i % len(ids)], make_request(p, max_tokens))
               for i, p in enumerate(prompts)]
    await asyncio.wait_for(asyncio.gather(*(s.got_tokens.wait() for s in streams)), 30)
    return streams


async def stop_after(nc, streams, more: int) -> None:
    """Let every stream get ``more`` tokens past what it has now (or end), then abort it."""
    marks = [len(s.token_ids) for s in streams]
    async with asyncio.timeout(60):
        while not all(s.done.is_set() or len(s.token_ids) >= m + more
                      for s, m in zip(streams, marks, strict=True)):
            await asyncio.sleep(0.01)
    for stream in streams:
        await nc.publish(Subjects.ABORT, encode(AbortRequest(
            request_id=stream.request.request_id)))


async def test_drop_while_streaming_then_restore_keeps_every_token(
        spawn_workers, nc, rclient, store, mesh_model_dir):
    ids = ["w0", "w1"]
    spawn_workers(ids)
    solo = {i: await read_load(rclient, i) for i in ids}
    prompts = make_prompts(4, vocab=500, lengths=[5, 17, 9, 30])
    streams = await start_streams(nc, ids, prompts, LONG_TOKENS)

    group = plan(store, ids, epoch=1)
    await drop(nc, ids, group)
    assert not any(s.done.is_set() for s in streams), "a stream ended before the commit"
    leader = await wait_for_load(rclient, "w0", lambda x: x.state == "pipelined")
    follower = await wait_for_load(rclient, "w1", lambda x: x.state == "pipelined")
    assert (leader.group_id, leader.stage, leader.layer_start, leader.layer_end) == ("g1", 0, 0, 1)
    assert (follower.stage, follower.layer_start, follower.layer_end) == (1, 1, 2)
    assert leader.blocks_total > solo["w0"].blocks_total + solo["w1"].blocks_total
    assert leader.parameter_bytes < solo["w0"].parameter_bytes

    # a follower refuses new requests (the router re-routes); the leader takes them
    refused = await nc.request(Subjects.worker_generate("w1"),
                               encode(make_request(prompts[0], 4)), timeout=5)
    assert refused.data == b"draining"
    late = make_prompts(2, vocab=500, seed=7, lengths=[11, 4])
    streams += [await send(nc, "w0", make_request(p, LONG_TOKENS)) for p in late]
    await asyncio.wait_for(asyncio.gather(*(s.got_tokens.wait() for s in streams[-2:])), 30)

    replies = await to_all(nc, ids, RestoreGroup(epoch=2, group_id="g1"))
    assert all(r.ok for r in replies), replies
    assert not any(s.done.is_set() for s in streams), "a stream ended before the restore"
    restored_at = [len(s.updates) for s in streams]
    for i in ids:
        load = await wait_for_load(rclient, i, lambda x: x.state == "solo")
        assert (load.blocks_total, load.parameter_bytes, load.kv_bytes) == (
            solo[i].blocks_total, solo[i].parameter_bytes, solo[i].kv_bytes)
    await stop_after(nc, streams, more=8)

    for stream, prompt in zip(streams, prompts + late, strict=True):
        updates = await stream.finished(60)
        assert [u.error for u in updates if u.error] == []
        assert updates[-1].finish_reason in ("abort", "length")
        tokens = stream.token_ids  # greedy: the start of transformers' continuation
        assert len(tokens) > 8 and tokens == hf_greedy(mesh_model_dir, prompt, len(tokens))
    # the restore gave the requests back to both members, which streamed them on
    after = {u.instance_id for s, n in zip(streams, restored_at, strict=True)
             for u in s.updates[n:] if u.token_ids}
    assert after == {"w0", "w1"}


async def test_a_prepare_that_cannot_complete_is_aborted_and_everyone_serves_on(
        spawn_workers, nc, rclient, store, mesh_model_dir):
    ids = ["w0", "w1"]
    spawn_workers(ids)
    # a third member that never comes: forming the group times out on both
    group = plan(store, ids + ["ghost"], epoch=1, timeout_s=3.0)
    replies = await to_all(nc, ids, PrepareGroup(plan=group))
    assert not any(r.ok for r in replies) and all("could not form" in r.error for r in replies)
    await to_all(nc, ids, AbortGroup(epoch=1, group_id=group.group_id))
    prompts = make_prompts(2, vocab=500, lengths=[6, 13])
    streams = await start_streams(nc, ids, prompts)
    for stream, prompt in zip(streams, prompts, strict=True):
        await stream.finished(60)
        assert stream.token_ids == hf_greedy(mesh_model_dir, prompt, MAX_TOKENS)
    for i in ids:
        assert (await read_load(rclient, i)).state == "solo"


async def test_a_member_killed_while_pipelined_leaves_the_leader_solo_finishing_everything(
        spawn_workers, nc, rclient, store, mesh_model_dir):
    ids = ["w0", "w1"]
    workers = spawn_workers(ids)
    prompts = make_prompts(4, vocab=500, lengths=[8, 21, 3, 15])
    streams = await start_streams(nc, ids, prompts, KILLED_TOKENS)
    await drop(nc, ids, plan(store, ids, epoch=1))
    assert not any(s.done.is_set() for s in streams), "a stream ended before the kill"
    os.kill(workers[1].process.pid, signal.SIGKILL)
    await wait_for_load(rclient, "w0", lambda x: x.state == "solo", timeout=40)
    for stream, prompt in zip(streams, prompts, strict=True):
        updates = await stream.finished(60)
        assert [u.error for u in updates if u.error] == []
        assert updates[-1].finish_reason == "length"
        assert stream.token_ids == hf_greedy(mesh_model_dir, prompt, KILLED_TOKENS)


async def test_a_leader_killed_after_the_commit_leaves_the_member_saying_what_it_lost(
        spawn_workers, nc, rclient, store, mesh_model_dir):
    """w1 handed its requests to the leader w0 at the commit; w0 dies at once. w1 falls back
    to solo and tells the gateway, request by request, that it lost them (``lost``: the
    gateway resubmits those it still attributes to w1), then serves new requests solo."""
    ids = ["w0", "w1"]
    workers = spawn_workers(ids)
    prompts = make_prompts(4, vocab=500, lengths=[8, 21, 3, 15])
    streams = await start_streams(nc, ids, prompts, LONG_TOKENS)  # w0, w1, w0, w1
    await drop(nc, ids, plan(store, ids, epoch=1))
    os.kill(workers[0].process.pid, signal.SIGKILL)
    await wait_for_load(rclient, "w1", lambda x: x.state == "solo", timeout=40)
    on_w1 = streams[1::2]
    async with asyncio.timeout(30):
        while not all(any(u.lost for u in s.updates) for s in on_w1):
            await asyncio.sleep(0.05)
    for stream in on_w1:
        lost = [u for u in stream.updates if u.lost]
        assert [u.instance_id for u in lost] == ["w1"] and not lost[0].finished
    assert not any(u.lost for s in streams[0::2] for u in s.updates)  # w0's own: not w1's
    stream = await send(nc, "w1", make_request(prompts[0], MAX_TOKENS))
    await stream.finished(60)
    assert stream.token_ids == hf_greedy(mesh_model_dir, prompts[0], MAX_TOKENS)


async def test_migration_moves_running_requests_with_their_kv(
        spawn_workers, nc, rclient, store, mesh_model_dir):
    """The llumnix policy's mechanism: w0's running requests go to the idle w1 with their KV
    and progress, mid-stream, and finish there token-exact."""
    from kunserve.protocol import MigrateRequests

    ids = ["w0", "w1"]
    spawn_workers(ids)
    prompts = make_prompts(3, vocab=500, lengths=[7, 19, 12])
    # long enough to be running still once the copy is done: a request that ends during the
    # copy stays with its instance
    streams = await start_streams(nc, ["w0"], prompts, max_tokens=MIGRATED_TOKENS)
    group = plan(store, ids, epoch=1)
    replies = await to_all(nc, ids, PrepareGroup(plan=group))
    assert all(r.ok for r in replies), replies
    replies = await to_all(nc, ids, MigrateRequests(epoch=1, group_id=group.group_id,
                                                    blocks=1000))
    assert all(r.ok for r in replies), replies
    assert replies[0].figures["requests"] == 3  # the source says what it moved (the planner
    assert replies[0].figures["stop"] > 0       # counts it), and its phases
    for stream, prompt in zip(streams, prompts, strict=True):
        updates = await stream.finished(60)
        assert [u.error for u in updates if u.error] == []
        assert stream.token_ids == hf_greedy(mesh_model_dir, prompt, MIGRATED_TOKENS)
        assert updates[-1].instance_id == "w1"  # finished where it moved
    load = await wait_for_load(rclient, "w0", lambda x: x.blocks_used == 0)
    assert load.state == "solo"
