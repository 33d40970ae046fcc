"""``reconfigure.ParamsRelease``: a drop's dropped layers go back to the kernel only once the
exchange is over and this process has served one round of micro-batches after it (or after
its wait at the latest), never on the path of the first tokens after the drop."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import torch

from kunserve.worker.pipeline.reconfigure import ParamsRelease


class Move:
    """What the release needs of a ``KVMove``: ``release`` (returns its seconds)."""

    def __init__(self) -> None:
        self.released = threading.Event()

    def release(self) -> float:
        self.released.set()
        return 0.001


def test_the_release_waits_for_a_round_served_after_the_exchange():
    phases: dict[str, float] = {}
    release, move = ParamsRelease(phases, round_size=2, wait_s=30), Move()
    release.served()  # during the exchange: not the round waited for
    release.served()
    release.start(move)
    time.sleep(0.05)  # nothing served since the exchange ended
    assert not move.released.is_set() and "release" not in phases
    release.served()
    time.sleep(0.05)
    assert not move.released.is_set()  # half a round
    release.served()
    assert move.released.wait(5) and "release" in phases


def test_an_idle_group_releases_after_the_wait():
    phases: dict[str, float] = {}
    release, move = ParamsRelease(phases, round_size=4, wait_s=0.1), Move()
    started = time.monotonic()
    release.start(move)
    assert move.released.wait(5)
    assert time.monotonic() - started >= 0.1 and "release" in phases


def test_without_a_round_to_wait_for_it_releases_at_once():
    phases: dict[str, float] = {}
    release, move = ParamsRelease(phases, round_size=0, wait_s=30), Move()
    release.start(move)  # (run would lower this thread's priority)
    assert move.released.wait(5) and "release" in phases


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc: Linux")
def test_the_dropped_layers_pages_go_back_to_the_kernel_before_the_tensors_are_freed():
    params = [torch.ones(4096, 1024) for _ in range(8)]  # 128 MiB, every page written
    phases: dict[str, float] = {}
    release, move = ParamsRelease(phases, round_size=0, params=params), Move()
    tensors, params = params, None
    before = _resident_bytes()
    release.start(move)
    assert move.released.wait(5)
    # the pages went back while the tensors were still alive: they read as zeros now
    assert release.returned_bytes >= 127 * 2**20
    assert before - _resident_bytes() >= 120 * 2**20
    assert all(t[1:-1].abs().sum().item() == 0 for t in tensors[::3])  # whole pages
    assert phases["release"] > 0
