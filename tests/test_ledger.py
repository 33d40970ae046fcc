"""The request ledger against real databases: SQLite always, PostgreSQL when
``KUNSERVE_TEST_POSTGRES_URL`` names one (e.g. ``postgresql+asyncpg://postgres@127.0.0.1/test``).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from kunserve.ledger import Ledger, RequestStatus

POSTGRES_URL = os.environ.get("KUNSERVE_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgres"])
async def open_ledger(request, tmp_path):
    """A factory of ledgers on one database (SQLite file, or a fresh PostgreSQL schema that is
    dropped afterwards); every ledger it opened is closed at the end."""
    ledgers: list[Ledger] = []
    schema = None
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'state' / 'ledger.db'}"
    else:
        if not POSTGRES_URL:
            pytest.skip("set KUNSERVE_TEST_POSTGRES_URL to run the ledger on PostgreSQL")
        url, schema = POSTGRES_URL, f"kunserve_test_{uuid.uuid4().hex[:12]}"
        await _run_sql(url, f"CREATE SCHEMA {schema}")

    async def open_(**kwargs) -> Ledger:
        ledger = Ledger(url, schema=schema, **kwargs)
        await ledger.start()
        ledgers.append(ledger)
        return ledger

    yield open_
    for ledger in ledgers:
        await ledger.close()
    if schema:
        await _run_sql(url, f"DROP SCHEMA {schema} CASCADE")


async def _run_sql(url: str, sql: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text(sql))
    await engine.dispose()


def record_lifecycle(ledger: Ledger, request_id: str, t0: float = 1000.0) -> None:
    ledger.record_arrival(request_id, t0, "tiny-llama", prompt_tokens=7, stream=True)
    ledger.record_dispatch(request_id, "worker-1", t0 + 0.01)
    ledger.record_first_token(request_id, t0 + 0.05)
    ledger.record_finish(request_id, t0 + 0.2, output_tokens=4, finish_reason="length",
                         status=RequestStatus.FINISHED)


async def test_updates_queued_behind_their_insert_apply_in_order(open_ledger):
    ledger = await open_ledger()
    record_lifecycle(ledger, "req-1")
    ledger.record_arrival("req-2", 1001.0, "tiny-llama", 3, stream=False)
    ledger.record_finish("req-2", 1001.5, 0, None, "rejected", error="prompt too long")

    assert await ledger.get("req-1") == {
        "request_id": "req-1", "model": "tiny-llama", "stream": True, "arrival_time": 1000.0,
        "dispatch_instance": "worker-1", "dispatch_time": 1000.01, "first_token_time": 1000.05,
        "finish_time": 1000.2, "prompt_tokens": 7, "output_tokens": 4,
        "finish_reason": "length", "status": "finished", "error": None}
    rejected = await ledger.get("req-2")
    assert rejected["status"] == "rejected" and rejected["error"] == "prompt too long"
    assert rejected["dispatch_instance"] is None and rejected["stream"] is False
    assert await ledger.get("never-seen") is None


async def test_later_records_update_a_committed_row(open_ledger):
    ledger = await open_ledger()
    ledger.record_arrival("req-1", 5.0, "m", 2, stream=False)
    ledger.record_dispatch("req-1", "worker-0", 5.1)
    assert (await ledger.get("req-1"))["status"] == "running"

    ledger.record_first_token("req-1", 5.2)
    ledger.record_finish("req-1", 5.3, 1, "abort", "aborted", error="client disconnected")
    row = await ledger.get("req-1")
    assert (row["status"], row["first_token_time"], row["error"]) == (
        "aborted", 5.2, "client disconnected")
    assert row["dispatch_instance"] == "worker-0"


async def test_records_are_batched_and_never_wait_on_the_database(open_ledger):
    ledger = await open_ledger()
    for method in ("record_arrival", "record_dispatch", "record_first_token", "record_finish"):
        assert not inspect.iscoroutinefunction(getattr(ledger, method))

    for i in range(300):  # no await in between: the writer cannot run until the loop is free
        record_lifecycle(ledger, f"req-{i}")
    await ledger.flush()
    assert ledger.batches_written == 1  # 1200 records, one transaction
    assert (await ledger.get("req-299"))["status"] == "finished"


async def test_a_thousand_requests_are_recorded_in_batches(open_ledger):
    """A thousand lifecycles go out in a few batched transactions, none lost (no wall-clock
    bound here: a busy machine broke the one this test had)."""
    ledger = await open_ledger()
    for i in range(1000):
        record_lifecycle(ledger, f"req-{i}", t0=float(i))
        if i % 50 == 0:
            await asyncio.sleep(0)  # let the writer interleave, as it would under traffic
    await ledger.flush()

    assert ledger.batches_written < 100 and ledger.lost_writes == 0
    rows = [await ledger.get(f"req-{i}") for i in (0, 499, 999)]
    assert [r["arrival_time"] for r in rows] == [0.0, 499.0, 999.0]
    assert all(r["status"] == "finished" and r["output_tokens"] == 4 for r in rows)


async def test_close_writes_what_is_pending(open_ledger):
    ledger = await open_ledger()
    record_lifecycle(ledger, "req-1")
    await ledger.close()
    await ledger.close()  # idempotent
    ledger.record_first_token("req-1", 1.0)  # too late: counted, not raised
    assert ledger.lost_writes == 1

    reopened = await open_ledger()  # same database: the table is there, the row too
    assert (await reopened.get("req-1"))["status"] == "finished"


async def test_a_bad_record_loses_only_its_own_request(open_ledger, caplog):
    ledger = await open_ledger()
    ledger.record_arrival("dup", 1.0, "m", 1, stream=False)
    await ledger.flush()
    ledger.record_arrival("dup", 2.0, "m", 1, stream=False)  # primary key clash
    record_lifecycle(ledger, "ok")
    await ledger.flush()

    assert ledger.lost_writes == 1 and "dup" in caplog.text
    assert (await ledger.get("ok"))["status"] == "finished"
    assert (await ledger.get("dup"))["arrival_time"] == 1.0


async def test_an_unknown_status_is_refused_at_the_call(open_ledger):
    ledger = await open_ledger()
    with pytest.raises(ValueError):
        ledger.record_finish("req-1", 1.0, 0, None, status="done")
