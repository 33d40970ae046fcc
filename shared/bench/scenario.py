"""From the trace options of ``bench run`` / ``bench compare`` to the request list a replay
sends, with a record of every choice made (sources, window, burst, scales, demand estimate).

With no ``--trace`` and no ``--rate``: **the default demo**. Arrivals from the Azure code trace
(the burstiest) in a window around its largest burst, lengths drawn from the Azure conversation
trace (chat-like outputs that stress KV memory), lengths scaled to the served model's context
and the rate scaled by the KV-demand rule (``kv_demand.py``). The same rule scales any trace
or window a user passes, unless ``--time-scale`` says otherwise; synthetic arrivals
(``--rate``) keep their rate.

The traces directory defaults to ``../shared/traces`` beside the repository (``--traces-dir``).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kunserve.bench import kv_demand, traces
from kunserve.bench.kv_demand import DemandEstimate, ServiceSpeed
from kunserve.bench.stack_probe import DEFAULT_BLOCK_SIZE, StackInfo, measure_speed
from kunserve.bench.workload import (
    BenchRequest,
    Shape,
    default_length_scale,
    make_requests,
    scale_shapes,
    synthetic_shapes,
    trace_shapes,
)

ARRIVALS_TRACE = "AzureLLMInferenceTrace_code.csv"
LENGTHS_TRACE = "AzureLLMInferenceTrace_conv.csv"
BURST_WIDTH_S = 15.0  # trace seconds: the code trace's busiest 15 s run at ~12x its mean rate
BURST_BEFORE_S = 5.0  # the demo's window: this much of the trace before the burst ...
BURST_AFTER_S = 5.0  # ... and after it (the demo: five policies in 8 min at time scale 3.3)
# The speed probe fills the KV cache: the peak the rule bounds is made of requests served at
# about that load (the probe's TPOT is still below a burst's, whose prefills interleave).
PROBE_LOAD = 1.0


def default_traces_dir() -> Path:
    """``<repository>/../shared/traces`` (this file is ``<repository>/shared/bench/``)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "traces"


def add_scenario_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload (none given: the default demo)")
    g.add_argument("--trace", default=None, help="arrivals (and lengths) from this trace")
    g.add_argument("--format", default=None, choices=traces.FORMATS,
                   help="the traces' format (default: told by the header)")
    g.add_argument("--lengths", default=None,
                   help="draw request lengths from this trace instead of --trace's own")
    g.add_argument("--window", default=None,
                   help="START:END seconds of the arrivals trace, or 'burst' (around its "
                        "largest burst); default: all of it (the demo: burst)")
    g.add_argument("--burst-width", type=float, default=BURST_WIDTH_S,
                   help="seconds of trace the burst finder slides over")
    g.add_argument("--burst-before", type=float, default=BURST_BEFORE_S,
                   help="--window burst: trace seconds kept before the burst")
    g.add_argument("--burst-after", type=float, default=BURST_AFTER_S,
                   help="--window burst: trace seconds kept after the burst")
    g.add_argument("--rate", type=float, default=None,
                   help="synthetic arrivals at this many requests/s instead of a trace's")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of synthetic inter-arrivals (1: Poisson, <1 burstier)")
    g.add_argument("--time-scale", type=float, default=None,
                   help="multiply arrival times by this (default: the KV-demand rule)")
    g.add_argument("--length-scale", type=float, default=None,
                   help="multiply lengths by this (default: the p99 request fits the context "
                        "and an instance's KV holds 4 mean requests)")
    g.add_argument("--max-requests", type=int, default=None,
                   help="keep the first N requests (synthetic: send N; default 200)")
    g.add_argument("--seed", type=int, default=0, help="prompts, drawn lengths, arrivals")
    g.add_argument("--traces-dir", type=Path, default=None,
                   help="where the default demo's traces are (default: ../shared/traces)")
    r = p.add_argument_group("KV-demand rule")
    r.add_argument("--kv-mean-target", type=float, default=kv_demand.MEAN_TARGET,
                   help="the average KV demand at most this fraction of capacity")
    r.add_argument("--kv-burst-target", type=float, default=kv_demand.BURST_TARGET,
                   help="the burst's peak demand this fraction of capacity (if the average "
                        "allows)")
    r.add_argument("--compute-target", type=float, default=kv_demand.COMPUTE_TARGET,
                   help=f"the busiest {kv_demand.COMPUTE_WINDOW_S:g} s of arrivals at most "
                        "this fraction of what the "
                        "instances compute (measured by the probe), so that the burst "
                        "exhausts memory, not the cores")
    r.add_argument("--capacity-tokens", type=int, default=None,
                   help="KV capacity (default: from GET /v1/cluster)")
    r.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help="the stack's KV block size in tokens")
    r.add_argument("--tpot-ms", type=float, default=None,
                   help="TPOT with the KV cache full (default: measured by a probe)")
    r.add_argument("--prefill-ms-per-token", type=float, default=None,
                   help="prefill time per prompt token (default: measured by a probe)")
    r.add_argument("--max-model-len", type=int, default=None,
                   help="the served context (default: from GET /v1/models)")


