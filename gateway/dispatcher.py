"""From a validated request to a ``Generation`` running on the mesh.

``Dispatcher`` owns what every request goes through after validation, in this order: the
server span and the ledger row (from arrival), admission (429 before any response byte), then
submission to the routers with the trace context in the NATS headers. Handlers only parse and
render.
"""

from __future__ import annotations

import weakref

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer

from kunserve.gateway.admission import AdmissionController, AdmissionRejected
from kunserve.gateway.errors import too_many_requests
from kunserve.gateway.generation import Generation
from kunserve.gateway.mesh_client import MeshClient
from kunserve.gateway.metrics import GatewayMetrics
from kunserve.gateway.request_tracker import Arrival, RequestLedger, RequestTracker
from kunserve.ledger import RequestStatus
from kunserve.protocol import GenerateRequest, Sampling
from kunserve.telemetry import inject_headers

SPAN_NAME = "gateway.completions"


class Dispatcher:
    def __init__(self, model_name: str, admission: AdmissionController, mesh: MeshClient,
                 ledger: RequestLedger, metrics: GatewayMetrics, tracer: Tracer, *,
                 retry_after_s: int, dispatch_timeout_s: float, request_timeout_s: float,
                 max_failovers: int) -> None:
        self._model_name = model_name
        self._retry_after_s = retry_after_s
        self._dispatch_timeout_s = dispatch_timeout_s
        self._request_timeout_s = request_timeout_s
        self._max_failovers = max_failovers
        self._admission = admission
        self._mesh = mesh
        self._ledger = ledger
        self._metrics = metrics
        self._tracer = tracer
        self._generations: weakref.WeakSet[Generation] = weakref.WeakSet()

    def check_capacity(self, request_id: str, arrival: Arrival, stream: bool) -> None:
        """Refuse (429) at once when no request slot is free: before tokenizing."""
        try:
            self._admission.check_request_slot()
        except AdmissionRejected as exc:
            raise self._reject(self._track(request_id, arrival, 0, stream), exc) from None

    async def start(self, request_id: str, arrival: Arrival, prompt_token_ids: list[int],
                    sampling: Sampling, stream: bool) -> Generation:
        tracker = self._track(request_id, arrival, len(prompt_token_ids), stream)
        try:
            ticket = self._admission.try_admit(len(prompt_token_ids))
        except AdmissionRejected as exc:
            raise self._reject(tracker, exc) from None
        request = GenerateRequest(request_id=self._mesh.wire_id(request_id),
                                  prompt_token_ids=prompt_token_ids, sampling=sampling,
                                  arrival_time=arrival.wall)
        generation = Generation(request, self._mesh, tracker, ticket, self._dispatch_timeout_s,
                                self._request_timeout_s, max_failovers=self._max_failovers)
        try:
            await generation.start(inject_headers(context=trace.set_span_in_context(tracker.span)))
        except BaseException:
            generation.close("gateway gave up before the request started")
            raise
        self._generations.add(generation)
        return generation

    def in_flight(self) -> list[Generation]:
        """The requests started and not yet garbage (the failover watchdog's to check)."""
        return list(self._generations)

    def close_all(self, reason: str = "gateway shutting down") -> None:
        """Abort every unfinished request (at shutdown, before the ledger and NATS close)."""
        for generation in list(self._generations):
            generation.close(reason)

    def _track(self, request_id: str, arrival: Arrival, prompt_tokens: int,
               stream: bool) -> RequestTracker:
        span = self._tracer.start_span(SPAN_NAME, kind=SpanKind.SERVER,
                                       start_time=int(arrival.wall * 1e9))
        return RequestTracker(request_id, arrival, self._model_name, prompt_tokens, stream,
                              self._ledger, self._metrics, span)

    def _reject(self, tracker: RequestTracker, exc: AdmissionRejected):
        self._metrics.count_rejection(exc.reason)
        tracker.finish(RequestStatus.REJECTED, error=str(exc))
        return too_many_requests(str(exc), self._retry_after_s)
