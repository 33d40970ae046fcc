"""What every service's ``__main__`` shares: run until SIGTERM/SIGINT, then stop cleanly."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable


async def run_until_signal(stop: Callable[[], Awaitable[None]],
                           lost: asyncio.Event | None = None) -> int:
    """Wait for SIGTERM/SIGINT (exit code 0) or ``lost`` (a connection gone for good: exit
    code 1, so a supervisor restarts the process), then await ``stop()``."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    waits = [asyncio.create_task(stopping.wait())]
    if lost is not None:
        waits.append(asyncio.create_task(lost.wait()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    await stop()
    return 0 if stopping.is_set() else 1
