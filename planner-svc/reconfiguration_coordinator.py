"""Runs drops and restores through the two-phase protocol (DESIGN §4, ``protocol.py``).

The one way the topology's groups change: the admin ``Reconfigure`` handler calls it, and the
automatic planner will call ``drop``/``restore`` directly. A drop::

    publish epoch E: the members preparing group g<E>
    PrepareGroup(GroupPlan(epoch=E)) to all at once
      any failed or silent -> AbortGroup(E) to all; publish them solo;        reply 503
      all ok               -> CommitGroup(E) to all at once
                                any failed or silent -> publish them solo;    reply 503
                                all ok -> publish them pipelined (stages);    reply 200

A restore: publish ``restoring`` (epoch R), ``RestoreGroup(R)`` to all, publish solo. Every
publish takes the next epoch, so the final epoch is E+1 (R+1) unless membership published in
between. The epoch every command carries is the one that announced the reconfiguration (E or
R); it names the members' process group (``PrefixStore("epoch-E")`` on the planner's
TCPStore) and ties the commit or abort to its prepare.

Timeouts: a member that does not answer a prepare within ``plan.timeout_s`` plus a short grace
(so its own rendezvous-timeout error can still arrive) fails it; commit and restore move KV and
parameters, so they get longer ones. After a failed commit the workers fall back to solo by
themselves (their process group breaks), so the planner only publishes them solo.

One reconfiguration per instance at a time: the members are claimed (``busy``) under the
topology lock before the first publish and released after the last; requests touching other
instances run concurrently. While claimed, membership leaves their entries alone.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from kunserve.planner.control_channel import ControlChannel
from kunserve.planner.group_transitions import (
    back_to_solo,
    begin_drop,
    begin_restore,
    commit_drop,
    group_id_for,
)
from kunserve.planner.reconfigure_validation import (
    BAD_REQUEST,
    IN_PROGRESS,
    ReconfigureRejected,
    drop_members,
    restore_members,
)
from kunserve.planner.topology_publisher import (
    TRANSIENT_ERRORS,
    TopologyChange,
    TopologyPublisher,
)
from kunserve.protocol import (
    AbortGroup,
    CommitGroup,
    GroupPlan,
    MigrateRequests,
    PrepareGroup,
    Reconfigure,
    ReconfigureReply,
    RestoreGroup,
    Topology,
)

logger = logging.getLogger(__name__)

UNAVAILABLE = 503
_PUBLISH_ATTEMPTS, _PUBLISH_RETRY_S = 5, 0.5


@dataclass(frozen=True)
class PhaseTimeouts:
    prepare_s: float = 30.0  # GroupPlan.timeout_s: members form the process group within it
    commit_s: float = 120.0  # commit moves KV between members
    restore_s: float = 120.0  # restore pulls parameters back and moves KV
    abort_s: float = 10.0
    reply_grace_s: float = 2.0  # on top of prepare_s, for a member's own timeout error


@dataclass(frozen=True)
class StoreAddress:
    """The TCPStore members rendezvous at (hosted by the planner process)."""

    host: str
    port: int


class ReconfigurationCoordinator:
    def __init__(self, channel: ControlChannel, topology: TopologyPublisher,
                 store: StoreAddress, num_layers: int,
                 timeouts: PhaseTimeouts = PhaseTimeouts()) -> None:
        self.channel = channel
        self.topology = topology
        self.store = store
        self.num_layers = num_layers
        self.timeouts = timeouts
        self._busy: set[str] = set()

    @property
    def busy(self) -> frozenset[str]:
        """Instances a reconfiguration is under way for."""
        return frozenset(self._busy)

    async def reconfigure(self, request: Reconfigure) -> ReconfigureReply:
        if request.action == "drop":
            return await self.drop(request.instances)
        if request.action == "restore":
            return await self.restore(request.group)
        return _rejected(ReconfigureRejected(
            BAD_REQUEST, f"unknown action {request.action!r}: drop or restore"))

    async def drop(self, instances: Sequence[str] = ()) -> ReconfigureReply:
        """Merge ``instances`` (every live solo one when empty) into one pipeline group,
        ``instances[0]`` its leader."""
        return await self._claimed(
            lambda t: drop_members(instances, t, self._busy, self.num_layers),
            lambda t, members: begin_drop(t, members, self.num_layers),
            self._prepare_and_commit)

    async def restore(self, group_id: str) -> ReconfigureReply:
        """Split pipelined group ``group_id`` back into solo instances."""
        return await self._claimed(
            lambda t: restore_members(group_id, t, self._busy),
            lambda t, _: begin_restore(t, group_id),
            lambda epoch, members: self._restore(epoch, members, group_id))

    async def migrate(self, source: str, destination: str, blocks: int) -> ReconfigureReply:
        """The llumnix policy: ``source`` hands running requests holding up to ``blocks`` KV
        blocks, with their KV, to ``destination``. Both stay solo (the topology does not
        change); they form a 2-member link for it, as a drop's prepare does."""
        members = [source, destination]
        if set(members) & self._busy:
            return ReconfigureReply(ok=False, status=409, code=IN_PROGRESS,
                                    error=f"{source} or {destination} is being reconfigured")
        self._busy.update(members)
        group_id = f"migrate-{uuid.uuid4().hex[:12]}"
        epoch = self.topology.current.epoch
        try:
            plan = GroupPlan(epoch=epoch, group_id=group_id, members=members,
                             store_host=self.store.host, store_port=self.store.port,
                             timeout_s=self.timeouts.prepare_s)
            prepare = await self.channel.broadcast(
                members, PrepareGroup(plan=plan),
                self.timeouts.prepare_s + self.timeouts.reply_grace_s)
            if not prepare.ok:
                await self.channel.broadcast(members, AbortGroup(
                    epoch=epoch, group_id=group_id, reason=prepare.errors()),
                    self.timeouts.abort_s)
                return ReconfigureReply(ok=False, status=UNAVAILABLE, epoch=epoch,
                                        group=group_id,  # started: recorded as failed
                                        error=f"prepare failed: {prepare.errors()}")
            moved = await self.channel.broadcast(
                members, MigrateRequests(epoch=epoch, group_id=group_id, blocks=blocks),
                self.timeouts.commit_s)
            return ReconfigureReply(
                ok=moved.ok, status=200 if moved.ok else UNAVAILABLE, epoch=epoch,
                group=group_id, error=None if moved.ok else moved.errors(),
                phase_seconds={"prepare": prepare.seconds, "migrate": moved.seconds},
                moved_requests=int(moved.replies[source].figures.get("requests", 0)))
        finally:
            self._busy.difference_update(members)

    async def _claimed(self, choose: Callable[[Topology], list[str]],
                       begin: Callable[[Topology, list[str]], Topology],
                       run: Callable[[int, list[str]], Awaitable[ReconfigureReply]],
                       ) -> ReconfigureReply:
        """Start (``_start``), ``run(epoch, members)``, release the members whatever happens."""
        try:
            epoch, members = await self._start(choose, begin)
        except ReconfigureRejected as exc:
            return _rejected(exc)
        try:
            return await run(epoch, members)
        finally:
            self._busy.difference_update(members)

    async def _start(self, choose: Callable[[Topology], list[str]],
                     begin: Callable[[Topology, list[str]], Topology]) -> tuple[int, list[str]]:
        """Choose and claim the members and publish the first transition, all against the same
        (latest) topology under its lock; the epoch it was published at, and the members."""
        members: list[str] = []

        def start(current: Topology) -> Topology:
            members.extend(choose(current))
            self._busy.update(members)
            return begin(current, members)

        try:
            started = await self.topology.update(start)
        except BaseException:
            self._busy.difference_update(members)
            raise
        return started.epoch, members

    async def _prepare_and_commit(self, epoch: int, members: list[str]) -> ReconfigureReply:
        group_id = group_id_for(epoch)
        plan = GroupPlan(epoch=epoch, group_id=group_id, members=members,
                         store_host=self.store.host, store_port=self.store.port,
                         timeout_s=self.timeouts.prepare_s)
        prepare = await self.channel.broadcast(
            members, PrepareGroup(plan=plan), self.timeouts.prepare_s + self.timeouts.reply_grace_s)
        seconds = {"prepare": prepare.seconds}
        if not prepare.ok:
            abort = await self.channel.broadcast(
                members, AbortGroup(epoch=epoch, group_id=group_id, reason=prepare.errors()),
                self.timeouts.abort_s)
            if not abort.ok:
                logger.warning("abort of %s not acknowledged: %s", group_id, abort.errors())
            return await self._failed(members, group_id, f"prepare failed: {prepare.errors()}",
                                      seconds)
        commit = await self.channel.broadcast(
            members, CommitGroup(epoch=epoch, group_id=group_id), self.timeouts.commit_s)
        seconds["commit"] = commit.seconds
        if not commit.ok:
            return await self._failed(members, group_id, f"commit failed: {commit.errors()}",
                                      seconds)
        final = await self._publish_outcome(
            lambda t: commit_drop(t, group_id, members, self.num_layers))
        logger.info("group %s formed of %s (prepare %.2f s, commit %.2f s)", group_id,
                    ", ".join(members), prepare.seconds, commit.seconds)
        return ReconfigureReply(ok=True, epoch=final.epoch, group=group_id,
                                phase_seconds=seconds)

    async def _restore(self, epoch: int, members: list[str], group_id: str) -> ReconfigureReply:
        restore = await self.channel.broadcast(
            members, RestoreGroup(epoch=epoch, group_id=group_id), self.timeouts.restore_s)
        seconds = {"restore": restore.seconds}
        if not restore.ok:
            return await self._failed(members, group_id, f"restore failed: {restore.errors()}",
                                      seconds)
        final = await self._publish_outcome(
            lambda t: back_to_solo(t, members, self.num_layers))
        logger.info("group %s restored to solo %s (%.2f s)", group_id, ", ".join(members),
                    restore.seconds)
        return ReconfigureReply(ok=True, epoch=final.epoch, group=group_id,
                                phase_seconds=seconds)

    async def _failed(self, members: list[str], group_id: str, error: str,
                      seconds: dict[str, float]) -> ReconfigureReply:
        """The members serve solo again (they return there by themselves); say why."""
        logger.warning("group %s: %s", group_id, error)
        final = await self._publish_outcome(lambda t: back_to_solo(t, members, self.num_layers))
        return ReconfigureReply(ok=False, status=UNAVAILABLE, error=error, epoch=final.epoch,
                                group=group_id, phase_seconds=seconds)

    async def _publish_outcome(self, change: TopologyChange) -> Topology:
        """Publish an outcome the workers already act on, retrying a Redis/NATS hiccup: left
        unpublished, the members' entries would stay in a transitional state."""
        for _ in range(_PUBLISH_ATTEMPTS - 1):
            try:
                return await self.topology.update(change)
            except TRANSIENT_ERRORS as exc:
                logger.warning("publishing the outcome failed (%r), retrying", exc)
                await asyncio.sleep(_PUBLISH_RETRY_S)
        return await self.topology.update(change)


def _rejected(exc: ReconfigureRejected) -> ReconfigureReply:
    return ReconfigureReply(ok=False, status=exc.status, error=exc.message, code=exc.code)
