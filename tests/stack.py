"""Helpers for tests that run a whole stack as a subprocess (``kunserve up``)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from kunserve.servers import free_port


class Up:
    """A launcher subprocess whose output lines are collected as they come."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s, lst), daemon=True)
                         for s, lst in ((self.process.stdout, self.lines),
                                        (self.process.stderr, self.errors))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if line.startswith(prefix)]
            if found:
                return found[0]
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {prefix!r} line; stdout:\n" + "\n".join(self.lines)
                             + "\nstderr:\n" + "\n".join(self.errors[-40:]))

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def log_tail(state_dir: Path, service: str, lines: int = 30) -> str:
    """The last lines of a ``kunserve up`` service's log under ``state_dir`` (for a failing
    assertion's message)."""
    found = sorted((state_dir / "logs").glob(f"*/{service}.log"))
    if not found:
        return f"(no {service}.log under {state_dir})"
    return "\n".join(found[-1].read_text(errors="replace").splitlines()[-lines:])


def assert_all_gone(processes: list[psutil.Process], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    left = processes
    while left and time.monotonic() < deadline:
        left = [p for p in left if alive(p)]
        time.sleep(0.05)
    assert not left, f"left behind: {[(p.pid, p.info if hasattr(p, 'info') else p) for p in left]}"


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextmanager
def running_stack(model_dir: str, state_dir: Path, instances: int = 2,
                  timeout: float = 240, **settings: object) -> Iterator[tuple[Up, str]]:
    """``kunserve up --model model_dir --instances N`` on a free port, its state (ledger, logs)
    in ``state_dir``; yields the launcher and the gateway's URL once ready, stops it at exit.
    ``settings``: ``KUNSERVE_<NAME>`` variables for every service (``admin_token="t"``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUNSERVE_")}
    env.update(KUNSERVE_STATE_DIR=str(state_dir), HF_HUB_OFFLINE="1")
    env.update({f"KUNSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    port = free_port()
    up = Up([sys.executable, "-m", "kunserve.cli", "up", "--model", model_dir,
             "--instances", str(instances), "--port", str(port)], env)
    try:
        up.wait_for_line("kunserve ready:", timeout=timeout)
        yield up, f"http://127.0.0.1:{port}"
    finally:
        up.process.terminate()
        up.finish(timeout=60)
