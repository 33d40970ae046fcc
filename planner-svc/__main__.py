"""``python -m kunserve.planner``: run the planner until SIGTERM or SIGINT, then exit 0.

Settings come from flags (``--redis-url``, ``--model``, ``--topology-poll-interval``, ...) or
``KUNSERVE_*`` environment variables; ``--help`` lists them.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from pydantic import ValidationError

from kunserve.planner.service import serve
from kunserve.planner.settings import PlannerSettings
from kunserve.service_main import run_loop, run_until_signal


async def _serve_until_signal(settings: PlannerSettings) -> int:
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))

    async def stop_serving() -> None:
        stop.set()
        await task

    return await run_until_signal(stop_serving)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = PlannerSettings(_cli_parse_args=sys.argv[1:] if argv is None else argv,
                                   _cli_kebab_case=True, _cli_prog_name="kunserve.planner")
    except ValidationError as exc:
        print(f"kunserve.planner: bad settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_loop(_serve_until_signal(settings))


if __name__ == "__main__":
    sys.exit(main())
