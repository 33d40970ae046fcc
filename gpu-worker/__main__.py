"""``python -m kunserve.worker``: serve one instance until SIGTERM or SIGINT, then exit 0.

Settings come from flags (``--model``, ``--instance-id``, ``--memory-per-instance 64MiB``,
``--threads``, ...) or ``KUNSERVE_*`` environment variables; ``--help`` lists them.
"""

from __future__ import annotations

import logging
import sys

from nats.errors import Error as NatsError
from pydantic import ValidationError

from kunserve.service_main import run_loop, run_until_signal
from kunserve.worker.settings import WorkerSettings


async def serve(settings: WorkerSettings) -> int:
    from kunserve.worker.server import WorkerServer

    server = WorkerServer(settings)
    try:
        await server.start()
    except (ValueError, OSError, NatsError) as exc:  # bad checkpoint, budget, servers away
        print(f"kunserve.worker: error: {exc or type(exc).__name__}", file=sys.stderr)
        return 2
    return await run_until_signal(server.stop, server.connection_lost)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = WorkerSettings(_cli_parse_args=sys.argv[1:] if argv is None else argv,
                                  _cli_kebab_case=True, _cli_prog_name="kunserve.worker")
    except ValidationError as exc:
        print(f"kunserve.worker: bad settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    # the engine thread sets its intra-op threads; inter-op threads must be set before any
    # parallel work, and one is enough for a process that runs one step at a time
    torch.set_num_threads(settings.threads)
    torch.set_num_interop_threads(1)
    return run_loop(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
