"""One admitted request on the mesh, from submission to its last update.

``start`` submits it and returns once a worker took it, or raises ``OpenAIError`` (503 no
router / no live worker / NATS down / timeout, 500 worker error). It waits for the router's
answer only until the request's first update arrives: the worker's ``accepted`` says as much
as the answer, and often sooner (the router answers after the worker's receipt, and its
process may be waiting for a core while the worker's update is already in). ``updates`` yields the
updates carrying tokens or the finish, and raises ``OpenAIError`` when the request fails on the
way. ``close`` ends it on every path: an unfinished request is aborted on its worker, its
admission budget is given back, its subscription dropped. ``close`` is synchronous and
idempotent, so it is safe in ``finally`` blocks that run on cancellation.

Per update the work is a queue get, a msgspec decode and the tracker's O(1) bookkeeping.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import msgspec
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from kunserve.gateway.admission import AdmissionTicket
from kunserve.gateway.errors import OpenAIError, server_error, service_unavailable
from kunserve.gateway.mesh_client import MeshClient
from kunserve.gateway.request_tracker import RequestTracker
from kunserve.ledger import RequestStatus
from kunserve.protocol import GenerateRequest, RequestUpdate, decode

logger = logging.getLogger(__name__)

NO_WORKER = "no live worker instance"


class Generation:
    def __init__(self, request: GenerateRequest, mesh: MeshClient, tracker: RequestTracker,
                 ticket: AdmissionTicket, dispatch_timeout_s: float,
                 request_timeout_s: float) -> None:
        self.request = request
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_output_tokens = 0
        self.finish_reason: str | None = None
        self._mesh = mesh
        self._tracker = tracker
        self._ticket = ticket
        self._dispatch_timeout_s = dispatch_timeout_s
        self._request_timeout_s = request_timeout_s
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._got_update = asyncio.Event()
        self._subscription = None
        self._first: RequestUpdate | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    async def start(self, headers: dict[str, str]) -> None:
        if not self._mesh.connected:
            raise self._fail(service_unavailable("NATS is not connected"), "unavailable")
        # subscribe before publishing: the first update may come back at once
        self._subscription = await self._mesh.subscribe_updates(self.request_id, self._deliver)
        instance_id = await self._submit(headers)
        update = await self._next(self._dispatch_timeout_s, "no worker accepted the request")
        if update.finished and update.finish_reason == "error":
            raise self._fail_from(update)
        self._tracker.on_accepted(update.instance_id or instance_id or "")
        if update.token_ids or update.text or update.finished:
            self._first = update

    async def updates(self) -> AsyncIterator[RequestUpdate]:
        update, self._first = self._first, None
        while True:
            if update is None:
                update = await self._next(self._request_timeout_s, "the worker went silent")
            if update.token_ids or update.text or update.finished:
                self._observe(update)
                yield update
                if update.finished:
                    return
            update = None

    def close(self, reason: str = "client disconnected") -> None:
        if not self._tracker.finished:
            self._mesh.abort(self.request_id, reason)
            self._tracker.finish(RequestStatus.ABORTED, "abort", reason)
        self._release()

    # -- internals ---------------------------------------------------------------------------
    def _deliver(self, data: bytes) -> None:
        self._inbox.put_nowait(data)
        self._got_update.set()

    async def _submit(self, headers: dict[str, str]) -> str | None:
        """Hand the request to a router: the instance it chose, or None when an update of
        the request arrived before the router's answer (no longer waited for)."""
        answer = asyncio.ensure_future(
            self._mesh.submit(self.request, headers, self._dispatch_timeout_s))
        update = asyncio.ensure_future(self._got_update.wait())
        try:
            await asyncio.wait((answer, update), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when we are cancelled ourselves
            update.cancel()
            answered = answer.done()
            if not answered:
                answer.cancel()  # the answer, when it comes, is dropped by the NATS client
        if not answered:
            return None
        try:
            instance_id = answer.result()
        except NoRespondersError:
            raise self._fail(service_unavailable(
                "no router is running (nobody consumes kunserve.generate)"), "unavailable"
            ) from None
        except NatsTimeoutError:
            raise self._fail(service_unavailable(
                f"no router answered within {self._dispatch_timeout_s:g}s"), "timeout",
                abort=True) from None
        except NatsError as exc:
            raise self._fail(service_unavailable(f"NATS: {exc}"), "unavailable") from None
        if not instance_id:
            raise self._fail(service_unavailable(NO_WORKER), "unavailable")
        return instance_id

    async def _next(self, timeout_s: float, silence: str) -> RequestUpdate:
        while True:
            if self._inbox.empty():
                try:
                    async with asyncio.timeout(timeout_s):
                        data = await self._inbox.get()
                except TimeoutError:
                    raise self._fail(service_unavailable(
                        f"{silence} within {timeout_s:g}s"), "timeout", abort=True) from None
            else:
                data = self._inbox.get_nowait()
            try:
                return decode(data, RequestUpdate)
            except msgspec.DecodeError as exc:
                logger.warning("dropped a malformed update of %s: %s", self.request_id, exc)

    def _observe(self, update: RequestUpdate) -> None:
        if update.token_ids:
            self._tracker.on_tokens(len(update.token_ids))
        if not update.finished:
            return
        if update.finish_reason == "error":
            raise self._fail_from(update)
        self.finish_reason = update.finish_reason or "stop"
        self.num_output_tokens = update.num_output_tokens or self._tracker.output_tokens
        self.num_prompt_tokens = update.num_prompt_tokens or self.num_prompt_tokens
        status = RequestStatus.ABORTED if self.finish_reason == "abort" else RequestStatus.FINISHED
        self._tracker.finish(status, self.finish_reason)
        self._release()

    def _fail_from(self, update: RequestUpdate) -> OpenAIError:
        error = update.error or "unknown error"
        if not update.instance_id:  # the router's answer: nobody could take it
            return self._fail(service_unavailable(error), "unavailable")
        return self._fail(server_error(f"instance {update.instance_id}: {error}"), "worker")

    def _fail(self, error: OpenAIError, kind: str, abort: bool = False) -> OpenAIError:
        """Record the failure, end the request, and return the error to raise."""
        if abort:
            self._mesh.abort(self.request_id, error.message)
        self._tracker.finish(RequestStatus.FAILED, "error", error.message, kind)
        self._release()
        return error

    def _release(self) -> None:
        self._ticket.release()
        if self._subscription is not None:
            self._mesh.unsubscribe(self._subscription)
            self._subscription = None
