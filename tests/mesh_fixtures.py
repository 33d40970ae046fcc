"""Fixtures and helpers for tests that run the mesh against real servers.

Use them from a test module with ``pytest_plugins = ["tests.mesh_fixtures"]`` (one
nats-server and one redis-server per test session, shared by every module that does so).

* ``nats_server`` / ``redis_server``: session-scoped real servers on free ports
  (``kunserve.servers``); ``.url`` is what services take as ``nats_url`` / ``redis_url``.
* ``redis_url``: a freshly flushed Redis database of its own for one test (databases 1..15 in
  turn), so instances registered by other tests are not candidates; db 0 is left alone.
* ``mesh_model_dir``: a tiny random Llama checkpoint (2 layers, hidden 64) made once.
* ``spawn_workers(ids, **settings)``: starts ``python -m kunserve.worker`` processes on those
  servers (the test's ``redis_url``, ``mesh_model_dir``), returned once their load keys are in
  Redis; ``spawn_service("kunserve.router", name)`` starts any other service. Whatever is still
  running at teardown gets SIGTERM.

Use the fixtures rather than importing the helpers below (a module imported before pytest
registers it as a plugin is not assert-rewritten, and pytest warns). Processes a test starts
must be stopped by that test or a fixture of at most module scope: a router left running would
take ``kunserve.generate`` messages meant for later tests.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
import redis
import redis.asyncio as aioredis

from kunserve.protocol import RedisKeys
from kunserve.servers import ServerProcess, start_nats, start_redis

MESH_MODEL = dict(layers=2, hidden_size=64, heads=4, kv_heads=2, intermediate_size=128,
                  vocab_size=512)
_databases = itertools.cycle(range(1, 16))


@pytest.fixture(scope="session")
def nats_server() -> ServerProcess:
    server = start_nats()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> ServerProcess:
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: ServerProcess) -> str:
    url = f"redis://127.0.0.1:{redis_server.port}/{next(_databases)}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture(scope="session")
def mesh_model_dir(tmp_path_factory) -> str:
    from kunserve.tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("mesh-model") / "tiny", **MESH_MODEL))


@pytest.fixture
async def nc(nats_server):
    """A NATS client on this test's server."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
async def rclient(redis_url):
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


def service_env(nats_url: str, redis_url: str, **settings: object) -> dict[str, str]:
    """The environment of a service process: ours plus ``KUNSERVE_*`` settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUNSERVE_")}
    env.update(KUNSERVE_NATS_URL=nats_url, KUNSERVE_REDIS_URL=redis_url, HF_HUB_OFFLINE="1")
    env.update({f"KUNSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


@dataclass
class ServiceProcess:
    """A ``python -m <module>`` child; its output goes to a log file shown on failure."""

    name: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait; SIGKILL after ``timeout``. The exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass
class WorkerProcess(ServiceProcess):
    instance_id: str = ""


def start_service(module: str, name: str, env: dict[str, str],
                  log_dir: Path | None = None) -> ServiceProcess:
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="kunserve-logs-"))
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    return ServiceProcess(name, process, log)


def start_workers(model_dir: str, nats_url: str, redis_url: str, instance_ids: list[str],
                  timeout: float = 60.0, log_dir: Path | None = None,
                  **settings: object) -> list[WorkerProcess]:
    """Start one worker process per id (all at once) and wait until each one's load key is
    in Redis. ``settings``: more ``WorkerSettings`` fields (``memory_per_instance="8MiB"``)."""
    settings = {"threads": 1, "max_num_batched_tokens": 256, "max_num_seqs": 16, **settings}
    workers = []
    for instance_id in instance_ids:
        env = service_env(nats_url, redis_url, model=model_dir, instance_id=instance_id,
                          **settings)
        started = start_service("kunserve.worker", instance_id, env, log_dir)
        workers.append(WorkerProcess(started.name, started.process, started.log_path,
                                     instance_id))
    try:
        for worker in workers:
            wait_for_load(redis_url, worker, timeout)
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    return workers


def wait_for_load(redis_url: str, worker: WorkerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with redis.Redis.from_url(redis_url) as client:
        while not client.exists(RedisKeys.load(worker.instance_id)):
            if worker.process.poll() is not None:
                raise RuntimeError(f"worker {worker.instance_id} exited with "
                                   f"{worker.process.returncode}:\n{worker.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {worker.instance_id} not live after {timeout}s:\n"
                                   f"{worker.log()}")
            time.sleep(0.05)


@pytest.fixture
def spawn_service(nats_server: ServerProcess, redis_url: str, tmp_path: Path):
    """``spawn_service(module, name, **settings)``: a service process on this test's servers."""
    started: list[ServiceProcess] = []

    def spawn(module: str, name: str, **settings: object) -> ServiceProcess:
        env = service_env(nats_server.url, redis_url, **settings)
        started.append(start_service(module, name, env, tmp_path))
        return started[-1]

    yield spawn
    for process in started:
        process.stop()


@pytest.fixture
def spawn_workers(nats_server: ServerProcess, redis_url: str, mesh_model_dir: str,
                  tmp_path: Path):
    """``spawn_workers(instance_ids, **settings)``: live worker processes on this test's
    servers and the mesh model."""
    started: list[WorkerProcess] = []

    def spawn(instance_ids: list[str], **settings: object) -> list[WorkerProcess]:
        workers = start_workers(mesh_model_dir, nats_server.url, redis_url, instance_ids,
                                log_dir=tmp_path, **settings)
        started.extend(workers)
        return workers

    yield spawn
    for worker in started:
        worker.stop()
