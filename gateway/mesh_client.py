"""The gateway's side of the request plane: NATS subjects of ``kunserve.protocol``.

Submit a request to the routers (as a NATS request: the router answers with the instance it
chose, and NATS answers "no responders" when no router runs), receive its updates on its own
subject, abort it. Aborts and unsubscribes are fire-and-forget tasks, so ending a request
needs no ``await`` (it runs on cancellation paths too).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine

import nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from kunserve.protocol import AbortRequest, GenerateRequest, Subjects, encode

logger = logging.getLogger(__name__)


class MeshClient:
    def __init__(self, nc: nats.NATS) -> None:
        self._nc = nc
        self._background: set[asyncio.Task] = set()

    @property
    def connected(self) -> bool:
        return self._nc.is_connected

    async def subscribe_updates(self, request_id: str,
                                deliver: Callable[[bytes], None]) -> Subscription:
        """Call ``deliver`` with each raw ``RequestUpdate`` of the request, in order."""
        async def on_message(msg: Msg) -> None:
            deliver(msg.data)

        return await self._nc.subscribe(Subjects.updates(request_id), cb=on_message)

    async def submit(self, request: GenerateRequest, headers: dict[str, str],
                     timeout: float) -> str:
        """Hand the request to a router; the instance it chose ('' when none is live).

        Raises ``nats.errors.NoRespondersError`` (no router) or ``nats.errors.TimeoutError``.
        """
        reply = await self._nc.request(Subjects.GENERATE, encode(request), timeout=timeout,
                                       headers=headers)
        return reply.data.decode()

    def abort(self, request_id: str, reason: str) -> None:
        payload = encode(AbortRequest(request_id=request_id, reason=reason))
        self._spawn(self._nc.publish(Subjects.ABORT, payload), f"abort {request_id}")

    def unsubscribe(self, subscription: Subscription) -> None:
        self._spawn(subscription.unsubscribe(), f"unsubscribe {subscription.subject}")

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
