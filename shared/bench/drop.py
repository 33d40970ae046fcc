"""``kunserve bench drop``: what a parameter drop and restore cost, measured on real processes.

For each group size ``g`` (``--instances``, default 2 and 4), ``g`` spawned processes each own
a solo ``LLMEngine`` (default memory budget, ``--threads`` torch threads) serving its own
``--requests-per-instance`` streaming greedy requests, and in one run:

1. prepare: after a barrier, every member forms the epoch's ``StageLink`` at a TCPStore this
   process hosts (``stage_link.meet``, what a worker does on the planner's prepare), timed from
   the last member starting to each member's link being ready; in the mesh it happens while
   the worker serves, so it is not part of any request's token gap;
2. solo: the requests prefill, 2 decode steps warm up, ``--steps`` decode steps are timed; each
   member then serves on until every member has finished its window (the commit: a worker
   serves until the planner's commit reaches it; the tokens past what the later phases need
   are kept for this wait, a window's worth with the default ``--output-len``; a member that
   runs out of them stops stepping, and the run reports how long before its drop, time that
   the gap of its requests then includes), on until the leader has entered the drop (a
   member, as a worker does: ``reconfigure.leader_entered``), and drops
   (``reconfigure.drop``: ``Membership.phases`` handover, free, exchange and the bytes of
   ``Membership.kv_moved``), with ``--queued-per-instance`` requests queued on each member
   just before. The exchange runs beside the group as in a worker (over the second link; or
   before it serves, ``--exchange before``): the leader steps as a worker's engine thread
   does, which runs nothing while the running requests' KV moves (they go first), then
   ``complete_drop``;
3. pipelined: the leader times its first ``step()`` after the drop, runs one more round,
   serves on until the requests queued at the drop are done (their prefills would otherwise
   fall into the pipelined window and not into the solo one), then ``--steps`` × g timed
   steps (``--steps`` tokens per request); then it restores the way a
   worker does: every member pulls the layers it dropped over the group's second link on a
   helper thread (``pull_layers``, phase restore_layers) while the group goes on serving (up
   to ``PULL_TOKENS`` tokens per request), then the leader drains and splits the group
   (``plan_restore``, ``restore``: phases restore_exchange, restore_total); every member
   finishes its requests solo;
4. raw link: every member sends the same per-layer KV chunks to the same peers in the same order
   as the drop's exchange (the layout ``group_layout.drop_layout`` derives from the members'
   block tables at the drop; ``kv_transfer.exchange_order``), with plain ``torch.distributed``
   irecv/isend on a gloo group over the same loopback, receives posted first as the exchange
   posts them, from and into preallocated buffers; the best of 3 rounds (by the slowest
   member) counts. Between the raw rounds, the exchange itself runs again on the same pieces
   (``kv_transfer.start_move`` and ``finish`` over a ``StageLink`` of its own, staging in a
   touched buffer as a drop stages in the parameters it frees, the cache re-read back to its
   solo geometry after each): alternated with the raw rounds, both see the machine in the same
   state, where the drop's own exchange and the raw rounds run seconds apart on cores whose
   speed drifts between runs.

Every token is stamped with ``time.time()`` by the process that produced it (its member before
the drop, the leader after), so the gap a request sees across the drop is measured end to end.
A phase's figure is the slowest member's: the group waits for it.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import queue
import statistics
import tempfile
import time
import traceback
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kunserve.bench.stats import spread
from kunserve.worker.pipeline.io_threads import IO_SLICE_US, shorten_io_slices

HOST = "127.0.0.1"
TIMEOUT_S = 120.0
WARM_STEPS = 2
RAW_ROUNDS = 3
# tokens per request kept for serving while the layers are pulled back (the pull overlaps
# with serving, as in a worker); when they run out the leader waits for the pull
PULL_TOKENS = 16
MEMBER_DEADLINE_S = 900.0
QUEUED_TOKENS = 4  # output tokens of a request queued at the drop
# tokens per moved request the leader serves at most before its timed window while the
# requests queued at the drop are still prefilling or decoding
QUEUED_ALLOWANCE = 24


@dataclass(frozen=True)
class DropBenchSpec:
    model: str
    size: int  # members of the group
    requests_per_instance: int
    prompt_len: int
    output_len: int
    steps: int
    threads: int
    queued_per_instance: int = 0  # requests queued on each member at the drop (no KV yet)
    overlap: bool = True  # the KV exchange overlaps serving (else it runs before)
    io_slice_us: int = IO_SLICE_US  # the links' socket threads' time slice (0: the kernel's)

    @property
    def exchange_mode(self) -> str:
        return "overlapped" if self.overlap else "before serving"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("drop", help="drop/restore phase times, KV exchange vs raw link, token "
                                    "gap across the drop, pipelined vs solo decode")
    p.add_argument("--model", default=None, help="checkpoint dir (default: a tiny 8-layer, "
                                                 "hidden-512 Llama built on the fly)")
    p.add_argument("--instances", type=_sizes, default=[2, 4],
                   help="group sizes, comma-separated; one table each (default: 2,4)")
    p.add_argument("--requests-per-instance", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32,
                   help="decode steps timed solo; tokens per request timed pipelined")
    p.add_argument("--threads", type=int, default=1, help="torch threads per member process")
    p.add_argument("--queued-per-instance", type=int, default=2,
                   help=f"requests each member queues just before the drop (prompt "
                        f"--prompt-len, {QUEUED_TOKENS} output tokens): they wait for the "
                        "requests whose KV moves, which go first")
    p.add_argument("--exchange", choices=["overlapped", "before", "both"], default="both",
                   help="the drop's KV exchange overlaps serving (what a worker does), runs "
                        "before the group serves, or both side by side (default)")
    p.add_argument("--io-slice-us", type=int, default=IO_SLICE_US,
                   help="time slice asked for the links' socket threads, as a worker's "
                        "KUNSERVE_IO_SLICE_US (0: the kernel's default; compare the two)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each configuration, fresh processes each; with more than one "
                        "a table gives each figure's median and range (this machine's runs "
                        "vary: compare medians, not single runs)")
    p.add_argument("--json", default=None, help="write the figures to this file (every run)")
    p.set_defaults(func=run)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError(f"--instances takes group sizes >= 2, got {text!r}")
    return sizes


def run(args: argparse.Namespace) -> int:
    from kunserve.bench.engine import _build_default_model

    # per request: prefill, warm-up, the solo window; pipelined the window and up to two
    # more (the first round, the drain) and the tokens served while the layers are pulled
    # back; restored at least one (a request still streams). What is left over serves the
    # members that finished their solo window first while they wait for the others (the
    # commit): --steps tokens by default; a member that runs short says how long it idled
    least = WARM_STEPS + 4 + PULL_TOKENS
    if args.steps < 2 or args.output_len < 2 * args.steps + least:
        raise ValueError(f"--output-len must be at least 2 x --steps + {least} "
                         f"(got {args.output_len} and {args.steps})")
    if args.queued_per_instance < 0:
        raise ValueError("--queued-per-instance must be >= 0")
    if args.io_slice_us < 0:
        raise ValueError("--io-slice-us must be >= 0")
    if args.repeat < 1:
        raise ValueError("--repeat must be >= 1")
    modes = {"overlapped": [True], "before": [False], "both": [True, False]}[args.exchange]
    results = []
    with tempfile.TemporaryDirectory(prefix="kunserve-bench-drop-") as tmp:
        model = args.model or _build_default_model(Path(tmp) / "bench-model")
        _check_fits(args, model)
        for size in args.instances:
            for overlap in modes:
                spec = DropBenchSpec(model, size, args.requests_per_instance, args.prompt_len,
                                     args.output_len, args.steps, args.threads,
                                     args.queued_per_instance, overlap, args.io_slice_us)
                for i in range(args.repeat):
                    run_of = f", run {i + 1} of {args.repeat}" if args.repeat > 1 else ""
                    print(f"  {size} instances -> one group, KV exchange {spec.exchange_mode}"
                          f"{run_of} ...", flush=True)
                    results.append(measure(spec))
    last = results[args.repeat - 1::args.repeat]  # each configuration's last run
    for result in last:
        _print_table(result)
    if len(modes) > 1:
        _print_modes(last)
    if args.repeat > 1:
        _print_repeats(results, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def tokens_after_window(spec: DropBenchSpec) -> int:
    """Tokens per moved request the pipelined window, the round and the drain around it,
    the layer pull and the restore need."""
    return spec.steps + 3 + PULL_TOKENS


def tokens_kept(spec: DropBenchSpec) -> int:
    """Tokens per request a member keeps when it serves on until the commit and the leader:
    ``tokens_after_window`` and what the queued requests may take before the window."""
    return tokens_after_window(spec) + QUEUED_ALLOWANCE


def _check_fits(args: argparse.Namespace, model: str) -> None:
    """Refuse, before anything is spawned, requests that one solo instance cannot hold at
    their full length: the restore puts each member's share back on one."""
    from kunserve.worker.engine import EngineConfig
    from kunserve.worker.instance_memory import model_parameter_bytes, plan_instance_memory
    from kunserve.worker.model_config import ModelConfig

    config, model_config = EngineConfig(model=model, num_threads=args.threads), \
        ModelConfig.from_dir(model)
    solo = plan_instance_memory(config, model_config,
                                model_parameter_bytes(model_config, config.dtype),
                                model_config.num_layers).num_blocks

    def blocks(tokens: int) -> int:
        return -(-tokens // config.block_size)

    needed = (args.requests_per_instance * blocks(args.prompt_len + args.output_len)
              + args.queued_per_instance * blocks(args.prompt_len + QUEUED_TOKENS))
    if needed > solo:
        raise ValueError(
            f"{args.requests_per_instance} requests of {args.prompt_len} + {args.output_len} "
            f"tokens (and {args.queued_per_instance} queued) need {needed} KV blocks per "
            f"instance, and a solo instance of this model holds {solo}: the restore could not "
            "put them back; lower --requests-per-instance, --prompt-len or --output-len")


# -- the parent: spawn the members, merge what they saw ----------------------------------------
def measure(spec: DropBenchSpec) -> dict:
    from kunserve.worker.model_config import ModelConfig

    model = ModelConfig.from_dir(spec.model)
    gen = torch.Generator().manual_seed(spec.size)
    prompts = [{f"m{rank}-{i}": torch.randint(5, model.vocab_size, (spec.prompt_len,),
                                              generator=gen).tolist()
                for i in range(spec.requests_per_instance)} for rank in range(spec.size)]
    queued = [{f"q{rank}-{i}": torch.randint(5, model.vocab_size, (spec.prompt_len,),
                                             generator=gen).tolist()
               for i in range(spec.queued_per_instance)} for rank in range(spec.size)]
    store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT_S))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    processes = [ctx.Process(target=_member_main, daemon=True,
                             args=(spec, store.port, rank, prompts[rank], queued[rank],
                                   results))
                 for rank in range(spec.size)]
    return summarize(spec, model.num_layers,
                     run_members(processes, results, "the drop bench", "member"))


