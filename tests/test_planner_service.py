"""The real ``python -m kunserve.planner`` process against real nats-server and redis-server:
membership changes published (the pure rules: test_planner_membership.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import nats
import pytest
from redis.asyncio import Redis

from kunserve.planner.membership import solo_instance
from kunserve.protocol import (
    InstanceLoad,
    RedisKeys,
    Subjects,
    Topology,
    decode,
    encode,
)
from kunserve.servers import start_nats, start_redis

NUM_LAYERS = 6

# -- the planner process ------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers():
    nats_server, redis_server = start_nats(), start_redis()
    yield nats_server, redis_server
    nats_server.stop()
    redis_server.stop()


@pytest.fixture
def model_dir(tmp_path):
    """Just the config.json the planner reads the layer count from."""
    config = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": NUM_LAYERS,
              "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.fixture
async def cluster(servers):
    """(redis client, queue of Topology messages seen on NATS), on emptied servers."""
    nats_server, redis_server = servers
    redis = Redis.from_url(redis_server.url)
    await redis.flushall()
    nc = await nats.connect(nats_server.url)
    messages: asyncio.Queue = asyncio.Queue()

    async def on_topology(msg):
        await messages.put((msg.data, decode(msg.data, Topology)))

    await nc.subscribe(Subjects.TOPOLOGY, cb=on_topology)
    await nc.flush()
    yield redis, messages
    await nc.close()
    await redis.aclose()


@pytest.fixture
def run_planner(servers, model_dir, tmp_path):
    started: list[subprocess.Popen] = []

    def run() -> subprocess.Popen:
        nats_server, redis_server = servers
        env = {**os.environ, "KUNSERVE_NATS_URL": nats_server.url,
               "KUNSERVE_REDIS_URL": redis_server.url, "KUNSERVE_MODEL": str(model_dir),
               "KUNSERVE_TOPOLOGY_POLL_INTERVAL": "0.05"}
        log = open(tmp_path / f"planner-{len(started)}.log", "w+")
        process = subprocess.Popen([sys.executable, "-m", "kunserve.planner"], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, text=True)
        process.log = log
        started.append(process)
        return process

    yield run
    for process in started:  # a failed test: no process left behind
        if process.poll() is None:
            process.kill()
            process.wait()


async def write_load(redis: Redis, instance_id: str, ttl_ms: int) -> None:
    """What a worker does: its load hash with an expiry, and its id in the instance set."""
    load = InstanceLoad(instance_id=instance_id, blocks_total=64, blocks_used=3, running=1)
    fields = {k: str(v) for k, v in json.loads(encode(load)).items()}
    async with redis.pipeline() as pipe:
        pipe.hset(RedisKeys.load(instance_id), mapping=fields)
        pipe.pexpire(RedisKeys.load(instance_id), ttl_ms)
        pipe.sadd(RedisKeys.INSTANCES, instance_id)
        await pipe.execute()


async def wait_until_up(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Until the planner logs that it polls (module imports take a while)."""
    for _ in range(int(timeout / 0.05)):
        process.log.seek(0)
        if "planner up" in process.log.read():
            return
        assert process.poll() is None, "the planner exited at start"
        await asyncio.sleep(0.05)
    raise AssertionError("the planner did not come up")


async def next_message(messages: asyncio.Queue, timeout: float = 5.0):
    return await asyncio.wait_for(messages.get(), timeout)


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    process.log.seek(0)
    return process.log.read()


async def test_planner_publishes_each_change_of_live_instances(cluster, run_planner):
    redis, messages = cluster
    planner = run_planner()
    await wait_until_up(planner)
    await write_load(redis, "worker-a", ttl_ms=60_000)
    await write_load(redis, "worker-b", ttl_ms=1_000)

    raw, topology = await next_message(messages)
    assert topology.epoch == 1
    assert topology.instances == [solo_instance("worker-a", NUM_LAYERS),
                                  solo_instance("worker-b", NUM_LAYERS)]
    assert await redis.get(RedisKeys.TOPOLOGY) == raw

    raw, topology = await next_message(messages)  # worker-b's load expires: it died
    assert topology.epoch == 2
    assert [i.instance_id for i in topology.instances] == ["worker-a"]
    assert await redis.get(RedisKeys.TOPOLOGY) == raw
    assert messages.empty()

    log = stop(planner)
    assert "Traceback" not in log


async def test_a_restarted_planner_continues_the_stored_epoch(cluster, run_planner):
    redis, messages = cluster
    stored = Topology(epoch=7, instances=[solo_instance("worker-a", NUM_LAYERS)])
    await redis.set(RedisKeys.TOPOLOGY, encode(stored))
    await write_load(redis, "worker-a", ttl_ms=60_000)
    planner = run_planner()
    await wait_until_up(planner)

    with pytest.raises(TimeoutError):  # same live set as stored: nothing to publish
        await next_message(messages, timeout=0.5)
    await write_load(redis, "worker-b", ttl_ms=60_000)
    _, topology = await next_message(messages)
    assert topology.epoch == 8
    assert [i.instance_id for i in topology.instances] == ["worker-a", "worker-b"]
    stop(planner)
