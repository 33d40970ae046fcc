"""One request's bookkeeping: its ledger row, its metrics and its server span.

``Generation`` calls it as updates arrive; every call is O(1) and does no I/O (ledger writes
are queued by the ledger itself). ``finish`` happens exactly once and ends the span.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from opentelemetry.trace import Span, Status, StatusCode

from kunserve.gateway.metrics import GatewayMetrics
from kunserve.ledger import RequestStatus

FINISH_REASONS = frozenset({"stop", "length", "abort"})


class RequestLedger(Protocol):
    """The part of ``kunserve.ledger.Ledger`` the gateway writes to."""

    def record_arrival(self, request_id: str, arrival_time: float, model: str,
                       prompt_tokens: int, stream: bool) -> None: ...
    def record_dispatch(self, request_id: str, instance_id: str, dispatch_time: float) -> None: ...
    def record_first_token(self, request_id: str, time: float) -> None: ...
    def record_finish(self, request_id: str, finish_time: float, output_tokens: int,
                      finish_reason: str | None, status: RequestStatus | str,
                      error: str | None = None) -> None: ...


@dataclass(frozen=True)
class Arrival:
    """When a request reached the gateway, on both clocks (wall for the ledger, monotonic
    for latencies)."""

    wall: float
    mono: float

    @classmethod
    def now(cls) -> Arrival:
        return cls(time.time(), time.perf_counter())


class RequestTracker:
    def __init__(self, request_id: str, arrival: Arrival, model: str, prompt_tokens: int,
                 stream: bool, ledger: RequestLedger, metrics: GatewayMetrics,
                 span: Span) -> None:
        self.request_id = request_id
        self.arrival = arrival
        self.prompt_tokens = prompt_tokens
        self.output_tokens = 0
        self.span = span
        self.finished = False
        self._ledger = ledger
        self._metrics = metrics
        self._last_token: float | None = None
        ledger.record_arrival(request_id, arrival.wall, model, prompt_tokens, stream)
        span.set_attribute("kunserve.request_id", request_id)
        span.set_attribute("gen_ai.request.model", model)
        span.set_attribute("gen_ai.usage.input_tokens", prompt_tokens)

    def on_accepted(self, instance_id: str) -> None:
        now = time.perf_counter()
        self._metrics.queue_time.observe(now - self.arrival.mono)
        self._metrics.prompt_tokens.inc(self.prompt_tokens)
        self._ledger.record_dispatch(self.request_id, instance_id, self._wall(now))
        self.span.set_attribute("kunserve.instance_id", instance_id)
        self.span.add_event("accepted")

    def on_failover(self, lost: str, instance_id: str, tokens_before: int) -> None:
        """The request went on on ``instance_id`` after ``lost`` died (``tokens_before``
        streamed by then): a span event and the failover counter, nothing in the ledger
        (its row keeps the first dispatch)."""
        self._metrics.failovers.inc()
        self.span.set_attribute("kunserve.instance_id", instance_id)
        self.span.add_event("failover", {"kunserve.lost_instance_id": lost,
                                         "kunserve.instance_id": instance_id,
                                         "kunserve.tokens_before": tokens_before})

    def on_tokens(self, count: int) -> None:
        now = time.perf_counter()
        if self._last_token is None:
            self._metrics.ttft.observe(now - self.arrival.mono)
            self._ledger.record_first_token(self.request_id, self._wall(now))
            self.span.add_event("first_token")
        else:
            self._metrics.itl.observe(now - self._last_token)
        self._last_token = now
        self.output_tokens += count
        self._metrics.generation_tokens.inc(count)

    def finish(self, status: RequestStatus, finish_reason: str | None = None,
               error: str | None = None, error_kind: str | None = None) -> None:
        """``error_kind`` (unavailable, timeout, worker, invalid) labels the error counter."""
        if self.finished:
            return
        self.finished = True
        now = time.perf_counter()
        if finish_reason in FINISH_REASONS:
            self._metrics.e2e.observe(now - self.arrival.mono)
            self._metrics.count_finished(finish_reason)
        if error_kind is not None:
            self._metrics.count_error(error_kind)
        self._ledger.record_finish(self.request_id, self._wall(now), self.output_tokens,
                                   finish_reason, status, error)
        self.span.set_attribute("gen_ai.usage.output_tokens", self.output_tokens)
        self.span.set_attribute("kunserve.status", str(status))
        if finish_reason:
            self.span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
        if error:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()

    def _wall(self, mono: float) -> float:
        return self.arrival.wall + (mono - self.arrival.mono)
