"""What a policy did during a replay, read off the gateway's ``/metrics`` before and after it:
preemptions (recompute or swap), swap-outs to host memory, requests moved by live migration,
drops and restores. ``kunserve bench compare`` prints them under its table, so one run shows
each policy behaving as named (or not: a burst that never exhausted the KV preempts nothing).
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx

# row label -> series of ``/metrics`` (summed over instances; a label set selects one series)
COUNTERS = {
    "preemptions": "vllm:num_preemptions_total",
    "swap-outs": "kunserve:swap_outs_total",
    "migrated requests": "kunserve:migrated_requests_total",
    "drops": 'kunserve:drops_total{outcome="ok"}',
    "restores": 'kunserve:restores_total{outcome="ok"}',
}


def metric_value(text: str, name: str) -> float:
    """The sum of every sample of ``name`` (a metric, or one series of it with its labels) in
    a Prometheus text exposition; 0 when absent."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def read_counters(text: str) -> dict[str, float]:
    return {label: metric_value(text, name) for label, name in COUNTERS.items()}


async def fetch_counters(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.get("/metrics")
        response.raise_for_status()
        return read_counters(response.text)


def counted_between(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """What happened in between. A per-instance counter can only drop when an instance went
    away (its series with it): never below zero."""
    return {label: max(0.0, after[label] - before.get(label, 0.0)) for label in after}
