"""The gateway's side of the planner: admin reconfigurations as NATS requests.

``reconfigure`` sends a ``Reconfigure`` to ``Subjects.RECONFIGURE`` and waits for the
planner's ``ReconfigureReply``, which is the outcome (the planner answers once the drop or
restore is committed or has failed). A drop moves parameters and KV between processes and
can take tens of seconds, hence ``timeout_s`` (``reconfigure_timeout_s``, 160 s by default).
Failures come back as the ``OpenAIError`` to answer with: the planner's own ``status`` (400
unknown instances, 409 another reconfiguration of them is under way, 503), or 503 when no
planner runs or it does not answer in time.
"""

from __future__ import annotations

import msgspec
import nats
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from opentelemetry.trace import SpanKind, Tracer

from kunserve.gateway.errors import (
    OpenAIError,
    bad_request,
    conflict,
    server_error,
    service_unavailable,
)
from kunserve.protocol import Reconfigure, ReconfigureReply, Subjects, decode, encode
from kunserve.telemetry import inject_headers


class PlannerClient:
    def __init__(self, nc: nats.NATS, tracer: Tracer, timeout_s: float) -> None:
        self._nc = nc
        self._tracer = tracer
        self._timeout_s = timeout_s

    async def reconfigure(self, command: Reconfigure) -> ReconfigureReply:
        """The planner's reply when it succeeded; else raises the error to answer with. The
        span's context rides in the NATS headers, so the planner's phase spans join it."""
        with self._tracer.start_as_current_span(f"gateway.cluster.{command.action}",
                                                kind=SpanKind.SERVER) as span:
            span.set_attribute("kunserve.instances", command.instances)
            span.set_attribute("kunserve.group_id", command.group)
            reply = await self._ask(command)
            if not reply.ok:
                raise _refusal(reply)
            span.set_attribute("kunserve.epoch", reply.epoch)
            return reply

    async def _ask(self, command: Reconfigure) -> ReconfigureReply:
        try:
            msg = await self._nc.request(Subjects.RECONFIGURE, encode(command),
                                         timeout=self._timeout_s, headers=inject_headers())
        except NoRespondersError:
            raise service_unavailable(f"no planner is running (nobody answers "
                                      f"{Subjects.RECONFIGURE})") from None
        except NatsTimeoutError:
            raise service_unavailable(f"the planner did not answer within "
                                      f"{self._timeout_s:g}s (the reconfiguration may still "
                                      "complete)") from None
        except NatsError as exc:
            raise service_unavailable(f"NATS: {exc}") from None
        try:
            return decode(msg.data, ReconfigureReply)
        except msgspec.DecodeError as exc:
            raise server_error(f"unreadable reply from the planner: {exc}") from None


def _refusal(reply: ReconfigureReply) -> OpenAIError:
    message = reply.error or "the planner refused without saying why"
    if reply.status == 400:
        return bad_request(message)
    if reply.status == 409:
        return conflict(message, reply.code or "reconfiguration_in_progress")
    if reply.status == 503:
        return service_unavailable(message)
    return server_error(f"the planner failed (status {reply.status}): {message}")
