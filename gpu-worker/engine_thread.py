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

Reconfiguration (``GroupCommand``) also runs here, between two steps: joining a pipeline group
(``reconfigure.drop``; its KV exchange ends on a helper thread beside the group, which
wakes this loop to run the requests whose KV it moved, ``reconfigure.complete_drop``),
restoring it, falling back to solo when the group breaks, and the
llumnix policy's live migrations (``migration.py``: a task whose link waits run on a helper
thread, so the steps go on while the KV moves). The
leader of a group keeps this loop (its engine's runner is the pipeline's); another member runs
its stage on a helper thread (``_serve_stage``) while this loop idles, reporting its load, until
the leader starts a restore or the group breaks. Requests that move tell the outlet
(``HandedOff`` on the sender, ``Adopted`` on the receiver), so each request's updates come from
the instance that serves it.

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
from kunserve.worker.model.llama import LlamaStage
from kunserve.worker.pipeline import reconfigure
from kunserve.worker.pipeline.migration import MigrationDestination, MigrationSource
from kunserve.worker.pipeline.stage_link import StageLink, StageLinkError, close_in_background
from kunserve.worker.pipeline.stage_messages import BeginRestore
from kunserve.worker.request import Request
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


@dataclass
class HandedOff:
    """These requests left this instance with their progress (another serves them now)."""

    request_ids: list[str]


@dataclass
class Lost:
    """Requests this instance handed to its group's leader, when the group broke: if the
    leader died with them, nobody serves them (the gateway resubmits them)."""

    request_ids: list[str]


@dataclass
class Adopted:
    """Requests another instance started and this one serves from now on."""

    request_id: str
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class RoleChanged:
    """This instance's place in the topology changed (``Role``)."""

    role: Role


@dataclass
class Role:
    state: str = "solo"  # solo | pipelined
    group_id: str = ""
    stage: int = 0
    layer_start: int = 0
    layer_end: int = 0

    @property
    def follows(self) -> bool:
        """A pipeline stage other than the leader: it takes no requests."""
        return self.state == "pipelined" and self.stage > 0


Event = (list[RequestOutput] | Accepted | Aborted | LoadReport | HandedOff | Adopted | Lost
         | RoleChanged)


@dataclass
class GroupCommand:
    """``join`` the group ``link`` connects (drop) or ``restore`` it (leader only; the other
    members learn of the restore from the leader). ``done`` gets the phase seconds or the
    error."""

    kind: str
    done: Future
    link: StageLink | None = None
    group_id: str = ""
    layer_link: StageLink | None = None  # the same members' second link (layer pulls)
    blocks: int = 0  # migrate: how many KV blocks' worth of requests to move


@dataclass
class ExchangeDone:
    """From a drop's exchange thread: the KV is in place (or the group broke)."""

    exchange: reconfigure.KVExchange


