"""``python -m kunserve.gateway``: serve the OpenAI API until SIGTERM or SIGINT.

Settings come from flags (``--model``, ``--port``, ``--nats-url``, ...) or ``KUNSERVE_*``
environment variables; ``--help`` lists them.
"""

from __future__ import annotations

import sys

import uvicorn

from kunserve.gateway.app import create_app
from kunserve.gateway.settings import GatewaySettings
from kunserve.service_main import settings_from_cli


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_cli(GatewaySettings, argv, "kunserve.gateway")
    if settings is None:
        return 2
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), access_log=settings.access_log,
                timeout_graceful_shutdown=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
