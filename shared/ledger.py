"""The request ledger: one row per request, written off the hot path (SQLAlchemy 2 async ORM).

The gateway calls the ``record_*`` methods from its event loop as a request moves along
(arrival -> dispatch -> first token -> finish). They only append to an in-memory list and
return; ONE background task takes everything pending, folds it into one row per request and
writes the lot in a single transaction (a bulk INSERT for new requests, a bulk UPDATE for the
rest), so a request never waits on the database. Records of one request apply in call order,
including updates whose request's insert is still pending. The task lingers up to
``linger_s`` after the first pending record, so that many requests share a transaction: one
costs ~2 ms of the event loop's CPU whatever its size (SQLAlchemy, the driver's round trips),
on the loop that also streams tokens. ``flush`` (and ``get``, ``close``) cut the linger short.

Any SQLAlchemy async URL works; SQLite (``aiosqlite``) and PostgreSQL (``asyncpg``) are tested.

Where its job ends: it stores what it is told. It does not decide request status (the gateway
does) and it is not read on the request path; ``get`` is for admin and tests.

The ``plans`` table (``PlanRecord``) holds one row per drop, restore or (the llumnix policy)
migration the planner ran, written by ``PlanLedger``: a handful of rows per burst, so each is
one awaited INSERT, no batching.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Double,
    Integer,
    String,
    Text,
    bindparam,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

logger = logging.getLogger(__name__)

DEFAULT_URL = "sqlite+aiosqlite:///./kunserve-ledger.db"


class RequestStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"
    REJECTED = "rejected"


class LedgerBase(DeclarativeBase):
    """Every ledger table (``requests``, ``plans``). ``start`` creates them all."""


class RequestRecord(LedgerBase):
    __tablename__ = "requests"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(256))
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    arrival_time: Mapped[float] = mapped_column(Double, index=True)  # wall clock, seconds
    dispatch_instance: Mapped[str | None] = mapped_column(String(128))
    dispatch_time: Mapped[float | None] = mapped_column(Double)
    first_token_time: Mapped[float | None] = mapped_column(Double)
    finish_time: Mapped[float | None] = mapped_column(Double)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=RequestStatus.QUEUED.value)
    error: Mapped[str | None] = mapped_column(Text)


_COLUMNS = tuple(c.key for c in RequestRecord.__table__.columns)


class PlanRecord(LedgerBase):
    """One reconfiguration the planner ran (a plan with several new groups: one row each,
    sharing ``plan_id``)."""

    __tablename__ = "plans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    plan_id: Mapped[str] = mapped_column(String(64), index=True)
    epoch: Mapped[int] = mapped_column(Integer, index=True)  # the topology's after it
    time: Mapped[float] = mapped_column(Double, index=True)  # wall clock at its start, seconds
    action: Mapped[str] = mapped_column(String(16))  # drop | restore | migration
    trigger: Mapped[str] = mapped_column(String(16))  # auto | admin
    group_id: Mapped[str] = mapped_column(String(128), default="")
    members: Mapped[list] = mapped_column(JSON, default=list)
    figures: Mapped[dict] = mapped_column(JSON, default=dict)  # what triggered it
    groups_before: Mapped[list] = mapped_column(JSON, default=list)  # [[member, ...], ...]
    groups_after: Mapped[list] = mapped_column(JSON, default=list)
    phase_seconds: Mapped[dict] = mapped_column(JSON, default=dict)  # prepare, commit, restore
    plan_seconds: Mapped[float | None] = mapped_column(Double)  # computing the plan
    duration_s: Mapped[float] = mapped_column(Double, default=0.0)
    outcome: Mapped[str] = mapped_column(String(16))  # ok | failed
    error: Mapped[str | None] = mapped_column(Text)


_PLAN_COLUMNS = tuple(c.key for c in PlanRecord.__table__.columns)


@dataclass
class _Record:
    """One ``record_*`` call: the columns it sets; ``insert`` for an arrival."""

    request_id: str
    values: dict[str, Any]
    insert: bool = False


@dataclass
class _Row:
    """A request's pending records folded together."""

    values: dict[str, Any] = field(default_factory=dict)
    insert: bool = False

    def apply(self, record: _Record) -> None:
        self.insert = self.insert or record.insert
        self.values.update(record.values)


