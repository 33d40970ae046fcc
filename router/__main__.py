"""``python -m kunserve.router``: run one router until SIGTERM or SIGINT.

Settings come from flags (``--nats-url``, ``--redis-url``, ``--reservation-ttl-ms``, ...) or
``KUNSERVE_*`` environment variables; ``--help`` lists them.
"""

from __future__ import annotations

import logging
import sys

from nats.errors import Error as NatsError
from pydantic import ValidationError
from redis.exceptions import RedisError

from kunserve.router.router import Router
from kunserve.router.settings import RouterSettings
from kunserve.service_main import run_loop, run_until_signal


async def serve(settings: RouterSettings) -> int:
    router = Router(settings)
    try:
        await router.start()
    except (OSError, NatsError, RedisError) as exc:
        print(f"kunserve.router: error: {exc or type(exc).__name__}", file=sys.stderr)
        return 2
    return await run_until_signal(router.stop, router.connection_lost)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = RouterSettings(_cli_parse_args=sys.argv[1:] if argv is None else argv,
                                  _cli_kebab_case=True, _cli_prog_name="kunserve.router")
    except ValidationError as exc:
        print(f"kunserve.router: bad settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_loop(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
