"""``kunserve bench migrate``: the llumnix policy's live migration against stop-and-copy.

Two spawned processes, each a solo ``LLMEngine`` (``--threads`` torch threads): the source
serves ``--requests`` streaming greedy requests of ``--prompt-len`` tokens, the destination
``--own`` of its own. In each round both form a fresh 2-member ``StageLink`` (as a worker does
on the planner's prepare) and the source moves every request to the destination the way a
worker's engine thread does (``migration.py``: link waits on a helper thread, the engine
touched between two steps, both serving throughout), once as stop-and-copy (``live=False``:
everything copied while the requests are stopped) and once live (their full blocks copied
while they decode, the rest in the stop). The modes alternate over ``--rounds`` rounds, each
on new engines and requests, so a noisy machine hits both alike.

Per round: the blocks copied while decoding and during the stop, the source's stop (from
stopping the requests to the destination's answer) and the longest gap between two tokens of
a moved request (the last one from the source, the first from the destination; every token
stamped by the process that made it, one clock for both).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kunserve.bench.drop import HOST, TIMEOUT_S, run_members

MODES = ("stop-and-copy", "live")
WARM_STEPS = 4  # decode steps before a migration starts
AFTER_STEPS = 4  # decode steps after it ends (the moved requests' next tokens)


@dataclass(frozen=True)
class MigrateBenchSpec:
    model: str
    requests: int
    own: int
    prompt_len: int
    rounds: int
    threads: int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("migrate", help="the llumnix policy's live migration against "
                                       "stop-and-copy: blocks in the stop, stop time, token gap")
    p.add_argument("--model", default=None, help="checkpoint dir (default: a tiny 8-layer, "
                                                 "hidden-512 Llama built on the fly)")
    p.add_argument("--requests", type=int, default=8, help="requests moved per round")
    p.add_argument("--own", type=int, default=4, help="the destination's own requests")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=6, help="rounds, the modes alternating")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kunserve.bench.engine import _build_default_model

    if min(args.requests, args.own + 1, args.rounds, args.prompt_len) < 1:
        raise ValueError("--requests, --rounds and --prompt-len must be >= 1, --own >= 0")
    with tempfile.TemporaryDirectory(prefix="kunserve-bench-migrate-") as tmp:
        model = args.model or _build_default_model(Path(tmp) / "bench-model")
        result = measure(MigrateBenchSpec(model, args.requests, args.own, args.prompt_len,
                                          args.rounds, args.threads))
    _print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def measure(spec: MigrateBenchSpec) -> dict:
    store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT_S))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    processes = [ctx.Process(target=_member_main, daemon=True,
                             args=(spec, store.port, rank, results)) for rank in (0, 1)]
    source, destination = run_members(processes, results, "the migrate bench", "rank")
    return summarize(spec, source, destination)


def summarize(spec: MigrateBenchSpec, source: dict, destination: dict) -> dict:
    rounds = []
    for src, dst in zip(source["rounds"], destination["rounds"], strict=True):
        gaps = [dst["first_token"][rid] - src["last_token"][rid]
                for rid in src["moved"]]
        rounds.append({"mode": src["mode"], "moved": len(src["moved"]),
                       "copied_blocks": src["stats"]["copied_blocks"],
                       "stop_blocks": src["stats"]["stop_blocks"],
                       "held_blocks": src["stats"]["held_blocks"],
                       "stop_mb": src["stats"]["stop_blocks"] * source["block_bytes"] / 1e6,
                       "stop_s": src["stats"]["stop_s"], "copy_s": src["stats"]["copy_s"],
                       "steps_during_copy": src["steps_during_copy"],
                       "copy_rounds": src["copy_rounds"],
                       "max_gap_s": max(gaps) if gaps else 0.0,
                       "decode_step_s": statistics.median(src["step_s"]),
                       # the destination's longest pause between two steps while the
                       # migration ran: what it cost its own requests
                       "dest_pause_s": max(dst["during_s"], default=0.0)})
    return {"spec": asdict(spec), "block_bytes": source["block_bytes"],
            "block_size": source["block_size"], "rounds": rounds}


def _member_main(spec: MigrateBenchSpec, port: int, rank: int, results) -> None:
    try:
        results.put((rank, _member(spec, port, rank), None))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, None, traceback.format_exc()))


def _member(spec: MigrateBenchSpec, port: int, rank: int) -> dict:
    from kunserve.worker.engine import EngineConfig, LLMEngine
    from kunserve.worker.model_config import ModelConfig
    from kunserve.worker.sampling_params import SamplingParams

    model = ModelConfig.from_dir(spec.model)
    gen = torch.Generator().manual_seed(rank)
    count = spec.requests if rank == 0 else spec.own
    config = EngineConfig(model=spec.model, num_threads=spec.threads)
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    report: dict = {"rounds": []}
    for round_ in range(spec.rounds):
        engine = LLMEngine(config)
        report["block_bytes"] = engine.memory.block_bytes
        report["block_size"] = engine.config.block_size
        for i in range(count):
            engine.add_request(torch.randint(5, model.vocab_size, (spec.prompt_len,),
                                             generator=gen).tolist(), params,
                               f"{rank}-{round_}-{i}")
        member = _Stepper(engine)
        while len(member.last) < count:  # prefill
            member.step()
        for _ in range(WARM_STEPS):
            member.step()
        report["rounds"].append(member.migrate(port, rank, round_, MODES[round_ % 2]))
    return report


class _Stepper:
    """One round's engine, every step timed and every token stamped."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.step_s: list[float] = []
        self.ends: list[float] = []  # each step's end
        self.last: dict[str, float] = {}  # request id -> its latest token's stamp
        self.first: dict[str, float] = {}  # request id -> its first token's stamp, from now

    def step(self) -> None:
        start = time.perf_counter()
        outputs = self.engine.step()
        now = time.perf_counter()
        self.step_s.append(now - start)
        self.ends.append(now)
        for out in outputs:
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            self.last[out.request_id] = now
            self.first.setdefault(out.request_id, now)

    def migrate(self, port: int, rank: int, round_: int, mode: str) -> dict:
        """Move every request from rank 0 to rank 1 as a worker's engine thread does."""
        from kunserve.worker.pipeline.migration import MigrationDestination, MigrationSource
        from kunserve.worker.pipeline.stage_link import meet

        engine = self.engine
        link = meet(HOST, port, f"migrate-{round_}", 1, rank, 2, timeout_s=TIMEOUT_S,
                    bind_host=HOST)
        migration = (MigrationSource(engine, link, 1 << 30, live=mode == "live")
                     if rank == 0 else MigrationDestination(engine, link))
        steps_before, steps_during_copy, sent_last = len(self.step_s), 0, {}
        started = time.perf_counter()
        with ThreadPoolExecutor(1) as helper:  # link waits off the engine's thread
            waiting = helper.submit(migration.wait)
            while not migration.done:
                if waiting.done():
                    waiting.result()
                    if rank == 0 and not migration.moved:  # a copy's answer: maybe the stop
                        steps_during_copy = len(self.step_s) - steps_before
                        sent_last = dict(self.last)
                    migration.advance(engine)
                    if migration.done:
                        self.first = {}  # from here on: the moved requests' first tokens
                    else:
                        waiting = helper.submit(migration.wait)
                elif engine.has_unfinished():
                    self.step()
                else:
                    time.sleep(0.0002)
        last = len(self.ends)
        for _ in range(AFTER_STEPS):
            self.step()
        # the pauses between two steps while it ran, from its start (forming the link is the
        # prepare phase, off the engine's thread in a worker) to the first step after it:
        # what the destination's own requests waited between two tokens
        ends = [started, *self.ends[steps_before:last + 1]]
        during = [b - a for a, b in zip(ends, ends[1:], strict=False)]
        link.close()
        if rank == 1:
            return {"mode": mode, "step_s": self.step_s, "during_s": during,
                    "first_token": {rid: self.first[rid] for rid in migration.moved}}
        return {"mode": mode, "step_s": self.step_s, "during_s": during,
                "moved": list(migration.moved),
                "stats": asdict(migration.stats), "steps_during_copy": steps_during_copy,
                "copy_rounds": migration.copy_rounds,
                "last_token": {rid: sent_last[rid] for rid in migration.moved}}