class Ledger:
    """``await start()``, then ``record_*`` from the event loop, ``await close()`` at exit.

    ``record_*`` never block and never raise for database trouble: a write that fails, or a
    record made after ``close``, is logged and counted in ``lost_writes``. Call them from the
    loop's thread.
    ``schema`` (PostgreSQL) puts the tables in that schema instead of the default one.
    """

    def __init__(self, url: str = DEFAULT_URL, *, schema: str | None = None,
                 max_batch: int = 2000, linger_s: float = 0.5) -> None:
        self.url = url
        self.max_batch = max_batch
        self.linger_s = linger_s  # module docstring: why a transaction waits
        self.batches_written = 0  # transactions committed by the writer
        self.lost_writes = 0  # rows/records not written (logged); SQLite also counts unknown ids
        self._base_engine = create_async_engine(url)
        self._engine = _configure(self._base_engine, schema)
        self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)
        self._pending: list[_Record] = []
        self._wakeup = asyncio.Event()
        self._flush_requested = asyncio.Event()  # someone waits: stop lingering
        self._progress = asyncio.Condition()
        self._enqueued = 0  # records ever queued
        self._done = 0  # records written (or lost)
        self._writer: asyncio.Task | None = None
        self._closed = False

    async def start(self) -> None:
        """Create the tables (if missing) and start the writer task."""
        _make_sqlite_parent(self.url)
        async with self._engine.begin() as conn:
            await conn.run_sync(LedgerBase.metadata.create_all)
        self._writer = asyncio.create_task(self._write_forever(), name="ledger-writer")

    # -- the hot path: append and return -------------------------------------------------

    def record_arrival(self, request_id: str, arrival_time: float, model: str,
                       prompt_tokens: int, stream: bool) -> None:
        self._enqueue(_Record(request_id, dict(
            arrival_time=arrival_time, model=model, prompt_tokens=prompt_tokens,
            stream=stream, status=RequestStatus.QUEUED.value), insert=True))

    def record_dispatch(self, request_id: str, instance_id: str, dispatch_time: float) -> None:
        self._enqueue(_Record(request_id, dict(
            dispatch_instance=instance_id, dispatch_time=dispatch_time,
            status=RequestStatus.RUNNING.value)))

    def record_first_token(self, request_id: str, time: float) -> None:
        self._enqueue(_Record(request_id, dict(first_token_time=time)))

    def record_finish(self, request_id: str, finish_time: float, output_tokens: int,
                      finish_reason: str | None, status: RequestStatus | str,
                      error: str | None = None) -> None:
        """``status``: one of ``RequestStatus`` (a bad value raises ``ValueError`` here)."""
        self._enqueue(_Record(request_id, dict(
            finish_time=finish_time, output_tokens=output_tokens, finish_reason=finish_reason,
            status=RequestStatus(status).value, error=error)))

    def _enqueue(self, record: _Record) -> None:
        if self._closed:  # a shutdown-order bug; the request itself must not fail over it
            self.lost_writes += 1
            logger.warning("ledger closed: dropped a record of request %s", record.request_id)
            return
        self._pending.append(record)
        self._enqueued += 1
        self._wakeup.set()

    # -- reads and lifecycle ---------------------------------------------------------------

    async def flush(self) -> None:
        """Return once every record made before this call is written (or logged as lost)."""
        target = self._enqueued
        if self._writer is None:
            raise RuntimeError("Ledger.start() was not called")
        self._flush_requested.set()
        async with self._progress:
            await self._progress.wait_for(lambda: self._done >= target or self._writer.done())

    async def get(self, request_id: str) -> dict | None:
        """The request's row as a dict (every record made before this call applied), or
        None when the ledger has no such request."""
        await self.flush()
        async with self._sessions() as session:
            row = await session.get(RequestRecord, request_id)
            return None if row is None else {name: getattr(row, name) for name in _COLUMNS}

    async def close(self) -> None:
        """Write everything pending, stop the writer, release the database. Idempotent."""
        if self._closed:
            return
        if self._writer is not None:
            # records made while flushing (the gateway finishing its last requests) count too
            while self._done < self._enqueued and not self._writer.done():
                await self.flush()
            self._closed = True
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        self._closed = True
        await self._base_engine.dispose()

    # -- the writer --------------------------------------------------------------------------

    async def _write_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            if len(self._pending) < self.max_batch:
                await self._linger()
            self._wakeup.clear()
            self._flush_requested.clear()  # what it waits for is pending now: in this write
            while self._pending:
                batch = self._pending[:self.max_batch]
                del self._pending[:self.max_batch]
                await self._write_batch(batch)
                async with self._progress:
                    self._done += len(batch)
                    self._progress.notify_all()

    async def _linger(self) -> None:
        """Wait ``linger_s``, or less when ``flush`` is called meanwhile."""
        try:
            async with asyncio.timeout(self.linger_s):
                await self._flush_requested.wait()
        except TimeoutError:
            pass

    async def _write_batch(self, batch: list[_Record]) -> None:
        rows = _fold(batch)
        try:
            await self._write_rows(rows.items())
        except Exception:  # e.g. a duplicate request id: write the others one by one
            logger.warning("ledger batch of %d requests failed; retrying one by one",
                           len(rows), exc_info=True)
            failed: list[str] = []
            for item in rows.items():
                try:
                    await self._write_rows([item])
                except Exception as exc:
                    failed.append(f"{item[0]} ({exc.__class__.__name__})")
            if failed:
                self.lost_writes += len(failed)
                logger.error("ledger: lost the records of %d requests: %s", len(failed),
                             ", ".join(failed[:5]) + (" ..." if len(failed) > 5 else ""))

    async def _write_rows(self, rows: Iterable[tuple[str, _Row]]) -> None:
        inserts, updates = [], []
        for request_id, row in rows:
            values = {"request_id": request_id, **row.values}
            (inserts if row.insert else updates).append(values)
        async with self._sessions.begin() as session:
            if inserts:
                await session.execute(insert(RequestRecord), inserts)
            if updates:
                await self._update_rows(await session.connection(), updates)
        self.batches_written += 1

    async def _update_rows(self, conn: AsyncConnection, updates: list[dict]) -> None:
        # Core executemany (one call per set of columns): unlike the ORM's bulk UPDATE, a
        # record for a request the ledger never saw does not fail the whole batch
        table = RequestRecord.__table__
        for group in _group_by_columns(updates):
            stmt = update(table).where(table.c.request_id == bindparam("_id"))
            params = [{"_id": v["request_id"], **_without_id(v)} for v in group]
            result = await conn.execute(stmt, params)
            if conn.dialect.supports_sane_multi_rowcount and result.rowcount < len(params):
                self.lost_writes += len(params) - result.rowcount
                logger.warning("ledger: %d updates named requests it never recorded",
                               len(params) - result.rowcount)


