"""One admitted request on the mesh, from submission to its last update.

``start`` submits it and returns once a worker took it, or raises ``OpenAIError`` (503 no
router / no live worker / NATS down / timeout, 500 worker error). It waits for the router's
answer only until the request's first update arrives: the worker's ``accepted`` says as much
as the answer, and often sooner (the router answers after the worker's receipt, and its
process may be waiting for a core while the worker's update is already in). ``updates`` yields the
updates carrying tokens or the finish, and raises ``OpenAIError`` when the request fails on the
way. ``close`` ends it on every path: an unfinished request is aborted on its worker, its
admission budget is given back, its updates no longer routed. ``close`` is synchronous and
idempotent, so it is safe in ``finally`` blocks that run on cancellation.

Failover: when the instance holding the request dies (``failover.InstanceWatchdog`` calls
``instance_lost``), or says it lost the request (``RequestUpdate.lost``: a group member whose
group broke after it handed the request to the leader, before any update came from the
leader), the request is submitted again, as a new *attempt*: prompt = the original
prompt + the tokens already streamed, ``max_tokens`` less those, same seed; its updates then
continue the same ``updates`` iterator; ``resumed_tokens`` tells the worker that the prompt's
tail is output, so presence/frequency penalties count it and a seeded request's random stream
goes on past its draws. The client gets token for token what it would have got without the
failure, greedy or seeded; its text too: the new worker sends the streamed tokens' text
again first (``IncrementalDetokenizer.replay``, what the lost worker held back included) and
the characters the client already has are skipped, so a stop string straddling the failover
point is found and no held-back text is lost. Each attempt has its own request id
(``<id>-r<n>``) and updates subject, so a worker that was only presumed dead (its load key
expired during a long stall) can never interleave its tokens with the new attempt's: updates of
other attempts are dropped, and the old attempt is aborted.

Per update the work is a queue get, a msgspec decode, a request id compare, the tracker's O(1)
bookkeeping and appending the update's token ids (the failover's prompt).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from functools import partial

import msgspec
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError

from kunserve.gateway.admission import AdmissionTicket
from kunserve.gateway.errors import (
    OpenAIError,
    bad_request,
    server_error,
    service_unavailable,
)
from kunserve.gateway.mesh_client import MeshClient
from kunserve.gateway.request_tracker import RequestTracker
from kunserve.ledger import RequestStatus
from kunserve.protocol import GenerateRequest, RequestUpdate, decode

logger = logging.getLogger(__name__)

NO_WORKER = "no live worker instance"
INSTANCE_LOST = object()  # put in the inbox by ``instance_lost``, behind what already arrived


class Generation:
    def __init__(self, request: GenerateRequest, mesh: MeshClient, tracker: RequestTracker,
                 ticket: AdmissionTicket, dispatch_timeout_s: float,
                 request_timeout_s: float, *, max_failovers: int) -> None:
        self.request = request
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_output_tokens = 0
        self.finish_reason: str | None = None
        self.instance_id = ""  # the instance its updates come from (latest update's)
        self._mesh = mesh
        self._tracker = tracker
        self._ticket = ticket
        self._dispatch_timeout_s = dispatch_timeout_s
        self._request_timeout_s = request_timeout_s
        self._max_failovers = max_failovers
        self._attempt = request  # what is on the mesh now (its id: the updates subject)
        self._output_ids: list[int] = []  # streamed so far: the prompt tail of a failover
        self._text_sent = 0  # characters the client got
        self._text_to_skip = 0  # of a resubmission's text: what the client already has
        self._lost = False  # the holder died; the failover has not been accepted yet
        self._failovers = 0
        self._headers: dict[str, str] = {}  # the trace context, for every attempt
        self._inbox: asyncio.Queue[bytes | object] = asyncio.Queue()
        self._receiving = False  # the mesh client routes the attempt's updates to the inbox
        self._first: RequestUpdate | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def holder(self) -> str | None:
        """The instance whose death would lose this request, while it is streaming: None
        before it was accepted, once it finished, and while it is being failed over."""
        if self._lost or self._tracker.finished or not self._receiving:
            return None
        return self.instance_id or None

    async def start(self, headers: dict[str, str]) -> None:
        if not self._mesh.connected:
            raise self._fail(service_unavailable("NATS is not connected"), "unavailable")
        self._headers = headers
        self._first = await self._dispatch()
        self._tracker.on_accepted(self.instance_id)

    def instance_lost(self) -> None:
        """The holder died: fail over once the updates that came before are consumed."""
        if self.holder is not None:
            self._lost = True
            self._inbox.put_nowait(INSTANCE_LOST)

    async def updates(self) -> AsyncIterator[RequestUpdate]:
        update, self._first = self._first, None
        while True:
            if update is None:
                update = await self._next(self._request_timeout_s, "the worker went silent")
            self.instance_id = update.instance_id or self.instance_id  # a group's leader
            update = self._new_text_only(update)
            if update.token_ids or update.text or update.finished:
                self._observe(update)
                yield update
                if update.finished:
                    return
            update = None

    def close(self, reason: str = "client disconnected") -> None:
        if not self._tracker.finished:
            self._mesh.abort(self._attempt.request_id, reason)
            self._tracker.finish(RequestStatus.ABORTED, "abort", reason)
        self._release()

    # -- internals ---------------------------------------------------------------------------
    async def _dispatch(self) -> RequestUpdate | None:
        """Put ``self._attempt`` on the mesh and wait until a worker took it; its first update
        when that already carries output."""
        # receive before publishing: the first update may come back at once
        first_update = asyncio.get_running_loop().create_future()
        self._mesh.receive_updates(self._attempt.request_id,
                                   partial(self._deliver, first_update))
        self._receiving = True
        instance_id = await self._submit(first_update)
        update = await self._next(self._dispatch_timeout_s, "no worker accepted the request")
        if update.finished and update.finish_reason == "error":
            raise self._fail_from(update)
        self.instance_id = update.instance_id or instance_id or ""
        return update if update.token_ids or update.text or update.finished else None

    async def _fail_over(self) -> RequestUpdate | None:
        """Submit the rest of the request again (see the module docstring); the new
        attempt's first update when it carries output."""
        lost = self.instance_id
        if self._failovers == self._max_failovers:
            raise self._fail(service_unavailable(
                f"instance {lost} died while serving the request (gave up after "
                f"{self._max_failovers} failovers)"), "unavailable", abort=True)
        self._mesh.abort(self._attempt.request_id, f"instance {lost} presumed dead")
        self._stop_receiving()
        sampling = msgspec.structs.replace(
            self.request.sampling,
            max_tokens=self.request.sampling.max_tokens - len(self._output_ids))
        self._failovers += 1
        self._text_to_skip = self._text_sent
        self._attempt = msgspec.structs.replace(
            self.request, request_id=f"{self.request_id}-r{self._failovers}", sampling=sampling,
            prompt_token_ids=self.request.prompt_token_ids + self._output_ids,
            resumed_tokens=len(self._output_ids))
        logger.warning("request %s: instance %s is gone after %d tokens; resubmitted as %s",
                       self.request_id, lost, len(self._output_ids), self._attempt.request_id)
        first = await self._dispatch()
        self._tracker.on_failover(lost, self.instance_id, len(self._output_ids))
        self._lost = False
        return first

    def _deliver(self, first_update: asyncio.Future[None], data: bytes) -> None:
        self._inbox.put_nowait(data)
        if not first_update.done():
            first_update.set_result(None)

    async def _submit(self, first_update: asyncio.Future[None]) -> str | None:
        """Hand the attempt to a router: the instance it chose, or None when an update of
        the attempt arrived before the router's answer (no longer waited for)."""
        try:
            answer = await self._mesh.submit(self._attempt, self._headers)
        except NatsError as exc:
            raise self._fail(service_unavailable(f"NATS: {exc}"), "unavailable") from None
        try:
            await asyncio.wait((answer, first_update), timeout=self._dispatch_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when we are cancelled ourselves
            answered = answer.done()
            answer.cancel()  # no-op once answered; else a late answer is dropped
        if not answered:
            if first_update.done():
                return None
            raise self._fail(service_unavailable(
                f"no router answered within {self._dispatch_timeout_s:g}s"), "timeout",
                abort=True)
        try:
            instance_id = answer.result()
        except NoRespondersError:
            raise self._fail(service_unavailable(
                "no router is running (nobody consumes kunserve.generate)"), "unavailable"
            ) from None
        if not instance_id:
            raise self._fail(service_unavailable(NO_WORKER), "unavailable")
        return instance_id

    async def _next(self, timeout_s: float, silence: str) -> RequestUpdate:
        """The current attempt's next update; fails over first when the holder was lost."""
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
            if data is INSTANCE_LOST:
                first = await self._fail_over()
                if first is not None:
                    return first
                continue
            try:
                update = decode(data, RequestUpdate)
            except msgspec.DecodeError as exc:
                logger.warning("dropped a malformed update of %s: %s", self.request_id, exc)
                continue
            if update.request_id != self._attempt.request_id:  # an abandoned attempt's
                continue
            if not update.lost:
                return update
            if update.instance_id == self.instance_id:  # its holder lost it: resubmit
                first = await self._fail_over()
                if first is not None:
                    return first
            # else: it follows another instance by now, which serves it

    def _new_text_only(self, update: RequestUpdate) -> RequestUpdate:
        """A resubmission's worker sends the streamed tokens' text again first (their part
        the lost worker held back included): skip what the client already has."""
        if update.text and self._text_to_skip:
            cut = min(self._text_to_skip, len(update.text))
            self._text_to_skip -= cut
            update = msgspec.structs.replace(update, text=update.text[cut:])
        self._text_sent += len(update.text)
        return update

    def _observe(self, update: RequestUpdate) -> None:
        if update.token_ids:
            self._output_ids += update.token_ids
            self._tracker.on_tokens(len(update.token_ids))
        if not update.finished:
            return
        if update.finish_reason == "error":
            raise self._fail_from(update)
        self.finish_reason = update.finish_reason or "stop"
        # the worker counts the tokens streamed before a failover as output (resumed_tokens)
        self.num_output_tokens = update.num_output_tokens or self._tracker.output_tokens
        if update.num_prompt_tokens:
            self.num_prompt_tokens = update.num_prompt_tokens
        status = RequestStatus.ABORTED if self.finish_reason == "abort" else RequestStatus.FINISHED
        self._tracker.finish(status, self.finish_reason)
        self._release()

    def _fail_from(self, update: RequestUpdate) -> OpenAIError:
        error = update.error or "unknown error"
        if not update.instance_id:  # the router's answer: nobody could take it
            return self._fail(service_unavailable(error), "unavailable")
        if update.invalid_request:
            return self._fail(bad_request(f"instance {update.instance_id}: {error}"),
                              "invalid")
        return self._fail(server_error(f"instance {update.instance_id}: {error}"), "worker")

    def _fail(self, error: OpenAIError, kind: str, abort: bool = False) -> OpenAIError:
        """Record the failure, end the request, and return the error to raise."""
        if abort:
            self._mesh.abort(self._attempt.request_id, error.message)
        self._tracker.finish(RequestStatus.FAILED, "error", error.message, kind)
        self._release()
        return error

    def _release(self) -> None:
        self._ticket.release()
        self._stop_receiving()

    def _stop_receiving(self) -> None:
        if self._receiving:
            self._mesh.stop_updates(self._attempt.request_id)
            self._receiving = False
