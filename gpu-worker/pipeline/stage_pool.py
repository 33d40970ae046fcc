"""Pipeline groups on one machine, for tests and benchmarks: member processes that serve one
epoch after another, led by the calling process.

``StagePool(n)`` spawns ``n`` member processes (torch.multiprocessing, spawn, one torch thread
each) and hosts the rendezvous ``TCPStore`` in the calling process, which is always rank 0
(the leader). ``pool.group(size, config)`` opens a new epoch: members ``1..size-1`` get an
order, form the epoch's ``StageLink`` on the shared store and run ``StageRunner`` until the
leader's ``PipelineEngine`` (yielded to the caller) stops them; then the members wait for the
next order, as a worker does for its whole life. A member whose epoch fails reports why and
goes on waiting for orders. Orders travel over multiprocessing queues here; in the mesh they
are the planner's plan (not built yet).
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from kunserve.worker.engine import EngineConfig
from kunserve.worker.pipeline.group_member import activation_frame_bytes
from kunserve.worker.pipeline.pipeline_engine import PipelineEngine
from kunserve.worker.pipeline.stage_link import StageLink, connect_store
from kunserve.worker.pipeline.stage_runner import StageRunner

HOST = "127.0.0.1"


@dataclass(frozen=True)
class EpochOrder:
    epoch: int
    rank: int
    size: int
    config: EngineConfig
    timeout_s: float
    frame_bytes: int


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    rank: int
    error: str | None = None  # why the epoch failed on this member

    @property
    def ok(self) -> bool:
        return self.error is None


def member_main(port: int, orders: mp.Queue, results: mp.Queue) -> None:
    """A member process: serve the epochs it is ordered to, one after another."""
    torch.set_num_threads(1)
    store = connect_store(HOST, port, rank=1)
    while (order := orders.get()) is not None:
        link = StageLink(store, order.rank, order.size, order.epoch, timeout_s=order.timeout_s,
                         bind_host=HOST, frame_bytes=order.frame_bytes)
        try:
            StageRunner.join(order.config, link).run()
            result = EpochResult(order.epoch, order.rank)
        except Exception as exc:  # the epoch failed: report it and wait for the next one
            result = EpochResult(order.epoch, order.rank, f"{type(exc).__name__}: {exc}")
        link.close()  # drops the epoch's process group: its sockets close, peers notice
        results.put(result)


class StagePool:
    def __init__(self, num_members: int) -> None:
        ctx = mp.get_context("spawn")
        self.store = connect_store(HOST, 0, rank=0)
        self.results: mp.Queue = ctx.Queue()
        self.orders = [ctx.Queue() for _ in range(num_members)]
        self.processes = [ctx.Process(target=member_main, args=(self.store.port, q, self.results),
                                      daemon=True) for q in self.orders]
        for process in self.processes:
            process.start()
        self.epoch = 0

    def member_pid(self, rank: int) -> int:
        """The process serving ``rank`` in groups of this pool (rank r is member r-1)."""
        return self.processes[rank - 1].pid

    @contextlib.contextmanager
    def group(self, size: int, config: EngineConfig, *, num_blocks: int | None = None,
              max_in_flight: int | None = None, timeout_s: float = 30.0,
              check_members: bool = True) -> Iterator[PipelineEngine]:
        """A new epoch's group of ``size`` with this process as its leader."""
        self.epoch += 1
        frame = activation_frame_bytes(config.model, config.dtype)  # as a worker sizes it
        for rank in range(1, size):
            self.orders[rank - 1].put(EpochOrder(self.epoch, rank, size, config, timeout_s,
                                                 frame))
        link = StageLink(self.store, 0, size, self.epoch, timeout_s=timeout_s, bind_host=HOST,
                         frame_bytes=frame)
        with PipelineEngine(config, link, num_blocks=num_blocks,
                            max_in_flight=max_in_flight) as engine:
            yield engine
        if check_members:
            results = [self.results.get(timeout=timeout_s) for _ in range(1, size)]
            failed = [r for r in results if not r.ok or r.epoch != self.epoch]
            if failed:
                raise RuntimeError(f"members failed epoch {self.epoch}: {failed}")

    def member_results(self, count: int, timeout_s: float) -> list[EpochResult]:
        """Up to ``count`` epoch results that members reported within ``timeout_s``."""
        found = []
        with contextlib.suppress(queue.Empty):
            for _ in range(count):
                found.append(self.results.get(timeout=timeout_s))
        return found

    def close(self) -> None:
        for orders, process in zip(self.orders, self.processes, strict=True):
            if process.is_alive():
                orders.put(None)
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        # torch.distributed stores have no close(): the port is freed with the object
        del self.store
