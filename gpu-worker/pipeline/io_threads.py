"""A short CPU time slice for gloo's socket threads, so a message moves when it arrives.

Every gloo process group runs one I/O thread (``gloo_tcp_loop``) that reads and writes the
group's sockets. It sleeps most of the time and must run the moment a frame arrives or a send
can go. On a host whose cores are all busy computing (a pipeline group's stages), Linux's
EEVDF scheduler lets a woken thread wait until the running one has used its slice (1.4 ms
by default here), and that wait lands on every hop of a micro-batch. Linux 6.12 and later let
a thread ask for a shorter slice (``sched_setattr`` with ``sched_runtime``, no privilege
needed); a thread with a shorter slice gets an earlier deadline, so it runs sooner when it
wakes. Measured on a 2-stage group of the tiny model on 2 cores: ``kunserve bench drop``
(README). Off Linux, or on an architecture without a known syscall number, this does nothing;
a kernel that refuses the request (or, before 6.12, ignores it: not tried here) leaves the
threads as they were, and nothing depends on it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

IO_THREAD_NAME = "gloo_tcp_loop"
IO_SLICE_US = 100  # the slice asked for; 0 leaves the kernel's default

_SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}.get(platform.machine())


class _SchedAttr(ctypes.Structure):  # linux/sched/types.h
    _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32),
                ("sched_flags", ctypes.c_uint64), ("sched_nice", ctypes.c_int32),
                ("sched_priority", ctypes.c_uint32), ("sched_runtime", ctypes.c_uint64),
                ("sched_deadline", ctypes.c_uint64), ("sched_period", ctypes.c_uint64),
                ("sched_util_min", ctypes.c_uint32), ("sched_util_max", ctypes.c_uint32)]


def shorten_io_slices(slice_us: int = IO_SLICE_US) -> None:
    """Ask for a ``slice_us`` slice for every gloo I/O thread of this process (asking again
    for one that has it changes nothing)."""
    libc = linux_libc()
    if slice_us <= 0 or libc is None or _SYS_SCHED_SETATTR is None:
        return
    for tid in io_thread_ids():
        try:
            nice = os.getpriority(os.PRIO_PROCESS, tid)  # a thread's own nice value
        except OSError:  # the thread ended meanwhile
            continue
        # SCHED_OTHER as it was; for it, sched_runtime is the slice in nanoseconds
        attr = _SchedAttr(size=ctypes.sizeof(_SchedAttr), sched_policy=0, sched_nice=nice,
                          sched_runtime=slice_us * 1000)
        libc.syscall(_SYS_SCHED_SETATTR, tid, ctypes.byref(attr), 0)  # refused: left as is


@functools.cache
def linux_libc() -> ctypes.CDLL | None:
    """The C library on Linux, for the calls Python does not wrap (``sched_setattr`` here,
    ``madvise`` of tensors in ``kv_transfer``); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def io_thread_ids() -> list[int]:
    """This process's gloo I/O threads (none where ``/proc`` does not list threads)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    found = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                if comm.read().strip() == IO_THREAD_NAME:
                    found.append(int(tid))
        except OSError:  # the thread ended meanwhile
            continue
    return found

