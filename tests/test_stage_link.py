"""``StageLink`` framing between two real gloo ranks (two threads, one TCPStore): a message and
its tensor in one frame, a message longer than a frame, a tensor too big for the frame,
receives posted ahead completing in order, and the smaller reply frames towards rank 0."""

from __future__ import annotations

import platform
import re
import sys
import threading

import msgspec
import pytest
import torch

from kunserve.servers import free_port
from kunserve.worker.pipeline.io_threads import io_thread_ids
from kunserve.worker.pipeline.stage_link import (
    MAX_PENDING_SENDS,
    StageLink,
    connect_store,
    frame_bytes_for,
)


class Note(msgspec.Struct, tag=True):
    seq: int
    text: str = ""


def _pair(body0, body1, **link_kwargs) -> list:
    port, results, errors = free_port(), [None, None], []
    link_kwargs = {"frame_bytes": 4096, **link_kwargs}

    def rank(r: int, body) -> None:
        try:
            link = StageLink(connect_store("127.0.0.1", port, r), r, 2, epoch=1, timeout_s=30,
                             **link_kwargs)
            try:
                results[r] = body(link)
                link.flush()
            finally:
                link.close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r, b)) for r, b in ((0, body0), (1, body1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_messages_and_tensors_in_and_beyond_one_frame():
    small = torch.arange(12, dtype=torch.float32).reshape(3, 4)  # fits in the frame
    big = torch.randn(40, 64)  # 10 KiB: travels after the frame
    long_text = "x" * 10_000  # longer than a 4 KiB frame

    def send(link: StageLink):
        link.send_message(Note(1), 1, small)
        link.send_message(Note(2, long_text), 1, big)
        link.send_message(Note(3, long_text), 1)

    def receive(link: StageLink):
        out = []
        for shape in ((3, 4), (40, 64), None):
            got = link.recv_frame(0)
            note = link.decode(got.data, Note, 0)
            out.append((note, got.tensor_in_frame,
                        got.tensor(shape, torch.float32) if shape else None))
        return out

    _, received = _pair(send, receive)
    assert [n.seq for n, _, _ in received] == [1, 2, 3]
    assert received[1][0].text == long_text and received[2][0].text == long_text
    assert [in_frame for _, in_frame, _ in received] == [True, False, False]
    assert torch.equal(received[0][2], small) and torch.equal(received[1][2], big)


def test_receives_posted_ahead_complete_in_order():
    def send(link: StageLink):
        for seq in range(5):
            link.send_message(Note(seq), 1, torch.full((2,), float(seq)))

    def receive(link: StageLink):
        for _ in range(3):
            link.post_ahead(0)  # three posted before any message is sent or taken
        out = []
        for _ in range(5):
            got = link.recv_frame(0)
            out.append((link.decode(got.data, Note, 0).seq, got.tensor((2,), torch.float32)))
        return out

    _, received = _pair(send, receive)
    assert [seq for seq, _ in received] == list(range(5))
    assert all(torch.equal(t, torch.full((2,), float(seq))) for seq, t in received)


def test_ranks_count_themselves_in_through_the_store():
    counted = threading.Event()

    def leader(link: StageLink):
        before = link.arrivals("drop")
        assert counted.wait(30)
        return before, link.arrivals("drop"), link.arrivals("other")

    def member(link: StageLink):
        link.announce("drop")
        counted.set()

    (before, after, other), _ = _pair(leader, member)
    assert (after, other) == (1, 0) and before in (0, 1)


def test_replies_to_the_leader_use_their_own_smaller_frame():
    """1 KiB reply frames towards rank 0, 8 KiB frames towards rank 1: a 4 KiB tensor rides
    inside a frame to rank 1 but not inside a reply; long replies spill over, intact."""
    hidden = torch.randn(16, 64)  # 4 KiB

    def leader(link: StageLink):
        link.post_ahead(1)  # the reply's receive is posted before anything is sent
        link.send_message(Note(1), 1, hidden)
        first = link.recv_frame(1)
        second = link.recv_frame(1)
        return [(link.decode(r.data, Note, 1), r.tensor_in_frame,
                 r.tensor(shape, torch.float32)) for r, shape in ((first, (16, 64)),
                                                                  (second, (2, 64)))]

    def stage(link: StageLink):
        got = link.recv_frame(0)
        received = got.tensor((16, 64), torch.float32)
        link.send_message(Note(2, "y" * 3000), 0, received + 1)  # spills: text and tensor
        link.send_message(Note(3), 0, received[:2])  # 512 bytes: inside the reply frame
        return got.tensor_in_frame, received

    replies, (in_frame, received) = _pair(leader, stage, frame_bytes=8192,
                                          reply_frame_bytes=1024)
    assert in_frame and torch.equal(received, hidden)
    assert [(n.seq, len(n.text), inline) for n, inline, _ in replies] == [
        (2, 3000, False), (3, 0, True)]
    assert torch.equal(replies[0][2], hidden + 1)
    assert torch.equal(replies[1][2], hidden[:2])


class _CountingGroup:
    """The real gloo group, with the byte size of every tensor sent recorded."""

    def __init__(self, group) -> None:
        self.group, self.sent = group, []

    def send(self, tensors, dst, tag):
        self.sent.append(tensors[0].numel() * tensors[0].element_size())
        return self.group.send(tensors, dst, tag)

    def recv(self, tensors, src, tag):
        return self.group.recv(tensors, src, tag)


def test_a_frame_carries_only_the_bytes_it_uses():
    """Receives are posted for whole frames; a message shorter than a frame sends only its
    header, message and tensor bytes, and still arrives intact, before and after a full one."""
    hidden = torch.randn(4, 64)  # 1 KiB
    full = torch.randn(2000)  # 8000 bytes: fills most of an 8 KiB frame

    def send(link: StageLink):
        link._group = _CountingGroup(link._group)
        link.send_message(Note(1), 1, hidden)
        link.send_message(Note(2), 1, full)
        link.send_message(Note(3, "z" * 100), 1)
        return link._group.sent

    def receive(link: StageLink):
        link.post_ahead(0)
        link.post_ahead(0)
        out = []
        for shape in ((4, 64), (2000,), None):
            got = link.recv_frame(0)
            out.append((link.decode(got.data, Note, 0),
                        got.tensor(shape, torch.float32) if shape else None))
        return out

    sent, received = _pair(send, receive, frame_bytes=8192)
    note = len(msgspec.msgpack.encode(Note(1)))
    header_and_note = 24 + -(-note // 8) * 8  # the header, the message rounded up to 8 bytes
    assert sent == [header_and_note + 1024, header_and_note + 8000,
                    24 + len(msgspec.msgpack.encode(Note(3, "z" * 100)))]
    assert [n.seq for n, _ in received] == [1, 2, 3] and received[2][0].text == "z" * 100
    assert torch.equal(received[0][1], hidden) and torch.equal(received[1][1], full)


def test_activation_frames_are_sized_for_a_decode_micro_batch():
    assert frame_bytes_for(256, 4) == 520 * 1024  # 8 KiB of message, 512 tokens of 1 KiB
    assert frame_bytes_for(256, 4, tokens=16) == 24 * 1024
    assert frame_bytes_for(16, 4, tokens=16) == 16 * 1024  # never below the default


def test_a_long_exchange_keeps_a_bounded_number_of_sends_alive():
    """Gloo calls a send complete only once it is waited for: the link must not keep every
    frame it ever sent (it did: memory and per-send work grew for the whole epoch)."""
    rounds = 200

    def leader(link: StageLink):
        most = 0
        for seq in range(rounds):
            link.send_message(Note(seq), 1, torch.full((8,), float(seq)))
            reply = link.recv_message(Note, 1)
            assert reply.seq == seq
            most = max(most, link.num_pending_sends)
        return most

    def stage(link: StageLink):
        most = 0
        for seq in range(rounds):
            got = link.recv_frame(0)
            assert torch.equal(got.tensor((8,), torch.float32), torch.full((8,), float(seq)))
            link.send_message(link.decode(got.data, Note, 0), 0)
            most = max(most, link.num_pending_sends)
        return most

    most = _pair(leader, stage)
    assert max(most) <= MAX_PENDING_SENDS < rounds


def thread_slice_ns(tid: int) -> int | None:
    """A thread's time slice as ``/proc`` reports it (``se.slice``), or None."""
    try:
        with open(f"/proc/self/task/{tid}/sched") as sched:
            return next((int(line.split(":")[1]) for line in sched
                         if line.startswith("se.slice")), None)
    except OSError:
        return None


def test_the_links_socket_threads_get_a_short_time_slice():
    """Each gloo group's socket thread runs with the slice the link asked for (Linux 6.12+
    honours it; older kernels skip), and ``io_slice_us=0`` leaves the kernel's."""
    release = tuple(int(n) for n in re.findall(r"\d+", platform.release())[:2])
    if sys.platform != "linux" or release < (6, 12):
        pytest.skip(f"custom time slices need Linux 6.12+ (this is {platform.system()} "
                    f"{platform.release()})")
    default = thread_slice_ns(threading.get_native_id())
    if default is None:
        pytest.skip("this kernel does not report a thread's time slice (/proc/.../sched)")

    def slices_of_new_threads(**link_kwargs) -> dict[int, int | None]:
        before = set(io_thread_ids())
        found = {}

        def look(link: StageLink) -> None:  # rank 1's group formed before rank 0's could
            for tid in set(io_thread_ids()) - before:
                found[tid] = thread_slice_ns(tid)

        _pair(look, lambda link: None, **link_kwargs)
        return found

    short = slices_of_new_threads(io_slice_us=100)
    assert len(short) >= 2, short  # one per rank's group
    assert set(short.values()) == {100_000}, short
    kept = slices_of_new_threads(io_slice_us=0)
    assert kept and set(kept.values()) == {default}, kept
