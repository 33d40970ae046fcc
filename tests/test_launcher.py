"""``kunserve up``: the launch plan, the launcher's start/stop discipline on stand-in children
(real nats-server, redis-server and planner; fake router, workers and gateway), and the real
stack end to end."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import textwrap
from pathlib import Path

import httpx
import psutil
import pytest

from kunserve.cli import main
from kunserve.launcher import (
    LauncherSettings,
    ensure_tiny_model,
    plan_children,
    up_config,
)
from kunserve.servers import free_port
from tests.stack import Up, alive, assert_all_gone

CONFIG_JSON = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
               "num_key_value_heads": 2}


@pytest.fixture
def config_only_model(tmp_path) -> Path:
    """Enough of a checkpoint for the launcher and the planner (they read config.json)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(CONFIG_JSON))
    return model


def settings(tmp_path, **env) -> LauncherSettings:
    return LauncherSettings(cache_dir=tmp_path / "cache", state_dir=tmp_path / "state", **env)


# -- the plan (no processes) -----------------------------------------------------------------


def test_children_get_their_settings(tmp_path, config_only_model):
    config = up_config(model=str(config_only_model), instances=3, port=9100,
                       memory_per_instance=64 << 20, settings=settings(tmp_path))
    children = plan_children(config, "/m", "nats://n:1", "redis://r:2/0")

    assert [c.name for c in children] == ["planner", "router", "worker-0", "worker-1",
                                          "worker-2", "gateway"]
    for child in children:
        assert child.env["KUNSERVE_NATS_URL"] == "nats://n:1"
        assert child.env["KUNSERVE_REDIS_URL"] == "redis://r:2/0"
        assert child.env.get("KUNSERVE_MODEL") == (None if child.name == "router" else "/m")
        assert all(k.startswith("KUNSERVE_") for k in child.env)
    worker = children[3].env
    assert worker["KUNSERVE_INSTANCE_ID"] == "worker-1"
    assert worker["KUNSERVE_MEMORY_PER_INSTANCE"] == str(64 << 20)
    assert worker["KUNSERVE_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 3))
    gateway = children[-1].env
    assert (gateway["KUNSERVE_HOST"], gateway["KUNSERVE_PORT"]) == ("127.0.0.1", "9100")
    assert gateway["KUNSERVE_DATABASE_URL"] == (
        f"sqlite+aiosqlite:///{(tmp_path / 'state').resolve()}/ledger.db")
    assert len(gateway["KUNSERVE_ADMIN_TOKEN"]) >= 24 and config.admin_token_generated


def test_environment_settings_are_used_and_flags_win(tmp_path, config_only_model):
    env = settings(tmp_path, admin_token="secret", database_url="postgresql+asyncpg://db/x",
                   model=str(config_only_model))
    config = up_config(instances=1, threads_per_worker=3, settings=env)
    assert (config.admin_token, config.admin_token_generated) == ("secret", False)
    assert config.database_url == "postgresql+asyncpg://db/x"
    assert config.model == str(config_only_model) and config.threads_per_worker == 3
    flag_model = tmp_path / "flag-model"
    flag_model.mkdir()
    (flag_model / "config.json").write_text(json.dumps(CONFIG_JSON))
    assert up_config(model=str(flag_model), settings=env).model == str(flag_model)


def test_bad_arguments_are_refused_before_anything_starts(tmp_path, capsys):
    with pytest.raises(ValueError, match="does not exist"):
        up_config(model=str(tmp_path / "missing"), settings=settings(tmp_path))
    with pytest.raises(ValueError, match="--instances"):
        up_config(instances=0, settings=settings(tmp_path))
    assert main(["up", "--model", str(tmp_path / "missing")]) == 2
    assert "kunserve up: error:" in capsys.readouterr().err
    assert main(["up", "--instances", "0"]) == 2


def test_the_tiny_model_is_built_once(tmp_path):
    model = ensure_tiny_model(tmp_path)
    assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file()
    weights = model / "model.safetensors"
    built = weights.stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path) == model
    assert weights.stat().st_mtime_ns == built
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama"]  # no build left aside


# -- start/stop discipline, on stand-in children ---------------------------------------------

# One script plays router, worker and gateway; the planner is the real one. Each writes
# "<name> started|stopped <time>" to the record file. A worker also starts a grandchild that
# ignores SIGTERM, which the launcher must not leave behind.
FAKE_CHILD = textwrap.dedent('''
    import http.server, os, runpy, signal, subprocess, sys, time, atexit
    role, record = sys.argv[1], sys.argv[2]
    name = os.environ.get("KUNSERVE_INSTANCE_ID", role)
    def note(event):
        with open(record, "a") as f:
            f.write(f"{name} {event} {time.monotonic()}\\n")
    note("started")
    if role == "planner":
        atexit.register(note, "stopped")
        sys.argv = sys.argv[:1]
        runpy.run_module("kunserve.planner", run_name="__main__")
    def on_term(*_):
        note("stopped")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    if os.environ.get("FAKE_CRASH") == name:
        print("loading...\\nboom: the checkpoint is corrupt", file=sys.stderr)
        sys.exit(3)
    if role == "worker":
        import redis
        subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300"])
        r = redis.Redis.from_url(os.environ["KUNSERVE_REDIS_URL"])
        while True:
            r.hset(f"kunserve:load:{name}", mapping={"blocks_total": 64, "block_size": 16})
            r.pexpire(f"kunserve:load:{name}", 1000)
            r.sadd("kunserve:instances", name)
            time.sleep(0.2)
    if role == "gateway":
        class Health(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/health" else 404)
                self.end_headers()
            def log_message(self, *args):
                pass
        server = http.server.HTTPServer(
            (os.environ["KUNSERVE_HOST"], int(os.environ["KUNSERVE_PORT"])), Health)
        server.serve_forever()
    while True:
        time.sleep(1)
''')

