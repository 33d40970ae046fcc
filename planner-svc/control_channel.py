"""Sends one phase's ``ControlCommand`` to every member of a group and gathers the answers.

All requests go out at once (``asyncio.gather``): forming a process group is collective, so
the members must get the prepare at about the same time, and a phase lasts as long as its
slowest member rather than the sum of them. A member that does not answer within the timeout,
has nobody listening on its control subject, or answers something unreadable counts as a
failed ``ControlReply`` with that reason, so the caller sees one shape of outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from kunserve.protocol import ControlCommand, ControlReply, Subjects, decode, encode


@dataclass(frozen=True)
class PhaseOutcome:
    replies: dict[str, ControlReply]  # member -> its answer (or the reason it has none)
    seconds: float  # wall time of the phase

    @property
    def ok(self) -> bool:
        return all(reply.ok for reply in self.replies.values())

    def errors(self) -> str:
        """The failed members and why, e.g. ``w2: rendezvous timed out; w3: no answer ...``."""
        return "; ".join(f"{i}: {reply.error or 'failed'}"
                         for i, reply in self.replies.items() if not reply.ok)


class ControlChannel:
    def __init__(self, nats: NATS) -> None:
        self.nats = nats

    async def broadcast(self, members: Sequence[str], command: ControlCommand,
                        timeout_s: float) -> PhaseOutcome:
        """``command`` to every member at once; each answer is awaited up to ``timeout_s``."""
        data = encode(command)
        started = time.monotonic()
        replies = await asyncio.gather(*(self._request(i, data, timeout_s) for i in members))
        return PhaseOutcome(dict(zip(members, replies, strict=True)),
                            time.monotonic() - started)

    async def _request(self, instance_id: str, data: bytes, timeout_s: float) -> ControlReply:
        try:
            msg = await self.nats.request(Subjects.control(instance_id), data, timeout=timeout_s)
        except NoRespondersError:
            return _failed(instance_id, f"nothing listens on {Subjects.control(instance_id)}")
        except NatsTimeoutError:
            return _failed(instance_id, f"no answer within {timeout_s:g} s")
        try:
            return decode(msg.data, ControlReply)
        except msgspec.DecodeError as exc:
            return _failed(instance_id, f"unreadable reply: {exc}")


def _failed(instance_id: str, error: str) -> ControlReply:
    return ControlReply(instance_id=instance_id, ok=False, error=error)