@dataclass
class Scenario:
    requests: list[BenchRequest]
    description: dict = field(default_factory=dict)  # every choice, for summary.json


@dataclass
class Sources:
    """The requests before scaling, and what the defaults look at besides them."""

    shapes: list[Shape]  # the requests to replay
    length_pool: list[Shape]  # where their lengths come from (the length scale's p99)
    whole: list[Shape]  # the whole arrivals trace with the same lengths (the mean demand)


async def build_scenario(args: argparse.Namespace, url: str, info: StackInfo) -> Scenario:
    desc: dict = {"seed": args.seed, "model": info.model}
    sources = _sources(args, desc)
    max_len = args.max_model_len or info.max_model_len
    capacity = args.capacity_tokens or info.capacity_tokens
    per_instance = capacity / info.instances if capacity and info.instances else None
    # a request must fit one solo instance's KV cache as well as the context (else every
    # policy refuses it with a 400 whenever no group is formed)
    fit = min(max_len, int(per_instance)) if per_instance else max_len
    length_scale = args.length_scale or default_length_scale(sources.length_pool, fit,
                                                             per_instance)
    scaled = scale_shapes(sources.shapes, length_scale, fit)
    whole = scale_shapes(sources.whole, length_scale, fit)
    desc.update(max_model_len=max_len, max_request_tokens=fit, length_scale=length_scale,
                requests=len(scaled))
    time_scale, demand = await _time_scale(args, url, info, scaled, whole, desc)
    final = scale_shapes(scaled, 1.0, fit, time_scale)
    desc.update(time_scale=time_scale, demand=_demand_dict(demand),
                duration_s=final[-1].arrival_s if final else 0.0)
    return Scenario(make_requests(final, info.vocab_size, args.seed), desc)


def _sources(args: argparse.Namespace, desc: dict) -> Sources:
    demo = args.trace is None and args.rate is None
    folder = args.traces_dir or default_traces_dir()
    # no --trace: lengths from the conversation trace (the demo's, and synthetic arrivals')
    lengths_path = args.lengths or (folder / LENGTHS_TRACE if args.trace is None else None)
    lengths = _load(lengths_path, args.format) if lengths_path else None
    desc.update(demo=demo, lengths_trace=str(lengths_path) if lengths_path else None)
    if args.rate is not None:
        source = lengths if lengths is not None else _load(args.trace, args.format)
        n = args.max_requests or 200
        desc.update(arrivals="synthetic", rate=args.rate, burstiness=args.burstiness)
        shapes = synthetic_shapes(source, args.rate, args.burstiness, n, args.seed)
        return Sources(shapes, _pool(source), shapes)
    trace_path = Path(args.trace) if args.trace else folder / ARRIVALS_TRACE
    full = _load(trace_path, args.format)
    arrivals = _window(full, "burst" if demo and args.window is None else args.window, args,
                       desc)
    desc.update(arrivals_trace=str(trace_path))
    shapes = trace_shapes(arrivals, lengths, args.seed, args.max_requests)
    whole = trace_shapes(full, lengths, args.seed) if arrivals is not full else shapes
    return Sources(shapes, _pool(lengths) if lengths is not None else shapes, whole)


def _pool(trace: traces.Trace) -> list[Shape]:
    return [Shape(r.arrival_s, r.input_tokens, r.output_tokens) for r in trace.rows]


def _load(path: str | Path, fmt: str | None) -> traces.Trace:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no trace at {path} (the default demo reads ../shared/traces; "
                         "give --traces-dir or --trace)")
    return traces.load_trace(path, fmt)


def _window(trace: traces.Trace, spec: str | None, args: argparse.Namespace,
            desc: dict) -> traces.Trace:
    if spec is None:
        return trace
    if spec == "burst":
        burst = traces.largest_burst(trace, args.burst_width)
        desc.update(burst={"start_s": burst.start_s, "width_s": burst.width_s,
                           "requests": burst.requests, "rate": burst.rate,
                           "mean_rate": burst.mean_rate, "ratio": burst.ratio})
        chosen = traces.around_burst(trace, burst, args.burst_before, args.burst_after)
        start = max(0.0, burst.start_s - args.burst_before)
        desc.update(window=[start, burst.end_s + args.burst_after])
        return chosen
    start, end = traces.parse_window(spec)
    desc.update(window=[start, end])
    return traces.window(trace, start, end)


