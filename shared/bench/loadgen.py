"""The load generator: sends requests on their schedule (open loop) and records each one.

Every request is a streamed ``POST /v1/completions`` with a token-id prompt, ``max_tokens`` its
output length, ``ignore_eos``, ``temperature`` 0 and ``return_token_ids`` (so each chunk says
how many tokens it brings). A request is sent at its arrival time whether or not the earlier
ones have answered. Each gets a ``RequestRecord``: when it was sent, each token-bearing chunk's
time and token count, the end, and how it ended (``ok``, ``rejected`` for HTTP 429, ``failed``
for anything else: another HTTP status, an error event in the stream, a stream cut before
``[DONE]``, fewer tokens than asked for, a timeout). Nothing is dropped from the list.

Where its job ends: it measures; ``stats.py`` computes, ``results.py`` writes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence

import httpx

from kunserve.bench.cluster_monitor import ClusterMonitor, ClusterSample, settled
from kunserve.bench.request_record import RequestRecord, Status
from kunserve.bench.workload import BenchRequest

DEFAULT_REQUEST_TIMEOUT_S = 600.0


def make_client(url: str, request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
                ) -> httpx.AsyncClient:
    # no connection cap: an open-loop burst may have hundreds of requests in flight
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(request_timeout_s, connect=30),
                             limits=httpx.Limits(max_connections=None,
                                                 max_keepalive_connections=256))


def completion_body(model: str, request: BenchRequest) -> dict:
    return {"model": model, "prompt": request.prompt_token_ids,
            "max_tokens": request.output_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}


async def stream_request(client: httpx.AsyncClient, model: str, request: BenchRequest,
                         record: RequestRecord, t0: float, timeout_s: float) -> None:
    """Send one request and fill ``record``; never raises (except cancellation)."""
    record.sent_s = time.perf_counter() - t0
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", "/v1/completions",
                                     json=completion_body(model, request)) as response:
                record.http_status = response.status_code
                if response.status_code != 200:
                    body = (await response.aread()).decode(errors="replace")
                    record.status = (Status.REJECTED if response.status_code == 429
                                     else Status.FAILED)
                    record.error = f"HTTP {response.status_code}: {error_message(body)}"
                    return
                await _read_stream(response, record, t0)
    except TimeoutError:
        record.status, record.error = Status.FAILED, f"timed out after {timeout_s:g}s"
    except (httpx.HTTPError, OSError, ValueError) as exc:  # ValueError: an unreadable event
        record.status, record.error = Status.FAILED, f"{exc.__class__.__name__}: {exc}"
    finally:
        record.end_s = time.perf_counter() - t0


async def _read_stream(response: httpx.Response, record: RequestRecord, t0: float) -> None:
    done = False
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
            break
        event = json.loads(payload)
        if "error" in event:
            record.status = Status.FAILED
            record.error = f"error event: {error_message(payload)}"
            return
        tokens = sum(len(c.get("token_ids") or []) for c in event.get("choices", []))
        if tokens:
            now = time.perf_counter() - t0
            if record.first_token_s is None:
                record.first_token_s = now
            record.chunk_times_s.append(now)
            record.chunk_tokens.append(tokens)
            record.output_tokens += tokens
    record.status, record.error = _outcome(done, record)


def _outcome(done: bool, record: RequestRecord) -> tuple[Status, str | None]:
    if not done:
        return Status.FAILED, "the stream ended before [DONE]"
    if record.output_tokens < record.expected_output_tokens:
        return Status.FAILED, (f"{record.output_tokens} of {record.expected_output_tokens} "
                               "tokens")
    return Status.OK, None


def error_message(body: str) -> str:
    """The OpenAI error's message, else the body's start."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.strip()[:200]


def _last_end(records: Sequence[RequestRecord]) -> float:
    return max((r.end_s for r in records if r.end_s is not None), default=0.0)


# -- a whole replay --------------------------------------------------------------------------


class Progress:
    """tqdm when it is installed, else one line rewritten at most every second."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc = total, desc
        self.counts = {s: 0 for s in Status}
        self._last = 0.0
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True)

    def done(self, record: RequestRecord) -> None:
        self.counts[record.status] += 1
        postfix = {str(s): n for s, n in self.counts.items()}
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(postfix, refresh=False)
            return
        now = time.monotonic()
        finished = sum(self.counts.values())
        if now - self._last >= 1.0 or finished == self.total:
            self._last = now
            print(f"\r{self.desc}: {finished}/{self.total} " +
                  " ".join(f"{k}={v}" for k, v in postfix.items()), end="", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            print(file=sys.stderr)


async def replay(url: str, model: str, requests: Sequence[BenchRequest], *,
                 admin_token: str | None = None, sample_interval_s: float = 0.5,
                 baseline: dict[str, str] | None = None, settle_s: float = 0.0,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                 desc: str = "replay") -> tuple[list[RequestRecord], list[ClusterSample]]:
    """Send ``requests`` on their schedule; one record per request (same order) and the
    cluster samples taken meanwhile, and after the last request for up to ``settle_s`` more
    seconds until the stack is back to ``baseline`` (``cluster_monitor.settled``), so that a
    restore after the run is seen."""
    records = [RequestRecord(r.index, r.arrival_s, r.input_tokens, r.output_tokens)
               for r in requests]
    progress = Progress(len(records), desc)
    async with make_client(url, request_timeout_s) as client:
        monitor = ClusterMonitor(client, admin_token, sample_interval_s)
        stop = asyncio.Event()
        t0 = time.perf_counter()
        sampling = asyncio.create_task(monitor.run(t0, stop))

        async def one(request: BenchRequest, record: RequestRecord) -> None:
            await stream_request(client, model, request, record, t0, request_timeout_s)
            progress.done(record)

        tasks = []
        try:
            for request, record in zip(requests, records, strict=True):
                delay = t0 + request.arrival_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(request, record)))
            await asyncio.gather(*tasks)
            await asyncio.sleep(sample_interval_s)  # at least one sample after the last request
            while (time.perf_counter() - t0 < _last_end(records) + settle_s
                   and not settled(monitor.samples[-1] if monitor.samples else None, baseline)):
                await asyncio.sleep(sample_interval_s)
        finally:
            for task in tasks:
                task.cancel()
            stop.set()
            await sampling
            progress.close()
    return records, monitor.samples