@dataclass
class AddCommand:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    reserved_tokens: int
    resumed_tokens: int = 0  # ``GenerateRequest.resumed_tokens``


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
        self.role = Role()
        self._membership: reconfigure.Membership | None = None
        self._stage_task: asyncio.Task | None = None  # a follower's stage loop
        self._restoring: asyncio.Task | None = None  # a leader's restore
        self._migrations: set[asyncio.Task] = set()  # live migrations (the llumnix policy)
        self._joining: GroupCommand | None = None  # a leader's join, done when the KV is
        self._hold_steps = False
        self._turned_at = time.monotonic()  # the serving loop's last turn (``progressed_within``)

    @property
    def _exchange(self) -> reconfigure.KVExchange | None:
        """The KV exchange of the drop that made this instance's group, if any."""
        return self._membership.exchange if self._membership is not None else None

    def start(self) -> Future:
        """Start the thread; the future resolves once the engine is built and the outlet
        open (or fails)."""
        self._thread.start()
        return self._ready

    def add(self, command: AddCommand | AbortCommand | GroupCommand | ExchangeDone) -> None:
        """From any thread (after ``start`` resolved). Dropped once the thread has stopped."""
        try:
            self._loop.call_soon_threadsafe(self._inbox.put_nowait, command)
        except RuntimeError:  # the loop is closed: nothing would ever run the command
            logger.warning("engine stopped: dropped %s", type(command).__name__)

    def progressed_within(self, seconds: float) -> bool:
        """From any thread: the engine thread lives and its loop came round within
        ``seconds`` (a step or a command that has run longer looks hung)."""
        return self._thread.is_alive() and time.monotonic() - self._turned_at < seconds

    def stop(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._inbox.put_nowait, None)
            except RuntimeError:  # the loop closed meanwhile (a failed start): it is ending
                pass
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
                if self._hold_steps:  # a restore is between its drain and its split
                    await asyncio.sleep(0.001)
                elif reconfigure.waits_for_kv(engine, self._membership):
                    await self._emit_rejected(engine)  # until ExchangeDone
                elif engine.has_unfinished():
                    await self._step(engine)
                await self._report_load(engine)
                self._turned_at = time.monotonic()
        finally:
            if self._joining is not None:
                self._joining.done.set_exception(RuntimeError("the worker stopped"))
            for task in self._migrations:  # their requests go back to where they were
                task.cancel()
            await asyncio.gather(*self._migrations, return_exceptions=True)
            if self._membership is not None:
                self._membership.link.close()
            await self._outlet.close()

    async def _take_commands(self, engine: LLMEngine) -> bool:
        """Apply queued commands (waiting for one when idle); False once told to stop."""
        # one turn of the loop: it receives the commands sent in the meantime
        await asyncio.sleep(0)
        commands = []
        if not self._can_step(engine) and self._inbox.empty():
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

    def _can_step(self, engine: LLMEngine) -> bool:
        """Work to step, and no drop's KV exchange to wait for first
        (``reconfigure.waits_for_kv``: it ends with an ``ExchangeDone`` command)."""
        return engine.has_unfinished() and not reconfigure.waits_for_kv(engine,
                                                                         self._membership)

    async def _emit_rejected(self, engine: LLMEngine) -> None:
        """While no step can run: the errors of requests the engine refused meanwhile."""
        outputs = engine.take_rejected()
        if outputs:
            await self._outlet.emit(outputs)

    def _idle_wait(self) -> float:
        since = time.monotonic() - self._last_report
        period = self.settings.load_refresh_ms if self._dirty else self.settings.liveness_ttl_ms / 3
        return max(0.0, period / 1000 - since)

    async def _apply(self, engine: LLMEngine,
                     command: AddCommand | AbortCommand | GroupCommand | ExchangeDone) -> None:
        if isinstance(command, GroupCommand):
            await self._reconfigure(engine, command)
            return
        if isinstance(command, ExchangeDone):
            if self._membership is not None and self._membership.exchange is command.exchange:
                await self._complete_drop(engine)  # else that group is gone already
            return
        if isinstance(command, AbortCommand):
            if self._exchange is not None:  # held while its KV moves: never adopted
                reconfigure.cancel_held(engine, self._exchange, command.request_id)
            engine.abort_request(command.request_id)
            await self._outlet.emit(Aborted(command.request_id, command.error))
            return
        self._released[0] += command.reserved_tokens
        self._released[1] += 1
        if self._exchange is not None and command.request_id in self._exchange.held:
            await self._outlet.emit([RequestOutput(
                command.request_id, [], "", True, "error",
                f"request id {command.request_id!r} is already in the engine",
                num_prompt_tokens=len(command.prompt_token_ids))])
            return
        if engine.runner is None:  # a pipeline stage other than the leader: it cannot serve
            await self._outlet.emit([RequestOutput(
                command.request_id, [], "", True, "error",
                "this instance is a pipeline stage of a group; send requests to its leader",
                num_prompt_tokens=len(command.prompt_token_ids))])
            return
        try:
            engine.add_request(command.prompt_token_ids, command.params, command.request_id,
                               command.resumed_tokens)
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
        except StageLinkError as exc:  # the leader's group broke: serve its requests solo
            if self._membership is None:
                raise
            await self._fall_back(engine, exc)
            return
        except Exception as exc:  # a failed step fails its requests, not the worker
            logger.exception("engine step failed")
            outputs = [RequestOutput(rid, [], "", True, "error", f"engine step failed: {exc}")
                       for rid in list(engine.scheduler.requests)]
            for out in outputs:
                engine.abort_request(out.request_id)
        self._dirty = True
        if outputs:
            await self._outlet.emit(outputs)
        if engine.stalled:  # nothing could run (blocks a drop holds): no spinning
            await asyncio.sleep(0.001)

    # -- reconfiguration -------------------------------------------------------------------------
    async def _reconfigure(self, engine: LLMEngine, command: GroupCommand) -> None:
        if command.kind == "restore":  # runs beside the steps: the layer pull overlaps them
            if self._restoring is not None:
                command.done.set_exception(ValueError("a restore is already under way"))
            else:
                self._restoring = asyncio.create_task(self._run_restore(engine, command))
            return
        if command.kind == "migrate":  # runs beside the steps: the copy overlaps them
            self._migrations.add(asyncio.create_task(self._migrate(engine, command)))
            return
        try:
            if self._migrations:
                raise ValueError("a migration is under way")
            if command.kind == "join":
                phases = await self._join(engine, command.link, command.group_id,
                                          command.layer_link)
            else:
                raise ValueError(f"unknown group command {command.kind!r}")
        except Exception as exc:  # reported to whoever commanded it; the worker serves on
            logger.warning("%s failed: %s", command.kind, exc)
            command.done.set_exception(exc)
        else:
            if self._exchange is not None and self._membership.link.is_leader:
                self._joining = command  # done once the KV is in place (``_complete_drop``)
            else:  # a copy: a follower's exchange thread adds its phases later
                command.done.set_result(dict(phases))
        self._dirty = True

    async def _run_restore(self, engine: LLMEngine, command: GroupCommand) -> None:
        try:
            command.done.set_result(await self._restore(engine))
        except Exception as exc:
            logger.warning("restore failed: %s", exc)
            command.done.set_exception(exc)
        finally:
            self._restoring = None
            self._dirty = True

    async def _join(self, engine: LLMEngine, link: StageLink, group_id: str,
                    layer_link: StageLink | None) -> dict:
        if self._membership is not None:
            raise ValueError(f"already in group {self.role.group_id}")
        await self._serve_until_leader(engine, link)
        before = set(engine.scheduler.requests)
        try:
            membership = reconfigure.drop(engine, link, group_id, layer_link,
                                          on_exchanged=lambda x: self.add(ExchangeDone(x)))
        except reconfigure.GroupFailed:  # solo again; the leader kept every request
            await self._announce_moves(engine, before)
            if not link.is_leader:  # lost if the leader died with them
                await self._outlet.emit(Lost(sorted(before - set(engine.scheduler.requests))))
            raise
        self._membership = membership
        await self._announce_moves(engine, before, membership.exchange)
        layers = membership.layers
        await self._set_role(Role("pipelined", group_id, link.rank, layers.start, layers.end))
        if membership.stage_runner is not None:
            self._stage_task = asyncio.create_task(self._serve_stage(engine, membership))
        return membership.phases

    async def _serve_until_leader(self, engine: LLMEngine, link: StageLink) -> None:
        """A member that got the commit before the group's leader entered the drop serves
        on solo until it has (``reconfigure.leader_entered``), for at most the link's
        timeout, after which the drop's own wait for the leader fails the join."""
        deadline = time.monotonic() + link.timeout.total_seconds()
        while (engine.has_unfinished() and not reconfigure.leader_entered(link)
               and time.monotonic() < deadline):
            await self._step(engine)

    async def _migrate(self, engine: LLMEngine, command: GroupCommand) -> None:
        """The llumnix policy: hand running requests (with their KV) to, or take them from,
        the other member of ``command.link`` (``migration.py``), serving throughout: link
        I/O waits on a helper thread, the engine is touched only here, between two steps."""
        link = command.link
        assert link is not None
        migration: MigrationSource | MigrationDestination | None = None
        try:
            if self._membership is not None:
                raise ValueError(f"in group {self.role.group_id}: not migrating")
            migration = (MigrationSource(engine, link, command.blocks) if link.rank == 0
                         else MigrationDestination(engine, link))
            while not migration.done:
                await asyncio.to_thread(migration.wait)
                migration.advance(engine)
        except BaseException as exc:  # reported to whoever commanded it; the worker serves on
            if migration is not None:
                migration.abort(engine)
            if not isinstance(exc, Exception):  # the worker is stopping
                command.done.set_exception(RuntimeError("the worker stopped"))
                raise
            logger.warning("migration failed: %s", exc)
            command.done.set_exception(exc)
        else:
            stats = migration.stats
            logger.info("migration %s %d request(s) (%d blocks copied while decoding, %d in "
                        "the stop)", "in: took" if link.rank else "out: moved", stats.requests,
                        stats.copied_blocks, stats.stop_blocks)
            command.done.set_result(stats.phases())
        finally:
            close_in_background(link, command.layer_link)
            self._migrations.discard(asyncio.current_task())
            self._dirty = True
        if migration is not None and migration.moved:
            if link.rank == 0:
                await self._outlet.emit(HandedOff(sorted(migration.moved)))
            else:  # announced before any step can emit their tokens
                self._hold_steps = True
                try:
                    for rid in migration.moved:
                        await self._outlet.emit(_adopted(engine.scheduler.requests[rid]))
                finally:
                    self._hold_steps = False

    async def _announce_moves(self, engine: LLMEngine, before: set[str],
                              exchange: reconfigure.KVExchange | None = None) -> None:
        """Tell the outlet which requests left and which arrived since ``before`` (those a
        drop holds until their KV is in place arrived too)."""
        now = {rid: _adopted(r) for rid, r in engine.scheduler.requests.items()}
        for rid, state in (exchange.held.items() if exchange is not None else ()):
            now[rid] = Adopted(rid, len(state.prompt_token_ids), len(state.output_token_ids))
        if before - set(now):
            await self._outlet.emit(HandedOff(sorted(before - set(now))))
        for rid, adopted in now.items():
            if rid not in before:
                await self._outlet.emit(adopted)

    async def _complete_drop(self, engine: LLMEngine) -> None:
        """Leader: the drop's KV exchange is over; serve its requests, or solo again."""
        membership, command = self._membership, self._joining
        if membership is None or not membership.link.is_leader:
            return  # a follower's exchange needs nothing here; a fallen-back one is solo
        self._joining = None
        try:
            reconfigure.complete_drop(engine, membership)
        except Exception as exc:  # solo, every request requeued
            if not isinstance(exc, reconfigure.GroupFailed):  # a bug: leave the group anyway
                logger.exception("completing the drop failed")
                reconfigure.fall_back(engine, membership)
            self._membership = None
            logger.warning("group %s broke during the KV exchange: %s", membership.group_id,
                           exc)
            await self._set_role(Role())
            if command is not None:
                command.done.set_exception(exc)
        else:
            if command is not None:
                command.done.set_result(dict(membership.phases))
        self._dirty = True

    async def _serve_stage(self, engine: LLMEngine, membership: reconfigure.Membership) -> None:
        """A follower: run the stage loop on a helper thread (this loop stays free to report
        the load) until the leader starts a restore or the group breaks. Another helper
        thread waits for the leader's order to pull the layers back, and pulls them while
        the stage loop goes on serving."""
        pull = asyncio.create_task(self._pull_when_ordered(engine, membership))
        try:
            begin = await asyncio.to_thread(membership.stage_runner.run)
            if begin is None:
                raise StageLinkError("the leader ended the epoch")
            stage = await pull if membership.layer_link is not None else None
            reconfigure.restore(engine, membership, begin, stage)
        except (StageLinkError, reconfigure.GroupFailed) as exc:
            if not isinstance(exc, reconfigure.GroupFailed):
                reconfigure.fall_back(engine, membership)
            logger.warning("group %s broke, serving solo: %s", membership.group_id, exc)
            await self._outlet.emit(Lost(membership.handed_off))
        except Exception:  # the stage loop itself failed: leave the group, serve solo
            logger.exception("stage loop failed")
            reconfigure.fall_back(engine, membership)
            await self._outlet.emit(Lost(membership.handed_off))
        pull.cancel()  # a broken group closed the layer link: its thread has returned
        self._membership, self._stage_task = None, None
        await self._announce_moves(engine, set())
        await self._set_role(Role())
        self._dirty = True

    async def _pull_when_ordered(self, engine: LLMEngine,
                                 membership: reconfigure.Membership) -> LlamaStage | None:
        if membership.layer_link is None:
            return None
        return await asyncio.to_thread(reconfigure.pull_layers_when_ordered, engine, membership)

    async def _restore(self, engine: LLMEngine) -> dict:
        """Leader: pull the layers back while the group serves (the steps go on around this
        task), then stop serving, move the KV and split."""
        membership = self._membership
        if membership is None or not membership.link.is_leader:
            raise ValueError("only a group's leader restores it")
        exchange = membership.exchange
        if exchange is not None and not exchange.adopted:  # the drop's KV first
            await asyncio.to_thread(exchange.wait)
            await self._complete_drop(engine)
            if self._membership is not membership:
                raise StageLinkError("the group broke during the drop's KV exchange")
        reconfigure.plan_restore(engine, membership)  # ValueError: does not fit, stays as is
        if membership.layer_link is not None and membership.pulled is None:
            # once per group: the members' pull runs once too (a refused restore keeps it)
            reconfigure.order_layer_pull(membership)
            membership.pulled = await asyncio.to_thread(reconfigure.pull_layers, engine,
                                                        membership)
            if self._membership is not membership:
                raise StageLinkError("the group broke while the layers were pulled back")
        before = set(engine.scheduler.requests)
        self._hold_steps = True  # from the drain to the split, the main loop must not step
        try:
            outputs = engine.drain()
            if outputs:  # out before the members take the requests (they wait for our commit)
                await self._outlet.emit(outputs)
            begin = reconfigure.plan_restore(engine, membership)  # ValueError: stays as is
            self._restore_split(engine, membership, begin, membership.pulled)
        finally:
            self._hold_steps = False
            if self._membership is None:  # split, or fell back: solo either way
                left = before - set(engine.scheduler.requests)
                if left:
                    await self._outlet.emit(HandedOff(sorted(left)))
                await self._set_role(Role())
        return membership.phases

    def _restore_split(self, engine: LLMEngine, membership: reconfigure.Membership,
                       begin: BeginRestore, stage: LlamaStage | None) -> None:
        """The blocking part of the restore; solo afterwards, whatever happened (a broken
        group falls back, ``GroupFailed``)."""
        try:
            reconfigure.restore(engine, membership, begin, stage)
        finally:
            self._membership = None

    async def _fall_back(self, engine: LLMEngine, exc: Exception) -> None:
        membership, self._membership = self._membership, None
        requeued = reconfigure.fall_back(engine, membership)
        if self._joining is not None:  # the drop's exchange never completed
            self._joining.done.set_exception(reconfigure.GroupFailed(str(exc)))
            self._joining = None
        logger.warning("group %s broke (%s): serving solo, %d requests requeued",
                       membership.group_id, exc, requeued)
        await self._set_role(Role())

    async def _set_role(self, role: Role) -> None:
        self.role = role
        await self._outlet.emit(RoleChanged(role))
        self._last_report = float("-inf")  # the next boundary reports the new shape

    async def _report_load(self, engine: LLMEngine) -> None:
        since = (time.monotonic() - self._last_report) * 1000
        s = self.settings
        if since < s.liveness_ttl_ms / 3 and not (self._dirty and since >= s.load_refresh_ms):
            return
        held = len(self._exchange.unadopted()) if self._exchange is not None else 0
        await self._outlet.emit(LoadReport(snapshot_load(engine, s.instance_id, self.role, held),
                                           *self._released))
        self._released = [0, 0]
        self._dirty, self._last_report = False, time.monotonic()


