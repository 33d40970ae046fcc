"""The engine on its own thread: every engine call (construction, add, abort, step) happens
there, fed by a thread-safe inbox, so the asyncio side never blocks on a step.

After each step the thread emits the step's outputs, and at step boundaries (at most every
``load_refresh_ms`` while busy, at least every ``liveness_ttl_ms / 3`` when idle) a load
snapshot. Where its job ends: it knows nothing of NATS or Redis; ``server.py`` publishes what
it emits.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from kunserve.protocol import InstanceLoad
from kunserve.worker.engine import LLMEngine, RequestOutput
from kunserve.worker.load_writer import LoadReport
from kunserve.worker.sampling_params import SamplingParams
from kunserve.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)


# -- what the engine thread emits (plain data, consumed in order by the pump) ----------------
@dataclass
class Accepted:
    request_id: str


@dataclass
class Aborted:
    request_id: str
    error: str | None


@dataclass
class AddCommand:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    reserved_tokens: int


@dataclass
class AbortCommand:
    request_id: str
    error: str | None = None


class EngineThread:
    """Runs ``LLMEngine`` on one thread; ``emit`` is called (on that thread) with outputs,
    ``Accepted``, ``Aborted`` and ``LoadReport`` events."""

    def __init__(self, settings: WorkerSettings, emit) -> None:
        self.settings = settings
        self._emit = emit
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ready: Future = Future()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._released = [0, 0]  # tokens, requests taken since the last load report
        self._dirty = True
        self._last_report = float("-inf")

    def start(self) -> Future:
        """Start the thread; the future resolves once the engine is built (or fails)."""
        self._thread.start()
        return self._ready

    def add(self, command: AddCommand | AbortCommand) -> None:
        self._inbox.put(command)

    def stop(self, timeout: float | None = None) -> None:
        self._inbox.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            engine = LLMEngine(self.settings.engine_config())
        except BaseException as exc:  # reported to start(); nothing else runs
            self._ready.set_exception(exc)
            return
        self._ready.set_result(engine.memory_report())
        while self._take_commands(engine):
            if engine.has_unfinished():
                self._step(engine)
            self._report_load(engine)

    def _take_commands(self, engine: LLMEngine) -> bool:
        """Apply queued commands (waiting for one when idle); False once told to stop."""
        block = not engine.has_unfinished()
        while True:
            try:
                command = self._inbox.get(block=block, timeout=self._idle_wait() if block else None)
            except queue.Empty:
                return True
            if command is None:
                return False
            self._apply(engine, command)
            self._dirty, block = True, False

    def _idle_wait(self) -> float:
        since = time.monotonic() - self._last_report
        period = self.settings.load_refresh_ms if self._dirty else self.settings.liveness_ttl_ms / 3
        return max(0.0, period / 1000 - since)

    def _apply(self, engine: LLMEngine, command: AddCommand | AbortCommand) -> None:
        if isinstance(command, AbortCommand):
            engine.abort_request(command.request_id)
            self._emit(Aborted(command.request_id, command.error))
            return
        self._released[0] += command.reserved_tokens
        self._released[1] += 1
        try:
            engine.add_request(command.prompt_token_ids, command.params, command.request_id)
        except Exception as exc:  # e.g. an id the engine already holds
            self._emit([RequestOutput(command.request_id, [], "", True, "error", str(exc))])
            return
        if command.request_id in engine.scheduler.requests:  # else rejected: next step says why
            self._emit(Accepted(command.request_id))

    def _step(self, engine: LLMEngine) -> None:
        try:
            outputs = engine.step()
        except Exception as exc:  # a failed step fails its requests, not the worker
            logger.exception("engine step failed")
            outputs = [RequestOutput(rid, [], "", True, "error", f"engine step failed: {exc}")
                       for rid in list(engine.scheduler.requests)]
            for out in outputs:
                engine.abort_request(out.request_id)
        self._dirty = True
        if outputs:
            self._emit(outputs)

    def _report_load(self, engine: LLMEngine) -> None:
        since = (time.monotonic() - self._last_report) * 1000
        s = self.settings
        if since < s.liveness_ttl_ms / 3 and not (self._dirty and since >= s.load_refresh_ms):
            return
        self._emit(LoadReport(snapshot_load(engine, s.instance_id), *self._released))
        self._released = [0, 0]
        self._dirty, self._last_report = False, time.monotonic()


def snapshot_load(engine: LLMEngine, instance_id: str) -> InstanceLoad:
    scheduler, blocks = engine.scheduler, engine.block_manager
    usage = blocks.usage()
    return InstanceLoad(
        instance_id=instance_id, running=scheduler.num_running, waiting=scheduler.num_waiting,
        blocks_total=usage.total, blocks_used=usage.used, block_size=blocks.block_size,
        queued_tokens=sum(r.num_uncomputed_tokens for r in scheduler.waiting),
        num_preemptions=scheduler.num_preemptions, updated_at=time.time())
