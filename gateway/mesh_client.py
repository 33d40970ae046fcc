"""The gateway's side of the request plane: NATS subjects of ``kunserve.protocol``.

Submit a request to the routers (as a NATS request: the router answers with the instance it
chose, and NATS answers "no responders" when no router runs), receive its updates, abort it.
Aborts are fire-and-forget tasks, so ending a request needs no ``await`` (it runs on
cancellation paths too).

Both the routers' answers and the workers' updates come in on one subscription each for all
of this gateway's requests, routed to the request by a dict lookup. For the updates, that
works because a request's id on the wire (``wire_id``) starts with this gateway's own token:
its updates subject ``kunserve.updates.<token>.<id>`` matches the gateway's
``kunserve.updates.<token>.*`` and no other gateway's. A subscription per request would cost
a SUB and an UNSUB per request: NATS work, and an UNSUB is a socket write of its own (on this
CPU ~0.2-0.3 ms, as much as the rest of the gateway's NATS work for a request).

``submit`` returns once the request is published, with a future for the router's answer: the
caller can then wait for the answer or for something else, and the request leaves without
the extra event-loop turn a task around ``request`` would cost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine

import nats
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.nuid import NUID

from kunserve.protocol import AbortRequest, GenerateRequest, Subjects, encode

NO_RESPONDERS_STATUS = "503"  # the status header NATS puts on a request nobody received
UPDATES_PREFIX = Subjects.updates("")  # + the request's (wire) id

logger = logging.getLogger(__name__)


class MeshClient:
    def __init__(self, nc: nats.NATS) -> None:
        self._nc = nc
        self._background: set[asyncio.Task] = set()
        self._answers: dict[str, asyncio.Future[str]] = {}  # wire id -> router's answer
        self._answer_prefix = ""
        self._receivers: dict[str, Callable[[bytes], None]] = {}  # wire id -> its updates
        self._token = NUID().next().decode()  # this gateway's, unique among gateways

    async def start(self) -> None:
        """Subscribe to the routers' answers and to the updates (once, for every request)."""
        self._answer_prefix = self._nc.new_inbox() + "."
        await self._nc.subscribe(self._answer_prefix + ">", cb=self._on_answer)
        await self._nc.subscribe(Subjects.updates(self.wire_id("*")), cb=self._on_update)

    @property
    def connected(self) -> bool:
        return self._nc.is_connected

    def wire_id(self, request_id: str) -> str:
        """The id a request of this gateway has on the mesh (a valid subject token after the
        gateway's, so ``request_id`` must have no dot)."""
        return f"{self._token}.{request_id}"

    def receive_updates(self, wire_id: str, deliver: Callable[[bytes], None]) -> None:
        """Call ``deliver`` with each raw ``RequestUpdate`` of the request, in order, from now
        until ``stop_updates``."""
        self._receivers[wire_id] = deliver

    def stop_updates(self, wire_id: str) -> None:
        self._receivers.pop(wire_id, None)

    async def submit(self, request: GenerateRequest,
                     headers: dict[str, str]) -> asyncio.Future[str]:
        """Hand the request to a router; it is published when this returns. The future
        resolves with the instance the router chose ('' when none is live) or fails with
        ``nats.errors.NoRespondersError`` (no router); cancel it to stop waiting."""
        wire_id = request.request_id
        answer = asyncio.get_running_loop().create_future()
        self._answers[wire_id] = answer
        answer.add_done_callback(lambda _: self._answers.pop(wire_id, None))
        try:
            await self._nc.publish(Subjects.GENERATE, encode(request),
                                   reply=self._answer_prefix + wire_id, headers=headers)
        except BaseException:
            answer.cancel()
            raise
        return answer

    async def _on_answer(self, msg: Msg) -> None:
        answer = self._answers.get(msg.subject[len(self._answer_prefix):])
        if answer is None or answer.done():  # given up on, or a second answer
            return
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS_STATUS:
            answer.set_exception(NoRespondersError())
        else:
            answer.set_result(msg.data.decode())

    async def _on_update(self, msg: Msg) -> None:
        deliver = self._receivers.get(msg.subject[len(UPDATES_PREFIX):])
        if deliver is not None:  # else: a request that ended (a late or stale update)
            deliver(msg.data)

    def abort(self, request_id: str, reason: str) -> None:
        payload = encode(AbortRequest(request_id=request_id, reason=reason))
        self._spawn(self._nc.publish(Subjects.ABORT, payload), f"abort {request_id}")

    async def close(self) -> None:
        """Let pending aborts reach NATS."""
        await asyncio.gather(*self._background, return_exceptions=True)

    def _spawn(self, coro: Coroutine, what: str) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(lambda t: self._done(t, what))

    def _done(self, task: asyncio.Task, what: str) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("%s failed: %r", what, task.exception())
