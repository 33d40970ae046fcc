"""The engine on its own thread: every engine call (construction, add, abort, step) happens
there, fed by a thread-safe inbox, so the worker's event loop never blocks on a step.

The thread runs an event loop of its own, which a step blocks: between steps it is where the
thread waits for commands and where its ``Outlet`` does I/O. What the thread produces goes to
the outlet from this thread, at once: after each step the step's outputs, when it takes or
aborts a request an ``Accepted`` or ``Aborted``, and at step boundaries (at most every
``load_refresh_ms`` while busy, at least every ``liveness_ttl_ms / 3`` when idle) a load
snapshot. Why not hand them to the worker's loop: that loop would then work during the next
step, and the two threads share one GIL, which a step gives back at every torch op; each
give-back became a thread switch (measured on the tiny model: decode steps ~0.3 ms slower per
100 us of the loop's work, and every token waited for the loop's thread to wake up).

Where its job ends: it knows nothing of NATS or Redis; ``server.py``'s outlet publishes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from kunserve.protocol import InstanceLoad
from kunserve.service_main import new_event_loop
from kunserve.worker.engine import LLMEngine, RequestOutput
from kunserve.worker.load_writer import LoadReport
from kunserve.worker.sampling_params import SamplingParams
from kunserve.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)


# -- what the engine thread emits (plain data, handed to the outlet in order) -----------------
@dataclass
class Accepted:
    request_id: str
    num_prompt_tokens: int


@dataclass
class Aborted:
    request_id: str
    error: str | None


Event = list[RequestOutput] | Accepted | Aborted | LoadReport


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


class Outlet(Protocol):
    """Where the engine thread's events go. Every method runs on the engine thread's loop."""

    async def open(self) -> None:
        """Once the engine is built, before the first command."""

    async def emit(self, event: Event) -> None:
        """One event; events come in the order the engine made them. The loop may be
        blocked by a step as soon as this returns: what is to go out now must be sent."""

    async def close(self) -> None:
        """After the last event."""


class EngineThread:
    """Runs ``LLMEngine`` on one thread and hands what it produces to ``outlet``."""

    def __init__(self, settings: WorkerSettings, outlet: Outlet) -> None:
        self.settings = settings
        self._outlet = outlet
        self._loop = new_event_loop()  # the thread's own; it runs only on that thread
        self._inbox: asyncio.Queue | None = None  # made on the thread (bound to its loop)
        self._ready: Future = Future()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._released = [0, 0]  # tokens, requests taken since the last load report
        self._dirty = True
        self._last_report = float("-inf")

    def start(self) -> Future:
        """Start the thread; the future resolves once the engine is built and the outlet
        open (or fails)."""
        self._thread.start()
        return self._ready

    def add(self, command: AddCommand | AbortCommand) -> None:
        """From any thread (after ``start`` resolved). Dropped once the thread has stopped."""
        try:
            self._loop.call_soon_threadsafe(self._inbox.put_nowait, command)
        except RuntimeError:  # the loop is closed: nothing would ever run the command
            logger.warning("engine stopped: dropped %s", type(command).__name__)

    def stop(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._inbox.put_nowait, None)
            self._thread.join(timeout)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._inbox = asyncio.Queue()
        try:
            engine = LLMEngine(self.settings.engine_config())
            await self._outlet.open()
        except BaseException as exc:  # reported to start(); nothing else runs
            self._ready.set_exception(exc)
            return
        self._ready.set_result(engine.memory_report())
        try:
            while await self._take_commands(engine):
                if engine.has_unfinished():
                    await self._step(engine)
                await self._report_load(engine)
        finally:
            await self._outlet.close()

    async def _take_commands(self, engine: LLMEngine) -> bool:
        """Apply queued commands (waiting for one when idle); False once told to stop."""
        # one turn of the loop: it receives the commands sent in the meantime
        await asyncio.sleep(0)
        commands = []
        if not engine.has_unfinished() and self._inbox.empty():
            try:
                async with asyncio.timeout(self._idle_wait()):
                    commands.append(await self._inbox.get())
            except TimeoutError:
                return True
        while not self._inbox.empty():
            commands.append(self._inbox.get_nowait())
        for command in commands:
            if command is None:
                return False
            await self._apply(engine, command)
            self._dirty = True
        return True

    def _idle_wait(self) -> float:
        since = time.monotonic() - self._last_report
        period = self.settings.load_refresh_ms if self._dirty else self.settings.liveness_ttl_ms / 3
        return max(0.0, period / 1000 - since)

    async def _apply(self, engine: LLMEngine, command: AddCommand | AbortCommand) -> None:
        if isinstance(command, AbortCommand):
            engine.abort_request(command.request_id)
            await self._outlet.emit(Aborted(command.request_id, command.error))
            return
        self._released[0] += command.reserved_tokens
        self._released[1] += 1
        try:
            engine.add_request(command.prompt_token_ids, command.params, command.request_id)
        except Exception as exc:  # e.g. an id the engine already holds
            await self._outlet.emit([RequestOutput(
                command.request_id, [], "", True, "error", str(exc),
                num_prompt_tokens=len(command.prompt_token_ids))])
            return
        if command.request_id in engine.scheduler.requests:  # else rejected: next step says why
            await self._outlet.emit(Accepted(command.request_id, len(command.prompt_token_ids)))

    async def _step(self, engine: LLMEngine) -> None:
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
            await self._outlet.emit(outputs)

    async def _report_load(self, engine: LLMEngine) -> None:
        since = (time.monotonic() - self._last_report) * 1000
        s = self.settings
        if since < s.liveness_ttl_ms / 3 and not (self._dirty and since >= s.load_refresh_ms):
            return
        await self._outlet.emit(LoadReport(snapshot_load(engine, s.instance_id),
                                           *self._released))
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
