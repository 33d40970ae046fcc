"""A fresh ``kunserve up`` as a subprocess, for one policy's replay in ``bench compare``.

Its output goes to ``<dir>/kunserve-up.log`` and its state (ledger, service logs) to
``<dir>/state``; it is ready at the launcher's ``kunserve ready:`` line. The admin token is
chosen here and given in ``KUNSERVE_ADMIN_TOKEN``. Stopping sends SIGTERM to the launcher (it
stops its children in order) and SIGKILL after a timeout.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kunserve.launcher import READY_PREFIX
from kunserve.servers import free_port, stop_process


@dataclass
class StackOptions:
    instances: int = 2
    model: str | None = None  # None: kunserve up's tiny model
    memory_per_instance: str | None = None
    threads_per_worker: int | None = None
    startup_timeout_s: float = 600.0
    extra_env: dict[str, str] = field(default_factory=dict)


class LocalStack:
    def __init__(self, folder: Path, options: StackOptions, policy: str | None = None) -> None:
        self.folder = folder
        self.options = options
        self.policy = policy  # None: start without --policy
        self.port = free_port()
        self.admin_token = secrets.token_urlsafe(18)
        self.log_path = folder / "kunserve-up.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        o = self.options
        argv = [sys.executable, "-m", "kunserve.cli", "up", "--instances", str(o.instances),
                "--port", str(self.port), "--startup-timeout", str(o.startup_timeout_s)]
        for flag, value in (("--model", o.model), ("--policy", self.policy),
                            ("--memory-per-instance", o.memory_per_instance),
                            ("--threads-per-worker", o.threads_per_worker)):
            if value is not None:
                argv += [flag, str(value)]
        return argv

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUNSERVE_")}
        env.update(self.options.extra_env, KUNSERVE_STATE_DIR=str(self.folder / "state"),
                   KUNSERVE_ADMIN_TOKEN=self.admin_token, HF_HUB_OFFLINE="1",
                   PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.argv(), env=env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.options.startup_timeout_s + 30
        while time.monotonic() < deadline:
            if any(line.startswith(READY_PREFIX) for line in self._log().splitlines()):
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"kunserve up exited with code {self.process.returncode} "
                                   f"before it was ready; last lines of {self.log_path}:\n"
                                   + self.tail())
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"kunserve up not ready in time; last lines of {self.log_path}:\n"
                           + self.tail())

    def stop(self, timeout_s: float = 90.0) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(f"  | {line}" for line in self._log().splitlines()[-lines:])

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""
