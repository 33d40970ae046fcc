"""The worker's load key on a real Redis: it appears only once the writer is opened (the
worker opens it after its NATS subscriptions are in place), with the newest load submitted
before; the key tells the router the instance takes requests."""

from __future__ import annotations

import asyncio

import pytest

from kunserve.protocol import InstanceLoad, RedisKeys
from kunserve.reservations import Reservations
from kunserve.worker.load_writer import LoadReport, LoadWriter

pytest_plugins = ["tests.mesh_fixtures"]


def report(running: int) -> LoadReport:
    return LoadReport(InstanceLoad(instance_id="w9", running=running), 0, 0)


async def test_no_load_key_before_the_writer_is_opened(rclient):
    written = asyncio.Event()
    writer = LoadWriter(rclient, Reservations(rclient), "w9", 5000, written.set)
    writer.submit(report(1))
    writer.submit(report(2))
    await asyncio.sleep(0.2)  # ample for a write, had one started
    assert not written.is_set()
    assert not await rclient.exists(RedisKeys.load("w9"))
    writer.open()
    await asyncio.wait_for(written.wait(), 10)
    await writer.close()
    assert await rclient.hget(RedisKeys.load("w9"), "running") == b"2"  # the newest
    assert await rclient.sismember(RedisKeys.INSTANCES, "w9")


@pytest.fixture(autouse=True)
async def _clean(rclient):
    yield
    await rclient.delete(RedisKeys.load("w9"))
    await rclient.srem(RedisKeys.INSTANCES, "w9")