class PlanLedger:
    """The planner's writer of ``plans`` rows: ``await start()``, ``await record(...)`` per
    reconfiguration, ``await close()``. ``record`` never raises for database trouble (the
    reconfiguration happened whatever the ledger says): it logs and counts ``lost_writes``."""

    _CREATE_ATTEMPTS, _CREATE_RETRY_S = 3, 0.5

    def __init__(self, url: str = DEFAULT_URL, *, schema: str | None = None) -> None:
        self.url = url
        self.lost_writes = 0
        self._base_engine = create_async_engine(url)
        self._engine = _configure(self._base_engine, schema)
        self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)

    async def start(self) -> None:
        """Create the tables if missing (retried: the gateway may be creating them too)."""
        _make_sqlite_parent(self.url)
        for attempt in range(self._CREATE_ATTEMPTS):
            try:
                async with self._engine.begin() as conn:
                    await conn.run_sync(LedgerBase.metadata.create_all)
                return
            except Exception:
                if attempt == self._CREATE_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(self._CREATE_RETRY_S)

    async def record(self, **values: Any) -> None:
        """Insert one row (``PlanRecord`` columns)."""
        try:
            async with self._sessions.begin() as session:
                await session.execute(insert(PlanRecord), [values])
        except Exception:
            self.lost_writes += 1
            logger.warning("ledger: lost a plan record (%s %s)", values.get("action"),
                           values.get("group_id"), exc_info=True)

    async def plans(self) -> list[dict]:
        """Every row, oldest first, as dicts."""
        async with self._sessions() as session:
            rows = (await session.scalars(select(PlanRecord).order_by(PlanRecord.id))).all()
        return [{name: getattr(row, name) for name in _PLAN_COLUMNS} for row in rows]

    async def close(self) -> None:
        await self._base_engine.dispose()


def _fold(batch: list[_Record]) -> dict[str, _Row]:
    """One row per request, its records applied in order (later values win)."""
    rows: dict[str, _Row] = {}
    for record in batch:
        rows.setdefault(record.request_id, _Row()).apply(record)
    return rows


def _without_id(values: dict) -> dict:
    return {k: v for k, v in values.items() if k != "request_id"}


def _group_by_columns(updates: list[dict]) -> list[list[dict]]:
    groups: dict[tuple[str, ...], list[dict]] = {}
    for values in updates:
        groups.setdefault(tuple(sorted(values)), []).append(values)
    return list(groups.values())


def _configure(engine: AsyncEngine, schema: str | None) -> AsyncEngine:
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _tune_sqlite)
    if schema is not None:
        engine = engine.execution_options(schema_translate_map={None: schema})
    return engine


def _tune_sqlite(dbapi_connection, _record) -> None:
    # WAL: readers (get) do not block the writer; NORMAL sync is safe with WAL
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _make_sqlite_parent(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