DRIVER = textwrap.dedent('''
    import sys
    from kunserve.launcher import Launcher, up_config
    fake, record, model, port = sys.argv[1:5]
    config = up_config(model=model, instances=2, port=int(port), startup_timeout=60)
    config.stop_timeout = 3.0
    argv = lambda role: [sys.executable, fake, role, record]
    sys.exit(Launcher(config, argv_for=argv).run())
''')


@pytest.fixture
def launch_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUNSERVE_")}
    env.update(KUNSERVE_CACHE_DIR=str(tmp_path / "cache"),
               KUNSERVE_STATE_DIR=str(tmp_path / "state"), HF_HUB_OFFLINE="1")
    return env


@pytest.fixture
def fake_up(tmp_path, config_only_model, launch_env):
    fake, driver = tmp_path / "fake_child.py", tmp_path / "driver.py"
    fake.write_text(FAKE_CHILD)
    driver.write_text(DRIVER)
    record = tmp_path / "record.txt"
    started: list[Up] = []

    def start(**env) -> tuple[Up, Path]:
        up = Up([sys.executable, str(driver), str(fake), str(record), str(config_only_model),
                 str(free_port())], {**launch_env, **env})
        started.append(up)
        return up, record

    yield start
    for up in started:
        up.kill()


def events(record: Path) -> list[tuple[str, str]]:
    rows = [line.split() for line in record.read_text().splitlines()]
    return [(name, event) for name, event, _ in sorted(rows, key=lambda r: float(r[2]))]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_stops_gateway_first_then_router_workers_planner(fake_up, stop_signal):
    up, record = fake_up()
    ready = up.wait_for_line("kunserve ready:", timeout=60)
    assert ready.endswith("(2 instances, policy kunserve)")
    for step in ("servers up", "model ready", "worker-0 live", "worker-1 live",
                 "gateway up", "admin token"):
        assert any(step in line for line in up.lines), (step, up.lines)
    # the planner may publish an epoch with one worker before the one with both
    assert any(re.search(r"topology epoch \d+: 2 instances", line) for line in up.lines), up.lines
    processes = up.descendants()
    assert sum(p.name() == "sleep" for p in processes) == 2

    up.process.send_signal(stop_signal)  # SIGINT: what Ctrl-C sends the launcher
    assert up.finish(timeout=30) == 0
    assert not up.errors, up.errors  # no traceback, no complaint
    stopped = [name for name, event in events(record) if event == "stopped"]
    assert stopped[:2] == ["gateway", "router"]
    assert sorted(stopped[2:4]) == ["worker-0", "worker-1"] and stopped[4:] == ["planner"]
    assert_all_gone(processes)  # servers, children and the TERM-ignoring grandchildren


def test_a_child_dying_at_start_up_is_reported_and_everything_stops(fake_up):
    up, _ = fake_up(FAKE_CRASH="worker-1")
    assert up.finish(timeout=60) == 1
    stderr = "\n".join(up.errors)
    assert "worker-1 exited with code 3 during start-up" in stderr
    assert "boom: the checkpoint is corrupt" in stderr
    assert not any(line.startswith("kunserve ready") for line in up.lines)
    assert not [p for p in psutil.Process().children(recursive=True) if alive(p)
                and "fake_child" in " ".join(p.cmdline())]
    servers = up.wait_for_line("kunserve up: servers up:", timeout=1)
    for port in re.findall(r":(\d+)", servers):  # nats-server and redis-server are gone
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()


# -- the real stack ---------------------------------------------------------------------------


def test_kunserve_up_serves_completions_and_stops_cleanly(launch_env):
    port = free_port()
    up = Up([sys.executable, "-m", "kunserve.cli", "up", "--instances", "2", "--port",
             str(port)], launch_env)
    try:
        ready = up.wait_for_line("kunserve ready:", timeout=240)
        url = f"http://127.0.0.1:{port}"
        assert ready == f"kunserve ready: {url} (2 instances, policy kunserve)"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        response = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": model, "prompt": "hello", "max_tokens": 4})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] <= 4
        processes = up.descendants()
        assert len(processes) >= 7  # nats, redis, planner, router, 2 workers, gateway

        up.process.send_signal(signal.SIGTERM)
        assert up.finish(timeout=60) == 0, "\n".join(up.errors[-40:])
        assert_all_gone(processes)
    finally:
        up.kill()


def test_a_server_port_is_never_the_one_promised_to_the_gateway(monkeypatch):
    """The gateway binds its port after the servers start: the kernel may hand that port
    out again meanwhile (seen once: redis took it and the gateway exited), so the servers'
    ports skip it."""
    import kunserve.servers as servers

    handed_out = iter([5000, 5000, 5001])

    class Socket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            self.port = next(handed_out)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(servers.socket, "socket", Socket)
    assert servers.free_port(avoid={5000}) == 5001