def run_members(processes, results, what: str, who: str) -> list[dict]:
    """Start the member processes, collect each one's ``(rank, report, error)`` from
    ``results`` and return the reports in rank order; raises with every member's error
    (``who`` names a member in it). No process outlives this."""
    for process in processes:
        process.start()
    try:
        got = _collect(results, processes, what)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    errors = [f"{who} {rank}:\n{error}" for rank, _, error in got if error]
    if errors:
        raise RuntimeError(f"{what} failed\n" + "\n".join(errors))
    return [report for _, report, _ in sorted(got)]


def _collect(results, processes, what: str) -> list[tuple[int, dict | None, str | None]]:
    got: list[tuple[int, dict | None, str | None]] = []
    deadline = time.monotonic() + MEMBER_DEADLINE_S
    while len(got) < len(processes):
        try:
            got.append(results.get(timeout=1.0))
            continue
        except queue.Empty:
            pass
        reported = {rank for rank, *_ in got}
        dead = [r for r, p in enumerate(processes) if r not in reported and not p.is_alive()]
        if dead or time.monotonic() > deadline:
            why = f"member(s) {dead} died" if dead else f"no report within {MEMBER_DEADLINE_S} s"
            raise RuntimeError(f"{what} failed: {why}")
    return got


def summarize(spec: DropBenchSpec, num_layers: int, members: list[dict]) -> dict:
    """The figures of one run from every member's report (in rank order)."""
    leader = members[0]
    phases = _phases(members)
    times = _token_times(members)
    counts = {rid: sum(len(v) for v in by_phase.values()) for rid, by_phase in times.items()}
    queued = {rid for m in members for rid in m["queued"]}
    block_size = leader["block_size"]
    exchange = _exchange(members)
    return {
        **asdict(spec), "exchange_mode": spec.exchange_mode, "num_layers": num_layers,
        "cpu_count": os.cpu_count(), "phases_s": phases, **exchange,
        "gap": _gaps(spec, members, times, exchange["all_in_s"]),
        "queued": _queued(members, times),
        "pull": leader["pull"],
        "decode": _decode(spec, members, times),
        "queued_left_in_window": leader.get("queued_left_in_window", 0),
        "kv_tokens": {"solo_per_instance": leader["solo_memory"]["blocks_total"] * block_size,
                      "group": leader["group_memory"]["blocks_total"] * block_size},
        "every_request_complete": len(counts) == spec.size * (spec.requests_per_instance
                                                              + spec.queued_per_instance)
        and all(n == (QUEUED_TOKENS if rid in queued else spec.output_len)
                for rid, n in counts.items()),
    }