def _print_table(r: dict) -> None:
    spec = r["spec"]
    print(f"\nmigrate bench: {spec['requests']} streaming greedy requests of prompt "
          f"{spec['prompt_len']} move from one solo instance to another serving "
          f"{spec['own']} of its own; {spec['threads']} torch thread(s) per process; "
          f"a block holds {r['block_size']} tokens, {r['block_bytes'] / 1e3:.0f} kB")
    print(f"{'round':>5} {'mode':>14} {'moved':>5} {'blocks: ahead':>13} {'in stop':>7} "
          f"{'stop MB':>7} {'stop ms':>7} {'max gap ms':>10} {'copies':>6} {'steps in copy':>13} "
          f"{'step ms':>7} {'dest pause':>10}")
    for i, x in enumerate(r["rounds"]):
        print(f"{i:>5} {x['mode']:>14} {x['moved']:>5} {x['copied_blocks']:>13} "
              f"{x['stop_blocks']:>7} {x['stop_mb']:>7.2f} {1e3 * x['stop_s']:>7.1f} "
              f"{1e3 * x['max_gap_s']:>10.1f} {x['copy_rounds']:>6} {x['steps_during_copy']:>13} "
              f"{1e3 * x['decode_step_s']:>7.1f} {1e3 * x['dest_pause_s']:>10.1f}")
    for mode in MODES:
        rows = [x for x in r["rounds"] if x["mode"] == mode and x["moved"]]
        if not rows:
            print(f"{mode:>20}: nothing moved (the destination refused: it had no room)")
        else:
            print(f"{mode:>20}: median stop {1e3 * statistics.median(x['stop_s'] for x in rows):.1f}"
                  f" ms, median max gap {1e3 * statistics.median(x['max_gap_s'] for x in rows):.1f}"
                  f" ms, blocks in the stop {statistics.median(x['stop_blocks'] for x in rows):g}")
    print("stop: the source, from stopping the requests to the destination's answer (the "
          "destination takes them between two of its steps); max gap: the longest wait of a "
          "moved request between its last token at the source and its first at the "
          "destination; step ms: the source's median step; dest pause: the destination's "
          "longest time between two steps while the migration ran, a token gap of its own "
          "requests (the copies run on helper threads beside the steps, on the same cores; "
          "the stop's rest is written between two steps)")
