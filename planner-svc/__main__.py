"""``python -m kunserve.planner``: run the planner until SIGTERM or SIGINT, then exit 0.

Settings come from flags (``--redis-url``, ``--model``, ``--topology-poll-interval``, ...) or
``KUNSERVE_*`` environment variables; ``--help`` lists them.
"""

from __future__ import annotations

import asyncio
import sys

from kunserve.planner.service import serve
from kunserve.planner.settings import PlannerSettings
from kunserve.service_main import run_loop, run_until_signal, settings_from_cli


async def _serve_until_signal(settings: PlannerSettings) -> int:
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))

    async def stop_serving() -> None:
        stop.set()
        await task

    return await run_until_signal(stop_serving)


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_cli(PlannerSettings, argv, "kunserve.planner")
    if settings is None:
        return 2
    return run_loop(_serve_until_signal(settings))


if __name__ == "__main__":
    sys.exit(main())