def _phases(members: list[dict]) -> dict[str, list[float]]:
    """Seconds per row of the phase table, one per member (the leader's only for its step)."""
    phases = {}
    for name, key, _ in _ROWS:
        if key == "prepare_at":  # from the last member starting to each one's link
            last_start = max(m["prepare_at"][0] for m in members)
            phases[name] = [m["prepare_at"][1] - last_start for m in members]
        elif key == "first_step_s":
            phases[name] = [members[0]["first_step_s"]]
        elif key == "first_stage_ahead":  # 0: every member was there when the leader came
            phases[name] = [members[0]["phases"].get(key, 0.0)]
        else:
            phases[name] = [m["phases"][key] for m in members]
    return phases


def _exchange(members: list[dict]) -> dict:
    """The drop's KV exchange against the raw link's best round (by its slowest member).
    The raw rounds start at a barrier; the exchange's aggregate is timed the same way, from
    the last member starting to move to the last one done (``all_in_s``: a member that
    starts first waits for the others, which its own ``exchange_s`` shows)."""
    rounds = range(len(members[0]["raw"]["seconds"]))
    slowest = [max(m["raw"]["seconds"][i] for m in members) for i in rounds]
    best = min(rounds, key=lambda i: slowest[i])
    rows = []
    for m in members:
        sent, seconds, raw = m["kv_moved"]["bytes_sent"], m["phases"]["exchange"], m["raw"]
        rows.append({"rank": m["rank"], "bytes_sent": sent,
                     "bytes_received": m["kv_moved"]["bytes_received"],
                     "bytes_copied": m["kv_moved"]["bytes_copied"], "exchange_s": seconds,
                     "raw_bytes_sent": raw["bytes_sent"], "raw_s": raw["seconds"][best],
                     "gb_s": sent / seconds / 1e9,
                     "raw_gb_s": raw["bytes_sent"] / raw["seconds"][best] / 1e9,
                     "exchange_cpu_s": m["kv_moved"]["cpu_seconds"],
                     "raw_cpu_s": raw["cpu_seconds"][best]})
    moved = [m["kv_moved"] for m in members]
    all_in = max(m["ended_at"] for m in moved) - max(m["started_at"] for m in moved)
    agg = sum(r["bytes_sent"] for r in rows) / all_in / 1e9
    raw_agg = sum(r["raw_bytes_sent"] for r in rows) / slowest[best] / 1e9
    cpu = sum(r["raw_cpu_s"] for r in rows) / sum(r["exchange_cpu_s"] for r in rows)
    replays = [m["raw"]["replay"] for m in members]
    replay_rounds = [max(r["seconds"][i] for r in replays) for i in rounds]
    replay_sent = sum(r["bytes_sent"] for r in replays)
    return {"exchange": rows, "all_in_s": all_in, "exchange_gb_s": agg, "raw_gb_s": raw_agg,
            "exchange_vs_raw": agg / raw_agg, "raw_rounds_s": slowest, "raw_vs_exchange_cpu": cpu,
            "replay_rounds_s": replay_rounds, "replay_bytes_sent": replay_sent,
            "replay_vs_raw": replay_sent / min(replay_rounds) / 1e9 / raw_agg}


def _token_times(members: list[dict]) -> dict[str, dict[str, list[float]]]:
    """request -> phase (solo, group, restored) -> its tokens' stamps, from every process."""
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for m in members:
        for rid, events in m["tokens"].items():
            for t, phase in events:
                times[rid][phase].append(t)
    return times


