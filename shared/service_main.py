"""What every service's ``__main__`` shares: an event loop, and running until SIGTERM/SIGINT,
then stopping cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

S = TypeVar("S")


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


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop where uvloop is installed (it comes with uvicorn[standard]; the gateway
    runs on it through uvicorn), else a standard one. A request crosses the router's and the
    worker's loops several times (NATS reads, task wake-ups, writes); libuv's loop and
    transports cost a fraction of the pure-Python selector loop's per wake-up."""
    try:
        import uvloop
    except ImportError:  # e.g. Windows: the standard loop works, only slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run(main)`` on ``new_event_loop()``."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


def settings_from_cli(cls: type[S], argv: list[str] | None, prog: str) -> S | None:
    """The service's settings from flags (``--kebab-case``) and ``KUNSERVE_*`` variables, with
    logging configured; None (after saying why on stderr) when they do not validate."""
    from pydantic import ValidationError

    try:
        settings = cls(_cli_parse_args=sys.argv[1:] if argv is None else argv,
                       _cli_kebab_case=True, _cli_prog_name=prog)
    except ValidationError as exc:
        print(f"{prog}: bad settings: {exc}", file=sys.stderr)
        return None
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return settings
