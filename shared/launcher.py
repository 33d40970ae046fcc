"""``kunserve up``: the whole mesh on one machine as local processes (no Docker).

Start: nats-server and redis-server on free loopback ports (unless ``KUNSERVE_NATS_URL`` /
``KUNSERVE_REDIS_URL`` name running ones), the model (``--model``, else the embedded tiny
Llama, built once into the cache), then planner, router, N workers and the gateway, each a
``python -m kunserve.<role>`` child configured by ``KUNSERVE_*`` variables and logging to a
file in the state directory. Ready when every worker's load key is in Redis, the planner's
topology lists them all and the gateway's ``GET /health`` answers 200.

Stop (Ctrl-C or SIGTERM): gateway first (it drains in-flight requests), then router, workers,
planner, servers. Each gets SIGTERM on its process group, SIGKILL after a timeout (at once on
a second Ctrl-C). Every child runs in its own process group, so Ctrl-C in a terminal reaches
only the launcher, which then stops the children in that order.

Where its job ends: it starts, watches and stops processes; it serves nothing itself.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx
import redis
from pydantic_settings import BaseSettings, SettingsConfigDict

from kunserve.policies import DEFAULT_POLICY, get_policy
from kunserve.protocol import RedisKeys, Topology, decode
from kunserve.servers import ServerError, ServerProcess, free_port, start_nats, start_redis

TINY_MODEL_NAME = "tiny-llama"
#: make_tiny_model arguments of the embedded model: a bit larger than its defaults.
TINY_MODEL = dict(arch="llama", layers=4, hidden_size=256, heads=4, kv_heads=2,
                  intermediate_size=704, vocab_size=1024, seed=0)
STOP_ORDER = ("gateway", "router", "worker", "planner")
READY_PREFIX = "kunserve ready:"  # the line that says the stack serves (scripts wait for it)
_TAIL_LINES = 20


class LauncherSettings(BaseSettings):
    """What ``kunserve up`` takes from the environment (flags win over these)."""

    model_config = SettingsConfigDict(env_prefix="KUNSERVE_", extra="ignore")

    model: str | None = None
    nats_url: str | None = None  # set: use that server instead of starting one
    redis_url: str | None = None
    database_url: str | None = None
    admin_token: str | None = None
    policy: str = DEFAULT_POLICY
    cache_dir: Path = Path("~/.cache/kunserve")
    state_dir: Path = Path("~/.local/state/kunserve")


@dataclass
class UpConfig:
    model: str | None  # None: the embedded tiny model, built into cache_dir
    instances: int
    host: str
    port: int
    threads_per_worker: int
    memory_per_instance: int | None  # bytes; None: the worker's default
    database_url: str
    admin_token: str
    admin_token_generated: bool
    cache_dir: Path
    state_dir: Path
    nats_url: str | None = None
    redis_url: str | None = None
    policy: str = DEFAULT_POLICY  # policies.py: how the cluster answers a KV burst
    startup_timeout: float = 600.0
    drain_timeout: float = 30.0  # the gateway's, to finish in-flight requests
    stop_timeout: float = 10.0  # every other child's

    @property
    def url(self) -> str:
        return _http_url(self.host, self.port)

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs" / f"port-{self.port}"


def up_config(*, model: str | None = None, instances: int = 2, host: str = "127.0.0.1",
              port: int = 8000, memory_per_instance: int | None = None,
              threads_per_worker: int | None = None, startup_timeout: float = 600.0,
              policy: str | None = None, settings: LauncherSettings | None = None) -> UpConfig:
    """The launch configuration: flags, then ``KUNSERVE_*`` environment, then defaults."""
    env = settings or LauncherSettings()
    if instances < 1:
        raise ValueError(f"--instances must be at least 1, got {instances}")
    if threads_per_worker is not None and threads_per_worker < 1:
        raise ValueError(f"--threads-per-worker must be at least 1, got {threads_per_worker}")
    model = model or env.model
    if model is not None:
        from kunserve.worker.model_config import ModelConfig

        ModelConfig.from_dir(model)  # a missing or bad checkpoint: say so before starting
    policy = get_policy(policy or env.policy).name  # an unknown name: say so before starting
    state_dir = env.state_dir.expanduser().resolve()
    token = env.admin_token or secrets.token_urlsafe(24)
    return UpConfig(
        model=model, instances=instances, host=host, port=port,
        threads_per_worker=threads_per_worker or max(1, _cores() // instances),
        memory_per_instance=memory_per_instance,
        database_url=env.database_url or f"sqlite+aiosqlite:///{state_dir / 'ledger.db'}",
        admin_token=token, admin_token_generated=not env.admin_token,
        cache_dir=env.cache_dir.expanduser().resolve(), state_dir=state_dir,
        nats_url=env.nats_url, redis_url=env.redis_url, policy=policy,
        startup_timeout=startup_timeout)


def run_up(**flags) -> int:
    """``kunserve up``: run until Ctrl-C / SIGTERM (exit 0) or a failure (exit 1)."""
    return Launcher(up_config(**flags)).run()


# -- what to start ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildSpec:
    name: str  # planner | router | worker-<i> | gateway
    role: str  # planner | router | worker | gateway
    env: dict[str, str]  # KUNSERVE_* settings, added to the launcher's environment


def plan_children(config: UpConfig, model_dir: str, nats_url: str,
                  redis_url: str) -> list[ChildSpec]:
    """Planner, router, workers, gateway (start order), with their settings."""
    common = {"KUNSERVE_NATS_URL": nats_url, "KUNSERVE_REDIS_URL": redis_url,
              "KUNSERVE_POLICY": config.policy}
    planner = {**common, "KUNSERVE_MODEL": model_dir}  # the router needs no model
    worker = {**planner, "KUNSERVE_THREADS": str(config.threads_per_worker)}
    if config.memory_per_instance is not None:
        worker["KUNSERVE_MEMORY_PER_INSTANCE"] = str(config.memory_per_instance)
    gateway = {**planner, "KUNSERVE_HOST": config.host, "KUNSERVE_PORT": str(config.port),
               "KUNSERVE_DATABASE_URL": config.database_url,
               "KUNSERVE_ADMIN_TOKEN": config.admin_token}
    workers = [ChildSpec(f"worker-{i}", "worker",
                         {**worker, "KUNSERVE_INSTANCE_ID": f"worker-{i}"})
               for i in range(config.instances)]
    planner_env = {**planner, "KUNSERVE_DATABASE_URL": config.database_url}  # plans table
    return [ChildSpec("planner", "planner", planner_env),
            ChildSpec("router", "router", common),
            *workers, ChildSpec("gateway", "gateway", gateway)]


def module_argv(role: str) -> list[str]:
    return [sys.executable, "-m", f"kunserve.{role}"]


_TINY_STAMP = json.dumps(TINY_MODEL, sort_keys=True)
_TINY_STAMP_FILE = "kunserve-tiny-model.json"


def tiny_model_is_built(cache_dir: Path) -> bool:
    return _read(cache_dir / TINY_MODEL_NAME / _TINY_STAMP_FILE) == _TINY_STAMP


def ensure_tiny_model(cache_dir: Path) -> Path:
    """The embedded tiny model in ``cache_dir``, built the first time (and again only when
    ``TINY_MODEL`` changes). Safe when two launchers race: each builds aside, one wins."""
    target = cache_dir / TINY_MODEL_NAME
    if tiny_model_is_built(cache_dir):
        return target
    from kunserve.tiny_model import make_tiny_model

    cache_dir.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_NAME}-", dir=cache_dir))
    try:
        make_tiny_model(build, **TINY_MODEL)
        (build / _TINY_STAMP_FILE).write_text(_TINY_STAMP)
        if target.exists() and not tiny_model_is_built(cache_dir):
            shutil.rmtree(target, ignore_errors=True)  # an older build
        build.rename(target)
    except OSError:
        if not tiny_model_is_built(cache_dir):  # else: another launcher got there first
            raise
    finally:
        shutil.rmtree(build, ignore_errors=True)  # nothing left there after the rename
    return target


# -- running it ------------------------------------------------------------------------------


class StartupError(RuntimeError):
    """The mesh did not come up; the message says what and shows the logs' last lines."""


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen
    log_path: Path
    reported: bool = False  # its exit was already told

    def tail(self, lines: int = _TAIL_LINES) -> str:
        text = _read(self.log_path) or ""
        last = text.splitlines()[-lines:]
        return "\n".join(f"  | {line}" for line in last) or "  | (no output)"


