"""Notice a client that leaves while its request is still running.

Starlette only notices a disconnect when a write fails (ASGI spec >= 2.4), which for a request
still queued on a worker may be never. ``run_until_disconnect`` listens on ``receive`` while the
work runs and cancels the work when the client goes, so the request is aborted on its worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_until_disconnect(receive: Receive, work: Callable[[], Awaitable[T]]) -> T | None:
    """``work()``'s result (or its exception), or None when the client disconnected first
    (the work is then cancelled). Call only after the request body has been read."""
    task = asyncio.ensure_future(work())
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we are cancelled ourselves
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait((task,))
    return None