def _gaps(spec: DropBenchSpec, members: list[dict], times: dict, exchange_s: float) -> dict:
    """Each request's gap from its last solo token (its member) to its first pipelined token
    (the leader), against 2 solo decode steps of its member + the exchange; and across the
    restore (last pipelined token to first solo one)."""
    owner = {rid: m["rank"] for m in members for rid in m["requests"]}
    solo_step = {m["rank"]: (m["solo_window"][1] - m["solo_window"][0]) / spec.steps
                 for m in members}
    gaps = [{"request": rid, "gap_s": min(by_phase["group"]) - max(by_phase["solo"]),
             "bound_s": 2 * solo_step[owner[rid]] + exchange_s,
             "restore_gap_s": min(by_phase["restored"]) - max(by_phase["group"])}
            for rid, by_phase in sorted(times.items()) if rid in owner]
    return {"worst": max(gaps, key=lambda g: g["gap_s"]),
            "within_bound": sum(g["gap_s"] < g["bound_s"] for g in gaps),
            "requests": len(gaps), "solo_step_s": solo_step, "exchange_s": exchange_s,
            "worst_restore_gap_s": max(g["restore_gap_s"] for g in gaps),
            # a member out of tokens to serve while it waited for the commit (raise
            # --output-len): its requests' gaps include this much idling of the bench's own
            "stalled_s": {m["rank"]: m["stalled_s"] for m in members}}


def _queued(members: list[dict], times: dict) -> dict:
    """The requests queued at the drop: their first token, from the moment the last member
    entered the drop, how many micro-batches the leader sent at the drop (its own moved
    requests) and how many steps it served while the KV moved."""
    start = max(m["drop_at"] for m in members)
    firsts = [min(times[rid]["group"]) - start for m in members for rid in m["queued"]]
    figures = {"count": len(firsts),
               "steps_during_exchange": members[0].get("steps_during_exchange", 0),
               "sent_at_drop": members[0].get("sent_at_drop", 0),
               "rows_ahead": members[0].get("rows_ahead", 0)}
    if firsts:
        figures.update(first_token_p50_s=statistics.median(firsts),
                       first_token_max_s=max(firsts))
    return figures


def _decode(spec: DropBenchSpec, members: list[dict], times: dict) -> dict:
    """Tokens/s and mean inter-token latency in the solo windows (every member's, side by
    side) and in the leader's pipelined window, for the same requests."""
    solo_tokens, solo_itl = 0, []
    for m in members:
        n, itl = _window([times[rid]["solo"] for rid in m["requests"]], *m["solo_window"])
        solo_tokens, solo_itl = solo_tokens + n, solo_itl + itl
    solo_s = (max(m["solo_window"][1] for m in members)
              - min(m["solo_window"][0] for m in members))
    window = members[0]["group_window"]
    pipe_tokens, pipe_itl = _window([times[rid]["group"] for m in members
                                     for rid in m["requests"]], *window)
    pipe_s = window[1] - window[0]
    decode = {"solo": {"tok_s": solo_tokens / solo_s, "itl_ms": 1e3 * statistics.mean(solo_itl),
                       "tokens": solo_tokens, "seconds": solo_s},
              "pipelined": {"tok_s": pipe_tokens / pipe_s,
                            "itl_ms": 1e3 * statistics.mean(pipe_itl), "tokens": pipe_tokens,
                            "seconds": pipe_s}}
    decode["tpot_ratio"] = decode["pipelined"]["itl_ms"] / decode["solo"]["itl_ms"]
    return decode


# (row, where the seconds are: a report key or a ``Membership.phases`` key, what it covers)
_ROWS = [("prepare", "prepare_at", "StageLink at the TCPStore (meet), before the requests"),
         ("handover", "handover", "export requests, agree on the layout, narrow the stage"),
         ("free", "free", "let the other layers go, install the new runner"),
         ("KV exchange", "exchange", "pack, re-read the cache (grow), send/recv"),
         ("drop total", "total", "handover + free + exchange + stage runner"),
         ("release params", "release", "the dropped layers' memory back to the kernel: "
                                       "after the first round, a low-priority thread"),
         ("first stage ahead (leader)", "first_stage_ahead", "its requests' first stage, "
                                                            "while it waited for the members"),
         ("first pipelined step (leader)", "first_step_s", "fill g micro-batches, collect one"),
         ("restore: pull layers", "restore_layers", "every member gets the whole model, "
                                                    "while the group serves"),
         ("restore: KV exchange", "restore_exchange", "each request's KV to its member"),
         ("restore total", "restore_total", "from the leader's drain to solo (not the pull)")]


def _window(per_request: list[list[float]], start: float, end: float) -> tuple[int, list[float]]:
    """Tokens produced in ``(start, end]`` and the gaps between consecutive tokens of one
    request inside ``[start, end]`` (``start`` is the last warm-up step's stamp)."""
    tokens, gaps = 0, []
    for stamps in per_request:
        inside = sorted(t for t in stamps if start <= t <= end)
        tokens += sum(t > start for t in inside)
        gaps += [b - a for a, b in itertools.pairwise(inside)]
    return tokens, gaps


# -- a member process --------------------------------------------------------------------------
def _member_main(spec: DropBenchSpec, port: int, rank: int, prompts: dict[str, list[int]],
                 queued: dict[str, list[int]], results) -> None:
    try:
        results.put((rank, _Member(spec, port, rank).run(prompts, queued), None))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, None, traceback.format_exc()))