class Launcher:
    def __init__(self, config: UpConfig, *, argv_for: Callable[[str], list[str]] = module_argv,
                 out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.config = config
        self.argv_for = argv_for
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.children: list[Child] = []
        self.servers: list[ServerProcess] = []
        self._stop = threading.Event()  # Ctrl-C / SIGTERM
        self._force = threading.Event()  # a second one: kill without waiting

    def run(self) -> int:
        """Start, wait until ready, serve until asked to stop; always stop everything."""
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._start_and_supervise()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start_and_supervise(self) -> int:
        try:
            _check_port_free(self.config.host, self.config.port)
            nats_url, redis_url = self._start_servers()
            model_dir = self._prepare_model()
            if self._stop.is_set():
                return 0
            self._start_children(plan_children(self.config, model_dir, nats_url, redis_url))
            if not self._wait_until_ready(redis_url):
                return 0  # stopped while starting
        except (StartupError, ServerError) as exc:
            print(f"kunserve up: error: {exc}", file=self.err, flush=True)
            return 1
        if self.config.admin_token_generated:
            self._say(f"admin token: {self.config.admin_token}")
        print(f"{READY_PREFIX} {self.config.url} ({self.config.instances} instances, "
              f"policy {self.config.policy})", file=self.out, flush=True)
        return self._supervise()

    def _on_signal(self, signum, frame) -> None:
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    def _say(self, message: str) -> None:
        print(f"kunserve up: {message}", file=self.out, flush=True)

    # -- start-up steps --------------------------------------------------------------------

    def _start_servers(self) -> tuple[str, str]:
        nats_url, redis_url = self.config.nats_url, self.config.redis_url
        # the gateway binds its port last: no server may take it meanwhile
        avoid = {self.config.port}
        if nats_url is None:
            self.servers.append(_start_nats(free_port(avoid)))
            nats_url = self.servers[-1].url
        if redis_url is None:
            self.servers.append(_start_redis(free_port(avoid)))
            redis_url = self.servers[-1].url
        self._say(f"servers up: {nats_url}, {redis_url}")
        return nats_url, redis_url

    def _prepare_model(self) -> str:
        from kunserve.worker.model_config import ModelConfig

        if self.config.model is None:
            if not tiny_model_is_built(self.config.cache_dir):
                self._say(f"building the tiny model into {self.config.cache_dir} (once)")
            model_dir = str(ensure_tiny_model(self.config.cache_dir))
        else:
            model_dir = str(Path(self.config.model).expanduser().resolve())
        layers = ModelConfig.from_dir(model_dir).num_layers  # a bad checkpoint fails here
        self._say(f"model ready: {model_dir} ({layers} layers)")
        return model_dir

    def _start_children(self, specs: list[ChildSpec]) -> None:
        log_dir = self.config.log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            log_path = log_dir / f"{spec.name}.log"
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    self.argv_for(spec.role), env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                   **spec.env},
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    process_group=0, preexec_fn=_die_with_parent)
            self.children.append(Child(spec, process, log_path))
        workers = self.config.instances
        self._say(f"started planner, router, {workers} worker{'s' * (workers != 1)}, gateway "
                  f"(logs: {log_dir})")

    def _wait_until_ready(self, redis_url: str) -> bool:
        """True when ready; False when asked to stop first. Raises StartupError."""
        workers = [c.spec.name for c in self.children if c.spec.role == "worker"]
        deadline = time.monotonic() + self.config.startup_timeout
        client = redis.Redis.from_url(redis_url, socket_timeout=2)
        live: list[str] = []
        topology_ok = False
        try:
            while not self._stop.is_set():
                self._fail_if_a_child_died()
                try:
                    for name in workers:
                        if name not in live and client.exists(RedisKeys.load(name)):
                            live.append(name)
                            self._say(f"{name} live ({len(live)}/{len(workers)})")
                    if len(live) == len(workers) and not topology_ok:
                        topology_ok = self._topology_lists(client, workers)
                except redis.RedisError:
                    pass  # an external Redis that is slow to answer: try again
                if topology_ok and _healthy(self.config.url):
                    self._say(f"gateway up: {self.config.url}")
                    return True
                if time.monotonic() > deadline:
                    raise StartupError(self._stuck_message(workers, live, topology_ok))
                self._stop.wait(0.1)
            return False
        finally:
            client.close()

    def _topology_lists(self, client: redis.Redis, workers: list[str]) -> bool:
        raw = client.get(RedisKeys.TOPOLOGY)
        topology = decode(raw, Topology) if raw else Topology()
        if not set(workers) <= {i.instance_id for i in topology.instances}:
            return False
        self._say(f"topology epoch {topology.epoch}: {len(topology.instances)} instances")
        return True

    def _fail_if_a_child_died(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                child.reported = True
                raise StartupError(f"{child.spec.name} exited with code {code} during start-up;"
                                   f" last lines of {child.log_path}:\n{child.tail()}")

    def _stuck_message(self, workers: list[str], live: list[str], topology_ok: bool) -> str:
        timeout = f"not ready after {self.config.startup_timeout:.0f}s"
        if len(live) < len(workers):
            waiting = [c for c in self.children if c.spec.name in set(workers) - set(live)]
            what = "workers " + ", ".join(c.spec.name for c in waiting) + " (no load in Redis)"
        elif not topology_ok:
            waiting, what = self._named("planner"), "the planner's topology"
        else:
            waiting, what = self._named("gateway"), f"GET {self.config.url}/health"
        tails = "\n".join(f"last lines of {c.log_path}:\n{c.tail()}" for c in waiting)
        return f"{timeout}: waiting for {what}\n{tails}"

    def _named(self, name: str) -> list[Child]:
        return [c for c in self.children if c.spec.name == name]

    # -- serving and stopping -----------------------------------------------------------------

    def _supervise(self) -> int:
        """Until a signal (exit 0) or the loss of a child the mesh cannot serve without
        (exit 1). A lost worker is reported; the planner takes it out of the topology."""
        while not self._stop.wait(0.5):
            for child in self.children:
                code = child.process.poll()
                if code is None or child.reported:
                    continue
                child.reported = True
                print(f"kunserve up: {child.spec.name} exited with code {code}; last lines of "
                      f"{child.log_path}:\n{child.tail()}", file=self.err, flush=True)
                workers_left = any(c.spec.role == "worker" and c.process.poll() is None
                                   for c in self.children)
                if child.spec.role != "worker" or not workers_left:
                    return 1
        return 0

    def _stop_all(self) -> None:
        if self.children or self.servers:
            self._say("stopping: gateway, router, workers, planner, servers")
        for role in STOP_ORDER:
            group = [c for c in self.children if c.spec.role == role]
            timeout = self.config.drain_timeout if role == "gateway" else self.config.stop_timeout
            self._terminate(group, timeout)
        for server in reversed(self.servers):
            server.stop()
        if self.children or self.servers:
            self._say("stopped")
        self.children, self.servers = [], []

    def _terminate(self, children: list[Child], timeout: float) -> None:
        """SIGTERM to each child's process group, SIGKILL to whoever is left at the
        deadline; then SIGKILL to anything still in the group (a child's own children)."""
        for child in children:
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in children:
            while (child.process.poll() is None and time.monotonic() < deadline
                   and not self._force.is_set()):
                time.sleep(0.05)
            if child.process.poll() is None:
                self._say(f"{child.spec.name} did not stop in time: killing it")
                _signal_group(child.process, signal.SIGKILL)
                child.process.wait()
            _signal_group(child.process, signal.SIGKILL)


# -- small helpers ---------------------------------------------------------------------------


# servers in their own process group: Ctrl-C must not stop them before the gateway and
# workers have drained through them
_SERVER_POPEN = {"process_group": 0}


def _start_nats(port: int) -> ServerProcess:
    return start_nats(port, popen_kwargs={**_SERVER_POPEN, "preexec_fn": _die_with_parent})


def _start_redis(port: int) -> ServerProcess:
    return start_redis(port, popen_kwargs={**_SERVER_POPEN, "preexec_fn": _die_with_parent})


_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in each child before exec: if the launcher is killed outright (SIGKILL), its
    children get SIGTERM instead of living on."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # the child leads its own group (process_group=0)
    except (ProcessLookupError, PermissionError):
        pass


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StartupError(f"cannot serve on {host}:{port} ({exc.strerror}); "
                               "pass another --port") from None


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _http_url(host: str, port: int) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None
