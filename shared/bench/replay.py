"""``kunserve bench run``: replay a trace (or synthetic arrivals) against a running stack.

Reads the stack (model, context, KV capacity), builds the scenario (``scenario.py``: traces,
window, scaling), sends every request on its schedule (``loadgen.py``), then writes the
per-request rows, the summary and SLO points (``results.py``), the TTFT CDF and the TTFT
timeline with KV usage and drops/restores (``plots.py``), and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

from kunserve.bench.cluster_monitor import (
    ClusterSample,
    read_states,
    topology_events,
    wait_until_settled,
)
from kunserve.bench.loadgen import DEFAULT_REQUEST_TIMEOUT_S, replay
from kunserve.bench.plots import plot_ttft_cdf, plot_ttft_timeline
from kunserve.bench.report import format_table
from kunserve.bench.request_record import RequestRecord
from kunserve.bench.results import write_run
from kunserve.bench.scenario import Scenario, add_scenario_args, build_scenario, describe
from kunserve.bench.stack_probe import fetch_stack_info
from kunserve.bench.stats import (
    SloPoint,
    SloReference,
    Summary,
    slo_points,
    slo_reference,
    summarize,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="replay a trace or synthetic arrivals against a running stack: TTFT/TPOT "
                    "percentiles, throughput, goodput, SLO attainment (JSON, CSV, PNG)",
        description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway")
    p.add_argument("--out", type=Path, required=True, help="directory for the results")
    add_run_args(p)
    p.add_argument("--name", default="run", help="this run's name in the table and plots")
    p.add_argument("--dry-run", action="store_true",
                   help="build the requests (and probe the stack), print what would be "
                        "replayed, send nothing")
    p.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="the P50 TTFT SLOs scale (default: this run's own)")
    p.add_argument("--slo-tpot-ms", type=float, default=None,
                   help="the P50 TPOT SLOs scale (default: this run's own)")
    add_scenario_args(p)
    p.set_defaults(func=run)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags ``bench run`` and ``bench compare`` share besides the workload's."""
    p.add_argument("--admin-token", default=os.environ.get("KUNSERVE_ADMIN_TOKEN"),
                   help="for GET /v1/cluster: KV capacity, KV usage, drops and restores "
                        "(default: $KUNSERVE_ADMIN_TOKEN)")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                   help="seconds a request may take before it counts as failed")
    p.add_argument("--sample-interval", type=float, default=0.5,
                   help="seconds between samples of the cluster's KV usage and topology")
    p.add_argument("--settle", type=float, default=90.0,
                   help="seconds to wait for the stack to be back to its starting topology "
                        "with an empty KV cache: before the replay (the speed probe may make "
                        "it drop) and after it (sampling on, to see the restore)")


@dataclass
class RunResult:
    """One policy's replay."""

    name: str
    records: list[RequestRecord]
    samples: list[ClusterSample]
    config: dict = field(default_factory=dict)

    @property
    def summary(self) -> Summary:
        return summarize(self.records)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    info = await fetch_stack_info(args.url, args.admin_token, args.block_size)
    baseline = await read_states(args.url, args.admin_token)
    scenario = await build_scenario(args, args.url, info)
    print(describe(scenario.description), flush=True)
    if args.dry_run:
        return 0
    result = await replay_scenario(args, args.url, scenario, args.name, baseline)
    ref = _reference(args, result.summary)
    slo = write_result(args.out, result, ref)
    plot_ttft_cdf({result.name: result.records}, args.out / "ttft_cdf.png")
    print()
    print(format_table({result.name: result.summary}, {result.name: slo}))
    print(f"\nresults in {args.out}")
    return 0


async def replay_scenario(args: argparse.Namespace, url: str, scenario: Scenario, name: str,
                          baseline: dict[str, str] | None) -> RunResult:
    """Wait for the stack to settle back to ``baseline`` (its states before the probe), then
    replay."""
    info = await fetch_stack_info(url, args.admin_token, args.block_size)
    ready = await wait_until_settled(url, args.admin_token, baseline, args.settle,
                                     args.sample_interval)
    if not ready:
        print(f"warning: the stack did not settle within {args.settle:g}s (back to its "
              "starting topology, KV cache empty); replaying anyway", flush=True)
    records, samples = await replay(
        url, info.model, scenario.requests, admin_token=args.admin_token,
        sample_interval_s=args.sample_interval, baseline=baseline, settle_s=args.settle,
        request_timeout_s=args.request_timeout, desc=name)
    return RunResult(name, records, samples, {"url": url, **scenario.description,
                                              "settled_before_replay": ready})


def _reference(args: argparse.Namespace, summary: Summary) -> SloReference | None:
    """``--slo-ttft-ms`` / ``--slo-tpot-ms`` where given, else the run's own P50s."""
    own = slo_reference([summary])
    ttft = args.slo_ttft_ms / 1e3 if args.slo_ttft_ms is not None else own and own.ttft_s
    tpot = args.slo_tpot_ms / 1e3 if args.slo_tpot_ms is not None else own and own.tpot_s
    return SloReference(ttft, tpot) if ttft is not None and tpot is not None else own


def write_result(out: Path, result: RunResult, ref: SloReference | None) -> list[SloPoint]:
    """Files and the timeline plot of one run; its SLO points against ``ref`` (none when
    nothing completed anywhere)."""
    slo = slo_points(result.records, ref) if ref is not None else []
    events = topology_events(result.samples)
    config = {**result.config, "slo_reference": ref and {"ttft_s": ref.ttft_s,
                                                          "tpot_s": ref.tpot_s}}
    write_run(out, result.records, result.summary, slo, result.samples, events, config)
    plot_ttft_timeline(result.records, result.samples, events, out / "ttft_timeline.png",
                       title=f"{result.name}: TTFT over time")
    return slo