class _Member:
    def __init__(self, spec: DropBenchSpec, port: int, rank: int) -> None:
        self.spec, self.port, self.rank = spec, port, rank
        self.store = dist.TCPStore(HOST, port, is_master=False, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=TIMEOUT_S))
        self.tokens: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self.report: dict = {"rank": rank}

    def take(self, phase: str, outputs) -> float:
        """Stamp every token of a step's outputs; returns the stamp."""
        now = time.time()
        for out in outputs:
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            self.tokens[out.request_id] += [(now, phase)] * len(out.new_token_ids)
        return now

    def barrier(self, name: str) -> None:
        self.store.add(name, 1)
        while self.store.add(name, 0) < self.spec.size:
            time.sleep(0.0005)

    def run(self, prompts: dict[str, list[int]], queued: dict[str, list[int]]) -> dict:
        from kunserve.worker.engine import EngineConfig, LLMEngine
        from kunserve.worker.pipeline import reconfigure
        from kunserve.worker.pipeline.group_member import activation_frame_bytes
        from kunserve.worker.pipeline.stage_link import meet
        from kunserve.worker.sampling_params import SamplingParams

        spec, report = self.spec, self.report
        engine = LLMEngine(EngineConfig(model=spec.model, num_threads=spec.threads))
        engine.generate([next(iter(prompts.values()))],  # warm-up: first prefill and decode
                        SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        self.barrier("loaded")
        start = time.time()
        frame = activation_frame_bytes(spec.model, engine.config.dtype)  # as a worker does
        link = meet(HOST, self.port, "bench-group", 1, self.rank, spec.size,
                    timeout_s=TIMEOUT_S, bind_host=HOST, frame_bytes=frame,
                    io_slice_us=spec.io_slice_us)
        layer_link = meet(HOST, self.port, "bench-group/layers", 1, self.rank, spec.size,
                          timeout_s=TIMEOUT_S, bind_host=HOST,  # for pulling layers back
                          io_slice_us=spec.io_slice_us)
        report["prepare_at"] = (start, time.time())
        report["solo_memory"] = engine.memory_report()
        report["requests"] = list(prompts)
        report["queued"] = list(queued)
        report["block_size"] = engine.config.block_size
        self.barrier("prepared")

        params = SamplingParams(max_tokens=spec.output_len, temperature=0.0, ignore_eos=True)
        for rid, prompt in prompts.items():
            engine.add_request(prompt, params, rid)
        while any(rid not in self.tokens for rid in prompts):  # prefill
            window_start = self.take("solo", engine.step())
        for _ in range(WARM_STEPS):
            window_start = self.take("solo", engine.step())
        for _ in range(spec.steps):
            window_end = self.take("solo", engine.step())
        report["solo_window"] = (window_start, window_end)
        self.serve_until_commit(engine, prompts)
        self.serve_until_leader(engine, link, prompts)

        tables = {rid: engine.block_manager.block_table(rid) for rid in engine.scheduler.requests}
        self.store.set(f"tables/{self.rank}", json.dumps(tables))
        for rid, prompt in queued.items():  # they arrived during the commit: no KV yet
            engine.add_request(prompt, SamplingParams(max_tokens=QUEUED_TOKENS, temperature=0.0,
                                                      ignore_eos=True), rid)
        report["drop_at"] = time.time()
        membership = reconfigure.drop(engine, link, "bench-group", layer_link,
                                      overlap=spec.overlap)
        # the leader's own moved requests went out at once (their first stage's KV stayed)
        report["sent_at_drop"] = engine.num_in_flight if link.is_leader else 0
        report["group_memory"] = engine.memory_report()
        with ThreadPoolExecutor(1) as helper:  # pulls the layers back while the group serves
            if link.is_leader:
                self.serve_during_exchange(engine, membership)
                self.lead(engine)
                stage = self.serve_while_pulling(engine, membership, helper)
                begin = reconfigure.plan_restore(engine, membership)
            else:
                pulled = helper.submit(reconfigure.pull_layers_when_ordered, engine, membership)
                begin = membership.stage_runner.run()
                if begin is None:
                    raise RuntimeError("the leader ended the epoch instead of restoring")
                stage = pulled.result(timeout=TIMEOUT_S)
        reconfigure.restore(engine, membership, begin, stage)
        report["kv_moved"] = asdict(membership.kv_moved)
        report["phases"] = dict(membership.phases)
        while engine.has_unfinished():
            self.take("restored", engine.step())
        report["raw"] = self.raw_link(engine)
        report["tokens"] = dict(self.tokens)
        return report

    def serve_until_commit(self, engine, prompts: dict[str, list[int]]) -> None:
        """Serve on until every member has finished its timed window (the planner's commit
        reaches every member between two of its steps); step no further when the requests
        would not have enough tokens left for the pipelined window and the restore."""
        self.store.add("window-done", 1)
        stalled_at = None
        while self.store.add("window-done", 0) < self.spec.size:
            if self._tokens_to_spare(prompts):
                self.take("solo", engine.step())
            else:
                stalled_at = stalled_at or time.time()
                time.sleep(0.0005)
        self.report["stalled_s"] = time.time() - stalled_at if stalled_at else 0.0

    def serve_until_leader(self, engine, link, prompts: dict[str, list[int]]) -> None:
        """A member, once committed, serves on solo until the leader has entered the drop,
        as a worker's engine thread does (``reconfigure.leader_entered``), while its
        requests have tokens to spare."""
        from kunserve.worker.pipeline import reconfigure

        while not reconfigure.leader_entered(link) and self._tokens_to_spare(prompts):
            self.take("solo", engine.step())

    def _tokens_to_spare(self, prompts: dict[str, list[int]]) -> bool:
        """Solo: whether each request has more tokens left than the later phases need."""
        return min(self.spec.output_len - len(self.tokens[r]) for r in prompts) > tokens_kept(
            self.spec)

    def serve_during_exchange(self, engine, membership) -> None:
        """The leader while the drop's KV moves (overlapped), as a worker's engine thread
        does: step while anything can run (nothing, while requests are held for their KV),
        then run the requests whose KV moved (``complete_drop``)."""
        from kunserve.worker.pipeline import reconfigure

        exchange, steps = membership.exchange, 0
        while exchange is not None and not exchange.done():
            waits = reconfigure.waits_for_kv(engine, membership)
            if engine.has_unfinished() and not waits:
                self.take("group", engine.step())
                steps += not engine.stalled
            if waits or engine.stalled or not engine.has_unfinished():
                exchange.wait(0.0005)
        self.report["steps_during_exchange"] = steps
        reconfigure.complete_drop(engine, membership)

    def lead(self, engine) -> None:
        """The leader after the drop: the first step, one round, the steps that finish the
        requests queued at the drop, then the timed window. The window holds the same work as
        the solo one, decodes of the moved requests: with the queued requests' prefills in it,
        pipelined/solo TPOT read 1.65x where it reads 1.15-1.23x with nothing queued (README).
        A window that cannot wait for them any longer (their tokens run out) says so."""
        start = time.perf_counter()
        window_start = self.take("group", engine.step())
        self.report["first_step_s"] = time.perf_counter() - start
        self.report["rows_ahead"] = engine.runner.rows_ahead_used  # by its first micro-batches
        for _ in range(self.spec.size - 1):
            window_start = self.take("group", engine.step())
        requests = engine.scheduler.requests
        moved = [r for r in requests.values() if r.num_output_tokens]  # queued: none yet
        keep = tokens_after_window(self.spec)
        while len(requests) > len(moved) and min(
                r.sampling_params.max_tokens - r.num_output_tokens for r in moved) > keep:
            window_start = self.take("group", engine.step())
        self.report["queued_left_in_window"] = len(requests) - len(moved)
        for _ in range(self.spec.steps * self.spec.size):
            window_end = self.take("group", engine.step())
        self.report["group_window"] = (window_start, window_end)

    def serve_while_pulling(self, engine, membership, helper: ThreadPoolExecutor):
        """Order the layer pull and serve until it is done, as a worker's restore does; step
        only while every request keeps 2 tokens for the drain and the restore (then wait).
        Drains the group; returns the whole model."""
        from kunserve.worker.pipeline import reconfigure

        steps, waited, start = 0, 0.0, time.perf_counter()  # before the pull can start
        reconfigure.order_layer_pull(membership)
        pulled = helper.submit(reconfigure.pull_layers, engine, membership)
        while not pulled.done():
            requests = engine.scheduler.requests.values()
            if min(r.sampling_params.max_tokens - r.num_output_tokens for r in requests) > 2:
                self.take("group", engine.step())
                steps += 1
            else:  # no token left to serve: wait for the pull
                before = time.perf_counter()
                pulled.exception(timeout=TIMEOUT_S)
                waited += time.perf_counter() - before
        stage = pulled.result()
        self.report["pull"] = {"seconds": time.perf_counter() - start, "steps": steps,
                               "waited_s": waited}
        self.take("group", engine.drain())
        return stage

    def raw_link(self, engine) -> dict:
        """Send this member's chunks of the drop's KV exchange again with plain
        torch.distributed on a gloo group over loopback, in ``move_kv``'s order
        (``exchange_order``) and way: every receive posted, then every send, then all waited;
        from and into preallocated buffers, nothing packed or scattered."""
        from kunserve.worker.checkpoint import TORCH_DTYPES
        from kunserve.worker.group_layout import drop_layout
        from kunserve.worker.pipeline.kv_transfer import exchange_order

        size, rank = self.spec.size, self.rank
        tables = [json.loads(self.store.get(f"tables/{r}")) for r in range(size)]
        layout = drop_layout(engine.model_config.num_layers, tables, [1 << 40] * size)
        pieces = layout.pieces
        outgoing, incoming = exchange_order(pieces, rank, size)
        model, config = engine.model_config, engine.config
        slot = (2, config.block_size, model.num_kv_heads, model.head_dim)
        dtype = TORCH_DTYPES[config.dtype]
        sends = [(p.dst, torch.zeros((len(p.src_blocks), *slot), dtype=dtype))
                 for p in outgoing if p.dst != rank for _ in range(p.num_layers)]
        recvs = [(p.src, torch.empty((len(p.dst_blocks), *slot), dtype=dtype))
                 for p in incoming for _ in range(p.num_layers)]
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the StageLink's address: 127.0.0.1
        dist.init_process_group("gloo", store=dist.PrefixStore("raw-link", self.store),
                                rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
        shorten_io_slices(self.spec.io_slice_us)  # as the StageLink's socket threads
        replay = _Replay(self, engine, layout)
        seconds, cpu_seconds = [], []
        try:
            for _ in range(RAW_ROUNDS):
                dist.barrier()
                start, cpu_start = time.perf_counter(), time.process_time()
                works = [dist.irecv(buffer, src) for src, buffer in recvs]
                works += [dist.isend(tensor, dst) for dst, tensor in sends]
                for work in works:
                    work.wait()
                seconds.append(time.perf_counter() - start)
                cpu_seconds.append(time.process_time() - cpu_start)
                dist.barrier()
                replay.round()
            dist.barrier()
        finally:
            dist.destroy_process_group()
            replay.close()
        return {"bytes_sent": sum(t.nbytes for _, t in sends), "seconds": seconds,
                "cpu_seconds": cpu_seconds, "replay": replay.report}


class _Replay:
    """The drop's KV exchange run again on a member that is solo once more (every request
    done, so what the blocks hold no longer matters): ``round`` moves the drop's pieces into
    the group geometry over a link of its own and re-reads the cache as solo again."""

    def __init__(self, member: _Member, engine, layout) -> None:
        from kunserve.worker.instance_memory import kv_geometry
        from kunserve.worker.layer_range import LayerRange
        from kunserve.worker.pipeline.stage_link import meet

        spec, rank = member.spec, member.rank
        model = engine.model_config
        self.cache, self.layout, self.rank = engine.kv_caches[0], layout, rank
        self.solo = (self.cache.geometry, self.cache.num_blocks, self.cache.layer_start)
        self.layers = LayerRange.for_stage(rank, spec.size, model.num_layers)
        self.geometry = kv_geometry(engine.config, model, self.layers.size)
        self.link = meet(HOST, member.port, "bench-replay", 1, rank, spec.size,
                         timeout_s=TIMEOUT_S, bind_host=HOST, io_slice_us=spec.io_slice_us)
        moved = sum(len(p.src_blocks) * p.num_layers for p in layout.pieces if p.src == rank)
        moved += sum(len(p.dst_blocks) * p.num_layers for p in layout.pieces
                     if p.dst == rank != p.src)
        block_layer = self.geometry.block_bytes // self.geometry.layers_held
        # touched, as the freed parameters a drop stages in
        self.staging = torch.ones(moved * block_layer // 4 + 1024)
        self.report = {"seconds": [], "cpu_seconds": [], "bytes_sent": 0}

    def round(self) -> None:
        from kunserve.worker.pipeline.kv_transfer import start_move

        blocks = self.cache.capacity_bytes // self.geometry.block_bytes  # (the layout's: any)
        move = start_move(self.cache, self.link, self.rank, self.layout.pieces, self.geometry,
                          blocks, self.layers.start, [self.staging])
        stats = move.finish()
        self.cache.reshape(*self.solo)
        self.report["seconds"].append(stats.seconds)
        self.report["cpu_seconds"].append(stats.cpu_seconds)
        self.report["bytes_sent"] = stats.bytes_sent

    def close(self) -> None:
        self.link.close()


# -- the table ---------------------------------------------------------------------------------
def _print_table(r: dict) -> None:
    g = r["size"]
    io_slice = f"{r['io_slice_us']} us" if r.get("io_slice_us") else "the kernel's default"
    print(f"\ndrop bench: {g} solo instances -> one {g}-stage group -> restore, KV exchange "
          f"{r['exchange_mode']}  ({r['num_layers']} layers; {r['requests_per_instance']} "
          f"streaming greedy requests per instance, prompt {r['prompt_len']}, output "
          f"{r['output_len']}, and {r['queued_per_instance']} queued at the drop, output "
          f"{QUEUED_TOKENS}; {r['threads']} torch thread(s) per process; socket threads' "
          f"slice {io_slice})")
    print(f"note: the {g} member processes share this machine's {r['cpu_count']} CPU cores, so "
          "pipelined decode is slower here than it would be on one GPU per stage")
    print(f"\n{'phase (slowest member)':<32} {'ms':>9}  per member (ms){'':<14} what")
    for name, _, what in _ROWS:
        values = r["phases_s"][name]
        each = " ".join(f"{1e3 * v:.1f}" for v in values)
        print(f"{name:<32} {1e3 * max(values):>9.1f}  {each:<29} {what}")

    rounds = " / ".join(f"{1e3 * s:.1f}" for s in r["raw_rounds_s"])
    print("\nKV exchange vs raw torch.distributed irecv/isend (same chunks, same peers, same order,"
          f" gloo over loopback; raw rounds, slowest member: {rounds} ms, the best counts; the "
          "first receives into untouched buffers)")
    print(f"{'rank':>6} {'sent MB':>8} {'recv MB':>8} {'exch ms':>8} {'exch GB/s':>10} "
          f"{'raw ms':>8} {'raw GB/s':>9} {'ratio':>6}  {'CPU ms: exch':>12} {'raw':>6}")
    for e in r["exchange"]:
        print(f"{e['rank']:>6} {e['bytes_sent'] / 1e6:>8.2f} {e['bytes_received'] / 1e6:>8.2f} "
              f"{1e3 * e['exchange_s']:>8.1f} {e['gb_s']:>10.2f} {1e3 * e['raw_s']:>8.1f} "
              f"{e['raw_gb_s']:>9.2f} {e['gb_s'] / e['raw_gb_s']:>6.0%}  "
              f"{1e3 * e['exchange_cpu_s']:>12.1f} {1e3 * e['raw_cpu_s']:>6.1f}")
    print(f"{'all':>6} {sum(e['bytes_sent'] for e in r['exchange']) / 1e6:>8.2f} {'':>8} "
          f"{1e3 * r['all_in_s']:>8.1f} {r['exchange_gb_s']:>10.2f}"
          f" {1e3 * max(e['raw_s'] for e in r['exchange']):>8.1f} {r['raw_gb_s']:>9.2f} "
          f"{r['exchange_vs_raw']:>6.0%}   target >= 50%: "
          f"{'met' if r['exchange_vs_raw'] >= 0.5 else 'NOT met'}")
    print("  'all' exch ms: from the last member starting to move to the last one done (the raw "
          "rounds start at a barrier); a member's own row also counts its wait for the others")
    replays = " / ".join(f"{1e3 * s:.1f}" for s in r["replay_rounds_s"])
    print(f"the same exchange again, each round right after a raw one (slowest member): "
          f"{replays} ms; best {1e3 * min(r['replay_rounds_s']):.1f} ms against the raw link's "
          f"{1e3 * min(r['raw_rounds_s']):.1f} = {r['replay_vs_raw']:.0%}   target >= 50%: "
          f"{'met' if r['replay_vs_raw'] >= 0.5 else 'NOT met'}")
    print(f"CPU time (every thread of each member, summed): raw / exchange = "
          f"{r['raw_vs_exchange_cpu']:.0%}; the exchange also packs and scatters every byte, "
          "and the members share the machine's cores")

    gap = r["gap"]
    worst = gap["worst"]
    step = 1e3 * max(gap["solo_step_s"].values())
    print(f"\nlongest inter-token gap across the drop: {1e3 * worst['gap_s']:.1f} ms "
          f"(request {worst['request']}); bound 2 x solo decode step + exchange = "
          f"{1e3 * worst['bound_s']:.1f} ms; within the bound: {gap['within_bound']} of "
          f"{gap['requests']} requests  (solo step, slowest member: {step:.1f} ms; exchange "
          f"{1e3 * gap['exchange_s']:.1f} ms)")
    stalled = {rank: s for rank, s in gap["stalled_s"].items() if s > 0}
    if stalled:
        print("  member(s) out of tokens while waiting for the commit, idle before the drop "
              "(in their requests' gaps; raise --output-len): "
              + ", ".join(f"rank {rank} {1e3 * s:.1f} ms" for rank, s in stalled.items()))
    q = r["queued"]
    if q["count"]:
        print(f"requests queued at the drop: first token {1e3 * q['first_token_p50_s']:.1f} ms "
              f"(median), {1e3 * q['first_token_max_s']:.1f} ms (last) after the last member "
              f"entered the drop; the leader sent {q['sent_at_drop']} micro-batch(es) of its "
              f"own moved requests at the drop and served {q['steps_during_exchange']} steps "
              "while the KV moved (none while moved requests wait for theirs); the first "
              f"micro-batches took {q['rows_ahead']} rows of the first stage it ran ahead")
    pull = r["pull"]
    print(f"longest inter-token gap across the restore: {1e3 * gap['worst_restore_gap_s']:.1f}"
          f" ms  (the layer pull overlapped {pull['steps']} pipelined steps in "
          f"{1e3 * pull['seconds']:.1f} ms; the leader waited {1e3 * pull['waited_s']:.1f} ms "
          "for it with no tokens left to serve)")

    d = r["decode"]
    print(f"\n{'decode, same requests':<34} {'tok/s':>8} {'mean ITL ms':>12} {'tokens':>7} "
          f"{'window s':>9}")
    for label, key in ((f"solo ({g} instances side by side)", "solo"),
                       (f"pipelined (one {g}-stage group)", "pipelined")):
        row = d[key]
        print(f"{label:<34} {row['tok_s']:>8.1f} {row['itl_ms']:>12.2f} {row['tokens']:>7} "
              f"{row['seconds']:>9.2f}")
    print(f"pipelined / solo TPOT: {d['tpot_ratio']:.2f}x  (paper, on GPUs: 1.16-1.23x)")
    if r["queued_left_in_window"]:
        print(f"  {r['queued_left_in_window']} request(s) queued at the drop were still in the "
              "pipelined window (their prefill counts in it; raise --output-len)")
    kv = r["kv_tokens"]
    print(f"KV capacity: {kv['solo_per_instance']} tokens per solo instance ({g} x = "
          f"{g * kv['solo_per_instance']}), {kv['group']} tokens in the group; every request "
          f"got all {r['output_len']} tokens: {'yes' if r['every_request_complete'] else 'NO'}")


# (label, figure of one run's result, format): what ``--repeat`` sums up
_REPEATED = [
    ("KV exchange, all members (ms)", lambda r: 1e3 * r["all_in_s"], "{:.1f}"),
    ("raw link, best round (ms)", lambda r: 1e3 * min(r["raw_rounds_s"]), "{:.1f}"),
    ("exchange vs raw (%)", lambda r: 100 * r["exchange_vs_raw"], "{:.0f}"),
    ("replayed exchange, best round (ms)", lambda r: 1e3 * min(r["replay_rounds_s"]), "{:.1f}"),
    ("replayed exchange vs raw (%)", lambda r: 100 * r["replay_vs_raw"], "{:.0f}"),
    ("drop total (ms)", lambda r: 1e3 * max(r["phases_s"]["drop total"]), "{:.1f}"),
    ("longest gap across the drop (ms)", lambda r: 1e3 * r["gap"]["worst"]["gap_s"], "{:.1f}"),
    ("its bound (ms)", lambda r: 1e3 * r["gap"]["worst"]["bound_s"], "{:.1f}"),
    ("requests within their bound (%)",
     lambda r: 100 * r["gap"]["within_bound"] / r["gap"]["requests"], "{:.0f}"),
    ("queued requests' first token, p50 (ms)",  # None: nothing was queued
     lambda r: 1e3 * r["queued"]["first_token_p50_s"] if r["queued"]["count"] else None,
     "{:.1f}"),
    ("pipelined / solo TPOT", lambda r: r["decode"]["tpot_ratio"], "{:.2f}"),
    ("restore total (ms)", lambda r: 1e3 * max(r["phases_s"]["restore total"]), "{:.1f}"),
]


def repeat_summary(runs: list[dict]) -> list[tuple[str, list[float], float, float, float]]:
    """Per figure of ``_REPEATED`` that every run measured: (label, each run's value, median,
    min, max)."""
    rows = []
    for label, figure, _ in _REPEATED:
        values = [figure(r) for r in runs]
        if None not in values:
            rows.append((label, values, *spread(values)))
    return rows


def _print_repeats(results: list[dict], repeat: int) -> None:
    """One table per configuration: each figure's median and range over its runs."""
    formats = {label: fmt for label, _, fmt in _REPEATED}
    for start in range(0, len(results), repeat):
        runs = results[start:start + repeat]
        r = runs[0]
        print(f"\n{r['size']} instances, KV exchange {r['exchange_mode']}: {repeat} runs "
              "(fresh processes each; the tables above show the last)")
        print(f"{'figure':<38} {'median':>8} {'min':>8} {'max':>8}  each run")
        for label, values, median, low, high in repeat_summary(runs):
            fmt = formats[label]
            each = " ".join(fmt.format(v) for v in values)
            print(f"{label:<38} {fmt.format(median):>8} {fmt.format(low):>8} "
                  f"{fmt.format(high):>8}  {each}")


def _print_modes(results: list[dict]) -> None:
    """The two ways of running the drop's KV exchange, side by side per group size."""
    print("\nKV exchange overlapped with serving vs before it (ms; queued: requests queued at "
          "the drop, first token after the last member entered it)")
    print(f"{'instances':>9} {'exchange':<15} {'exchange':>9} {'drop total':>11} "
          f"{'queued p50':>11} {'queued last':>12} {'longest gap':>12} {'vs raw':>7}")
    for r in results:
        q = r["queued"]
        p50, last = ((f"{1e3 * q['first_token_p50_s']:.1f}", f"{1e3 * q['first_token_max_s']:.1f}")
                     if q["count"] else ("-", "-"))
        print(f"{r['size']:>9} {r['exchange_mode']:<15} {1e3 * r['all_in_s']:>9.1f} "
              f"{1e3 * max(r['phases_s']['drop total']):>11.1f} {p50:>11} {last:>12} "
              f"{1e3 * r['gap']['worst']['gap_s']:>12.1f} {r['exchange_vs_raw']:>7.0%}")
