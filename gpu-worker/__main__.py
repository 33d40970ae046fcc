"""``python -m kunserve.worker``: serve one instance until SIGTERM or SIGINT, then exit 0.

Settings come from flags (``--model``, ``--instance-id``, ``--memory-per-instance 64MiB``,
``--threads``, ...) or ``KUNSERVE_*`` environment variables; ``--help`` lists them.
"""

from __future__ import annotations

import sys

from nats.errors import Error as NatsError

from kunserve.service_main import run_loop, run_until_signal, settings_from_cli
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
    settings = settings_from_cli(WorkerSettings, argv, "kunserve.worker")
    if settings is None:
        return 2
    import torch

    # the engine thread sets its intra-op threads; inter-op threads must be set before any
    # parallel work, and one is enough for a process that runs one step at a time
    torch.set_num_threads(settings.threads)
    torch.set_num_interop_threads(1)
    return run_loop(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
