"""``python -m kunserve.router``: run one router until SIGTERM or SIGINT.

Settings come from flags (``--nats-url``, ``--redis-url``, ``--reservation-ttl-ms``, ...) or
``KUNSERVE_*`` environment variables; ``--help`` lists them.
"""

from __future__ import annotations

import sys

from nats.errors import Error as NatsError
from redis.exceptions import RedisError

from kunserve.router.router import Router
from kunserve.router.settings import RouterSettings
from kunserve.service_main import run_loop, run_until_signal, settings_from_cli


async def serve(settings: RouterSettings) -> int:
    router = Router(settings)
    try:
        await router.start()
    except (OSError, NatsError, RedisError) as exc:
        print(f"kunserve.router: error: {exc or type(exc).__name__}", file=sys.stderr)
        return 2
    return await run_until_signal(router.stop, router.connection_lost)


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_cli(RouterSettings, argv, "kunserve.router")
    if settings is None:
        return 2
    return run_loop(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
