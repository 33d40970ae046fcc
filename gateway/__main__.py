"""``python -m kunserve.gateway``: serve the OpenAI API until SIGTERM or SIGINT.

Settings come from flags (``--model``, ``--port``, ``--nats-url``, ...) or ``KUNSERVE_*``
environment variables; ``--help`` lists them.
"""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError

from kunserve.gateway.app import create_app
from kunserve.gateway.settings import GatewaySettings


def main(argv: list[str] | None = None) -> int:
    try:
        settings = GatewaySettings(_cli_parse_args=sys.argv[1:] if argv is None else argv,
                                   _cli_kebab_case=True, _cli_prog_name="kunserve.gateway")
    except ValidationError as exc:
        print(f"kunserve.gateway: bad settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), access_log=settings.access_log,
                timeout_graceful_shutdown=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
