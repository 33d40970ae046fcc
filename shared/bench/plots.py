"""PNG plots of replays (matplotlib, Agg backend: no display needed).

- ``plot_ttft_cdf``: the TTFT CDF of each policy. The fraction is of requests *sent*, so a
  policy that lost requests (rejected or failed) never reaches 1: the gap is what it lost.
- ``plot_ttft_timeline``: one run over time. Top: each completed request's TTFT at the time it
  was sent, lost requests as red crosses on the top edge, drops and restores as vertical lines.
  Bottom: KV usage (the cluster samples) and requests sent per second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from kunserve.bench.cluster_monitor import ClusterSample, TopologyEvent
from kunserve.bench.request_record import RequestRecord, Status

EVENT_STYLE = {"drop": ("tab:red", "drop"), "restore": ("tab:green", "restore")}


def _pyplot():
    """matplotlib on the Agg backend, imported when a plot is drawn (not when the CLI
    starts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ttft_cdf(runs: Mapping[str, Sequence[RequestRecord]], path: Path,
                  title: str = "TTFT CDF") -> None:
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for policy, records in runs.items():
        ttfts = sorted(r.ttft_s for r in records if r.status is Status.OK and r.ttft_s)
        lost = sum(r.status is not Status.OK for r in records)
        if not ttfts:
            continue
        fractions = [k / len(records) for k in range(len(ttfts) + 1)]
        ax.step([ttfts[0], *ttfts], fractions, where="post", label=f"{policy} (lost {lost})")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(_pyplot().NullFormatter())  # decades only: no overlap
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests sent")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    _save(fig, path)


def plot_ttft_timeline(records: Sequence[RequestRecord], samples: Sequence[ClusterSample],
                       events: Sequence[TopologyEvent], path: Path,
                       title: str = "TTFT over time") -> None:
    fig, (top, bottom) = _pyplot().subplots(2, 1, figsize=(9, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    done = [r for r in records if r.status is Status.OK and r.ttft_s is not None]
    lost = [r for r in records if r.status is not Status.OK]
    top.scatter([r.sent_s for r in done], [r.ttft_s for r in done], s=8, label="TTFT")
    ceiling = max((r.ttft_s for r in done), default=1.0)
    if lost:
        top.scatter([r.sent_s if r.sent_s is not None else r.scheduled_s for r in lost],
                    [ceiling] * len(lost), marker="x", color="tab:red",
                    label=f"lost ({len(lost)})")
    top.set_ylabel("TTFT (s)")
    top.set_title(title)
    _mark_events(top, events)
    _mark_events(bottom, events, label=False)
    top.grid(True, alpha=0.3)
    top.legend(loc="upper left", fontsize="small")
    _plot_kv_and_rate(bottom, records, samples)
    _save(fig, path)


def _mark_events(ax, events: Sequence[TopologyEvent], label: bool = True) -> None:
    labelled = set()
    for event in events:
        color, name = EVENT_STYLE.get(event.kind, ("tab:gray", event.kind))
        ax.axvline(event.t_s, color=color, linestyle="--", linewidth=1,
                   label=name if label and name not in labelled else None)
        labelled.add(name)


def _plot_kv_and_rate(ax, records: Sequence[RequestRecord],
                      samples: Sequence[ClusterSample]) -> None:
    kv = [(s.t_s, 100 * s.kv_usage) for s in samples if s.kv_usage is not None]
    if kv:
        ax.plot([t for t, _ in kv], [u for _, u in kv], color="tab:purple", label="KV usage")
    ax.set_ylabel("KV usage (%)")
    ax.set_ylim(0, 105)
    ax.set_xlabel("time since the start of the run (s)")
    ax.grid(True, alpha=0.3)
    sent = [r.sent_s for r in records if r.sent_s is not None]
    if sent:
        rate = ax.twinx()
        seconds = range(math.ceil(max(sent)) + 1)
        counts = [0] * len(seconds)
        for t in sent:
            counts[int(t)] += 1
        rate.bar(list(seconds), counts, width=1.0, align="edge", color="tab:gray", alpha=0.3,
                 label="requests sent / s")
        rate.set_ylabel("requests sent / s")
        rate.legend(loc="upper right", fontsize="small")
    if kv:
        ax.legend(loc="upper left", fontsize="small")


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
