"""``kunserve bench pipeline``: how much of a pipeline group's time each stage sits idle.

One queued burst (``--requests`` prompts of ``--prompt-len`` random tokens, or a length drawn
uniformly from ``LO-HI`` per prompt, ``--output-len`` forced greedy output tokens, all added
before the first step) runs on a group of ``--stages`` processes on this machine (this process
is the leader; one torch thread per process): once with one micro-batch in flight, then with
one per stage, micro-batches formed without lookahead (even shares of sequences,
``--lookahead off``), by lookahead (equal estimated cost, ``on``) or both, one after the other
on the same burst. Lookahead uses ``--cost-model``, else the one saved next to the model
(``kunserve profile``), else one fitted here first the same way.

For each run it prints wall time, output tokens/s and every stage's bubble fraction,
``1 - compute seconds / wall seconds``, where compute is the time a rank spends in its layers
(and, on the last rank, logits and sampling); scheduling, (de)serialising and waiting for
peers count as idle. "modelled" is the bubble the same micro-batches leave in an ideal
pipeline at the cost model's times (no overheads, no cores shared): what the batching itself
costs. "compute s" sums the ranks' compute seconds: when it grows with micro-batches in
flight, the stages slow each other down (shared cores, caches or memory bandwidth). A solo
engine (the whole model in this process, one thread) runs the same burst as the baseline, and
the greedy tokens of every run are compared with its.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class PipelineBenchRow:
    setup: str
    wall_s: float
    output_tok_s: float
    bubble: list[float]  # per rank; empty for the solo engine
    compute_s: float  # all ranks' compute seconds (the solo engine: its wall time)
    tokens_match: bool
    micro_batches: int = 0
    # the bubble of an ideal pipeline (no overheads, no shared cores) running the same
    # micro-batches at the cost model's times: what the batching alone leaves idle
    modelled_bubble: float | None = None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="pipeline bubble with 1 vs one-per-stage micro-batches "
                                        "in flight")
    p.add_argument("--model", default=None, help="checkpoint dir (default: a tiny 8-layer, "
                                                 "hidden-512 Llama built on the fly)")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=_length_range, default=(64, 64),
                   help="prompt tokens: N, or LO-HI drawn uniformly per prompt")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--lookahead", choices=["on", "off", "both"], default="both",
                   help="micro-batches by lookahead with one in flight per stage")
    p.add_argument("--cost-model", default=None,
                   help="its JSON (default: the model's, else fitted here first)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.set_defaults(func=run)


def _length_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return bounds


def run(args: argparse.Namespace) -> int:
    from kunserve.bench.engine import _build_default_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or _build_default_model(Path(tmp) / "bench-model")
        modes = {"on": [True], "off": [False], "both": [False, True]}[args.lookahead]
        cost_model = args.cost_model
        if True in modes and cost_model is None:
            cost_model = _cost_model(model_dir, args.max_num_batched_tokens, Path(tmp))
        result = measure(model_dir, args.stages, args.requests, args.prompt_len,
                         args.output_len, args.max_num_batched_tokens, modes, cost_model)
    _print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _cost_model(model_dir: str, max_num_batched_tokens: int, tmp: Path) -> str:
    """The cost model saved next to the model, else one fitted now (one thread, as the
    stages run) into ``tmp``."""
    from kunserve.profile import print_report, profile
    from kunserve.worker.cost_model import FILE_NAME
    from kunserve.worker.engine import EngineConfig, LLMEngine

    saved = Path(model_dir) / FILE_NAME
    if saved.is_file():
        return str(saved)
    print("no cost model next to the model: fitting one (kunserve profile) ...", flush=True)
    engine = LLMEngine(EngineConfig(model=model_dir, num_threads=1, lookahead=False,
                                    max_num_batched_tokens=max_num_batched_tokens))
    model, report = profile(engine, num_mixed=40, repeats=3)
    print_report(model, report)
    return str(model.save(tmp / FILE_NAME))


def measure(model_dir: str, stages: int, requests: int, prompt_len: tuple[int, int],
            output_len: int, max_num_batched_tokens: int,
            lookahead: list[bool] | tuple[bool, ...] = (False,),
            cost_model: str | None = None) -> dict:
    from dataclasses import replace

    from kunserve.worker.cost_model import CostModel
    from kunserve.worker.engine import EngineConfig, LLMEngine
    from kunserve.worker.pipeline.stage_pool import StagePool
    from kunserve.worker.sampling_params import SamplingParams

    model = CostModel.load(cost_model) if cost_model else CostModel.find(model_dir)
    config = EngineConfig(model=model_dir, num_threads=1, max_num_seqs=requests,
                          max_num_batched_tokens=max_num_batched_tokens, lookahead=False)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    vocab = LLMEngine(config).model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(prompt_len[0], prompt_len[1] + 1, (requests,), generator=gen)
    prompts = [torch.randint(0, vocab, (int(n),), generator=gen).tolist() for n in lengths]
    solo_s, expected = _timed(LLMEngine(config), prompts, params)
    rows = [PipelineBenchRow("solo engine", solo_s, requests * output_len / solo_s, [], solo_s,
                             True)]
    pool = StagePool(stages - 1)
    try:
        with pool.group(stages, config) as engine:  # warm-up: first loads, first decode
            engine.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0.0))
        runs = [(1, False)] + [(stages, on) for on in lookahead]
        for depth, on in runs:
            run_config = replace(config, lookahead=True, cost_model=cost_model) if on else config
            with pool.group(stages, run_config, max_in_flight=depth) as engine:
                batches = _record_micro_batches(engine)
                wall, tokens = _timed(engine, prompts, params)
            bubble = [1.0 - busy / wall for busy in engine.busy_seconds]
            setup = f"{stages} stages, {depth} in flight" + (", lookahead" if on else "")
            modelled = None if model is None else ideal_bubble(
                [model.predict(b) for b in batches], stages, depth)
            rows.append(PipelineBenchRow(setup, wall, requests * output_len / wall, bubble,
                                         sum(engine.busy_seconds), tokens == expected,
                                         len(batches), modelled))
            print(f"  {rows[-1].setup}: {wall:.2f}s", flush=True)
    finally:
        pool.close()
    return {"model": model_dir, "stages": stages, "requests": requests,
            "prompt_len": list(prompt_len), "output_len": output_len,
            "max_num_batched_tokens": max_num_batched_tokens, "cost_model": cost_model,
            "rows": [asdict(r) for r in rows]}


def _record_micro_batches(engine) -> list[list[tuple[int, int]]]:
    """(prefix, new tokens) of every chunk of every micro-batch the leader sends."""
    batches: list[list[tuple[int, int]]] = []
    runner = engine.leader_runner
    submit = runner.submit

    def recorded(out) -> None:
        batches.append([(c.start_position, c.num_tokens) for c in out.chunks])
        submit(out)

    runner.submit = recorded
    return batches


def ideal_bubble(costs: list[float], stages: int, depth: int) -> float:
    """Idle fraction of every stage of an ideal pipeline (each stage takes ``cost / stages``
    of a micro-batch, nothing else takes time) that runs micro-batches of these costs in
    order with at most ``depth`` in flight: micro-batch ``k`` enters stage 0 once ``k - 1``
    left it and ``k - depth`` left the last stage."""
    if not costs:
        return 0.0
    finish = [[0.0] * len(costs) for _ in range(stages)]
    for k, cost in enumerate(costs):
        for s in range(stages):
            if s:
                ready = finish[s - 1][k]
            else:
                ready = finish[-1][k - depth] if k >= depth else 0.0
            finish[s][k] = max(ready, finish[s][k - 1] if k else 0.0) + cost / stages
    return 1.0 - sum(costs) / stages / finish[-1][-1]


def _timed(engine, prompts: list[list[int]], params) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    return time.perf_counter() - start, [r.token_ids for r in results]


def _print_table(result: dict) -> None:
    low, high = result["prompt_len"]
    print(f"\npipeline bubble  ({result['requests']} requests queued at once, prompt "
          f"{low if low == high else f'{low}-{high}'}, output {result['output_len']} tokens, "
          f"greedy, token budget {result['max_num_batched_tokens']}, 1 thread per process)")
    stages = result["stages"]
    ranks = "  ".join(f"rank {r:>2}" for r in range(stages))
    print(f"{'setup':<35} {'wall s':>7} {'out tok/s':>10} {'compute s':>10}  bubble: {ranks}"
          "  modelled  micro-batches  same tokens")
    for row in result["rows"]:
        bubble = "  ".join(f"{b:>7.0%}" for b in row["bubble"]) or " " * (9 * stages - 2)
        modelled = "" if row["modelled_bubble"] is None else f"{row['modelled_bubble']:.1%}"
        print(f"{row['setup']:<35} {row['wall_s']:>7.2f} {row['output_tok_s']:>10.1f} "
              f"{row['compute_s']:>10.2f}          {bubble}  {modelled:>8}  "
              f"{row['micro_batches'] or '':>13}  {'yes' if row['tokens_match'] else 'NO'}")