async def _time_scale(args: argparse.Namespace, url: str, info: StackInfo, shapes: list[Shape],
                      whole: list[Shape], desc: dict) -> tuple[float, DemandEstimate | None]:
    """The time scale (flag, 1 for synthetic arrivals, else the rule) and the demand estimate
    at it (None when the capacity or the speed is unknown and not needed)."""
    fixed = args.time_scale or (1.0 if args.rate is not None else None)
    capacity = args.capacity_tokens or info.capacity_tokens
    speed_given = args.tpot_ms is not None and args.prefill_ms_per_token is not None
    if fixed is not None and (capacity is None or not speed_given):
        return fixed, None  # no probe just for an estimate
    if capacity is None:
        raise ValueError("the KV-demand rule needs the KV capacity: give the admin token "
                         "(--admin-token / KUNSERVE_ADMIN_TOKEN), --capacity-tokens, or "
                         "--time-scale")
    speed = await _speed(args, url, info, shapes, capacity)
    desc.update(capacity_tokens=capacity, speed=asdict(speed))
    demands = [s.demand() for s in shapes]
    everything = [s.demand() for s in whole]
    instances = info.instances or 0
    if fixed is not None:
        return fixed, kv_demand.estimate(demands, speed, capacity, fixed, everything, instances)
    chosen = kv_demand.choose_time_scale(demands, speed, capacity, args.kv_mean_target,
                                         args.kv_burst_target, everything, instances,
                                         args.compute_target)
    return chosen.time_scale, chosen


async def _speed(args: argparse.Namespace, url: str, info: StackInfo, shapes: list[Shape],
                 capacity: int) -> ServiceSpeed:
    if args.tpot_ms is not None and args.prefill_ms_per_token is not None:
        return ServiceSpeed(args.prefill_ms_per_token / 1e3, args.tpot_ms / 1e3)
    print("measuring the stack's speed with its KV cache full ...", flush=True)
    measured = await measure_speed(url, info.model, shapes, capacity, info.vocab_size,
                                   PROBE_LOAD, args.seed, info.instances or 1)
    return ServiceSpeed(
        measured.prefill_s_per_token if args.prefill_ms_per_token is None
        else args.prefill_ms_per_token / 1e3,
        measured.tpot_s if args.tpot_ms is None else args.tpot_ms / 1e3,
        measured.decode_s_per_token)


def _demand_dict(demand: DemandEstimate | None) -> dict | None:
    if demand is None:
        return None
    return {**asdict(demand), "mean_fraction": demand.mean_fraction,
            "peak_fraction": demand.peak_fraction, "burst_exceeds_capacity": demand.exceeds}


def describe(desc: dict) -> str:
    """Two or three lines on what will be replayed."""
    arrivals = (f"synthetic, {desc['rate']:g} req/s, burstiness {desc['burstiness']:g}"
                if desc.get("arrivals") == "synthetic" else Path(desc["arrivals_trace"]).name)
    lines = [f"arrivals: {arrivals}"
             + (f", window {desc['window'][0]:g}:{desc['window'][1]:g} s" if "window" in desc
                else "")
             + (f" (burst {desc['burst']['ratio']:.1f}x the mean rate at "
                f"{desc['burst']['start_s']:g} s)" if "burst" in desc else ""),
             f"lengths: {Path(desc['lengths_trace']).name if desc['lengths_trace'] else 'same'}"
             f", length scale {desc['length_scale']:.3g}; time scale "
             f"{desc['time_scale']:.3g}; {desc['requests']} requests over "
             f"{desc['duration_s']:.0f} s"]
    speed = desc.get("speed")
    if speed:
        lines.append(f"service speed: prefill {1e3 * speed['prefill_s_per_token']:.3f} ms/token,"
                     f" TPOT {1e3 * speed['tpot_s']:.1f} ms"
                     + (f", {1e3 * speed['decode_s_per_token']:.2f} ms of an instance per "
                        "output token" if speed.get("decode_s_per_token") else ""))
    demand = desc.get("demand")
    if demand:
        lines.append(f"KV demand estimate: mean {100 * demand['mean_fraction']:.0f}%, peak "
                     f"{100 * demand['peak_fraction']:.0f}% of {demand['capacity_tokens']} "
                     f"tokens" + ("" if demand["burst_exceeds_capacity"]
                                  else " (the burst does not exceed capacity)")
                     + (f"; the busiest {kv_demand.COMPUTE_WINDOW_S:g} s need "
                        f"{100 * demand['compute_load']:.0f}% of the "
                        "instances' compute" if demand.get("compute_load") is not None else ""))
    return "\n".join(lines)