def snapshot_load(engine: LLMEngine, instance_id: str, role: Role | None = None,
                  held: int = 0) -> InstanceLoad:
    """``held``: running requests a drop holds while their KV moves (not in the scheduler)."""
    scheduler, blocks = engine.scheduler, engine.block_manager
    usage = blocks.usage()
    role = role or Role(layer_end=engine.model_config.num_layers)
    memory = engine.memory_report()
    layer_end = role.layer_end if role.state != "solo" else engine.model_config.num_layers
    swaps = getattr(engine.runner, "swap_spaces", [])
    return InstanceLoad(
        instance_id=instance_id, running=scheduler.num_running + held,
        waiting=scheduler.num_waiting,
        blocks_total=usage.total, blocks_used=usage.used, block_size=blocks.block_size,
        queued_tokens=sum(r.num_uncomputed_tokens for r in scheduler.waiting),
        kv_bound=int(scheduler.kv_bound),
        num_preemptions=scheduler.num_preemptions, num_swaps=scheduler.num_swaps,
        swap_bytes=sum(space.bytes_copied for space in swaps),
        swap_seconds=sum(space.seconds for space in swaps), updated_at=time.time(),
        state=role.state, group_id=role.group_id or instance_id, stage=role.stage,
        layer_start=role.layer_start, layer_end=layer_end,
        parameter_bytes=memory["parameter_bytes"], kv_bytes=memory["kv_bytes"],
        budget_bytes=memory["budget_bytes"], reserve_bytes=memory["reserve_bytes"])


def _adopted(request: Request) -> Adopted:
    return Adopted(request.request_id, request.num_prompt_tokens, request.num_output_tokens)
