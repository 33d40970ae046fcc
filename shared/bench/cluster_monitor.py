"""Samples the stack's KV usage and topology while a replay runs, and reads drops and restores
out of the samples.

With the admin token: ``GET /v1/cluster`` (KV usage = blocks used / blocks total of the block
tables: one per solo instance and one per group, whose leader reports it — the other members
report none used; the epoch; every instance's state). Without it: ``GET /metrics`` (the mean of
``vllm:kv_cache_usage_perc`` over instances and ``kunserve:topology_epoch``; no states, so no
drop or restore marks). A sample that fails is skipped: the monitor never fails a run.

A **drop** is an instance whose state becomes ``pipelined``; a **restore** one whose state goes
from anything else back to ``solo`` after having been in a group (``pipelined`` or
``restoring``). ``topology_events`` is pure.

**Settled**: every instance in the state it had at a baseline (the stack as it started: all
solo, or a static pipeline's members pipelined) and no KV block in use. A replay starts from a
settled stack (the speed probe may have made the planner drop) and samples on after its last
request until the stack has settled again, to see the restore.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class ClusterSample:
    t_s: float  # from the start of the run
    kv_usage: float | None  # 0..1
    epoch: int | None = None
    states: dict[str, str] = field(default_factory=dict)  # instance id -> state
    blocks_used: int | None = None
    blocks_total: int | None = None


@dataclass(frozen=True)
class TopologyEvent:
    t_s: float
    kind: str  # drop | restore
    instance: str
    epoch: int | None


class ClusterMonitor:
    def __init__(self, client: httpx.AsyncClient, admin_token: str | None,
                 interval_s: float = 0.5) -> None:
        self.client = client
        self.admin_token = admin_token
        self.interval_s = interval_s
        self.samples: list[ClusterSample] = []

    async def run(self, t0: float, stop: asyncio.Event) -> None:
        """Sample every ``interval_s`` until ``stop`` is set (times relative to ``t0``, a
        ``time.perf_counter()``)."""
        while not stop.is_set():
            sample = await self.sample(t0)
            if sample is not None:
                self.samples.append(sample)
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass

    async def sample(self, t0: float) -> ClusterSample | None:
        try:
            if self.admin_token:
                return await self._from_cluster(t0)
            return await self._from_metrics(t0)
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    async def _from_cluster(self, t0: float) -> ClusterSample:
        response = await self.client.get(
            "/v1/cluster", headers={"Authorization": f"Bearer {self.admin_token}"})
        response.raise_for_status()
        cluster = response.json()
        now = time.perf_counter() - t0
        instances = cluster["instances"]
        used, total = kv_blocks(instances)
        return ClusterSample(now, used / total if total else None, cluster["epoch"],
                             {i["id"]: i["state"] for i in instances}, used, total)

    async def _from_metrics(self, t0: float) -> ClusterSample:
        response = await self.client.get("/metrics")
        response.raise_for_status()
        now = time.perf_counter() - t0
        usages = metric_values(response.text, "vllm:kv_cache_usage_perc")
        epochs = metric_values(response.text, "kunserve:topology_epoch")
        return ClusterSample(now, sum(usages) / len(usages) if usages else None,
                             int(epochs[0]) if epochs else None)


def settled(sample: ClusterSample | None, baseline: dict[str, str] | None) -> bool:
    """Is the stack back to ``baseline``'s states with an empty cache? Without states (no
    admin token) only the cache counts; without a sample, nothing is known: True."""
    if sample is None:
        return True
    empty = sample.kv_usage is None or sample.kv_usage == 0
    return empty and (not sample.states or baseline is None or sample.states == baseline)


TRANSITIONAL = ("preparing", "restoring")


async def read_states(url: str, admin_token: str | None, stable_s: float = 2.0,
                      timeout_s: float = 30.0) -> dict[str, str] | None:
    """Every instance's state once they have held for ``stable_s`` with none in transition
    (a static pipeline forms just after start-up), or as they are at ``timeout_s``: the
    baseline a settled stack returns to. None without the admin token."""
    deadline = time.perf_counter() + timeout_s
    states: dict[str, str] | None = None
    since = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        monitor = ClusterMonitor(client, admin_token)
        while time.perf_counter() < deadline:
            sample = await monitor.sample(time.perf_counter())
            now_states = sample.states if sample is not None else {}
            if not now_states and admin_token is None:
                return None
            if now_states != states or any(s in TRANSITIONAL for s in now_states.values()):
                states, since = now_states, time.perf_counter()
            elif time.perf_counter() - since >= stable_s:
                break
            await asyncio.sleep(0.25)
    return states or None


async def wait_until_settled(url: str, admin_token: str | None,
                             baseline: dict[str, str] | None, timeout_s: float,
                             interval_s: float = 0.5) -> bool:
    """Sample until ``settled`` (True) or ``timeout_s`` passed (False)."""
    deadline = time.perf_counter() + timeout_s
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        monitor = ClusterMonitor(client, admin_token, interval_s)
        while not settled(await monitor.sample(time.perf_counter()), baseline):
            if time.perf_counter() >= deadline:
                return False
            await asyncio.sleep(interval_s)
    return True


def kv_blocks(instances: list[dict]) -> tuple[int, int]:
    """Blocks used and total over the block tables of ``GET /v1/cluster``'s instances: solo
    instances and group leaders (stage 0); a group's other members hold slices of the
    leader's blocks."""
    tables = [i for i in instances if i.get("stage", 0) == 0]
    return sum(i["blocks_used"] for i in tables), sum(i["blocks_total"] for i in tables)


def metric_values(text: str, name: str) -> list[float]:
    """The values of every sample of the Prometheus metric ``name`` in ``text``."""
    values = []
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            values.append(float(line.rsplit(" ", 1)[1]))
    return values


def topology_events(samples: list[ClusterSample]) -> list[TopologyEvent]:
    events = []
    previous: dict[str, str] = {}
    grouped: set[str] = set()
    for sample in samples:
        for instance, state in sample.states.items():
            before = previous.get(instance)
            if state == "pipelined" and before not in (None, "pipelined"):
                events.append(TopologyEvent(sample.t_s, "drop", instance, sample.epoch))
            if state == "solo" and instance in grouped and before != "solo":
                events.append(TopologyEvent(sample.t_s, "restore", instance, sample.epoch))
            if state in ("pipelined", "restoring"):
                grouped.add(instance)
            elif state == "solo":
                grouped.discard(instance)
            previous[instance] = state
    return events
