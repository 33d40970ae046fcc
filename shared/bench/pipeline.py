"""``kunserve bench pipeline``: how much of a pipeline group's time each stage sits idle.

One queued burst (``--requests`` prompts of ``--prompt-len`` random tokens, ``--output-len``
forced greedy output tokens, all added before the first step) runs on a group of ``--stages``
processes on this machine (this process is the leader; one torch thread per process), once
with one micro-batch in flight and once with one per stage. For each run it prints wall time,
output tokens/s and every stage's bubble fraction, ``1 - compute seconds / wall seconds``,
where compute is the time a rank spends in its layers (and, on the last rank, logits and
sampling); scheduling, (de)serialising and waiting for peers count as idle. "compute s" sums
the ranks' compute seconds: when it grows with micro-batches in flight, the stages slow each
other down (shared cores, caches or memory bandwidth). A solo engine (the whole model in this
process, one thread) runs the same burst as the baseline, and the greedy tokens of all three
runs are compared.
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="pipeline bubble with 1 vs one-per-stage micro-batches "
                                        "in flight")
    p.add_argument("--model", default=None, help="checkpoint dir (default: a tiny 8-layer, "
                                                 "hidden-512 Llama built on the fly)")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kunserve.bench.engine import _build_default_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or _build_default_model(Path(tmp) / "bench-model")
        result = measure(model_dir, args.stages, args.requests, args.prompt_len,
                         args.output_len, args.max_num_batched_tokens)
    _print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def measure(model_dir: str, stages: int, requests: int, prompt_len: int, output_len: int,
            max_num_batched_tokens: int) -> dict:
    from kunserve.worker.engine import EngineConfig, LLMEngine
    from kunserve.worker.pipeline.stage_pool import StagePool
    from kunserve.worker.sampling_params import SamplingParams

    config = EngineConfig(model=model_dir, num_threads=1, max_num_seqs=requests,
                          max_num_batched_tokens=max_num_batched_tokens)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    vocab = LLMEngine(config).model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (requests, prompt_len), generator=gen).tolist()
    solo_s, expected = _timed(LLMEngine(config), prompts, params)
    rows = [PipelineBenchRow("solo engine", solo_s, requests * output_len / solo_s, [], solo_s,
                             True)]
    pool = StagePool(stages - 1)
    try:
        with pool.group(stages, config) as engine:  # warm-up: first loads, first decode
            engine.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0.0))
        for depth in (1, stages):
            with pool.group(stages, config, max_in_flight=depth) as engine:
                wall, tokens = _timed(engine, prompts, params)
            bubble = [1.0 - busy / wall for busy in engine.busy_seconds]
            rows.append(PipelineBenchRow(f"{stages} stages, {depth} in flight", wall,
                                         requests * output_len / wall, bubble,
                                         sum(engine.busy_seconds), tokens == expected))
            print(f"  {rows[-1].setup}: {wall:.2f}s", flush=True)
    finally:
        pool.close()
    return {"model": model_dir, "stages": stages, "requests": requests,
            "prompt_len": prompt_len, "output_len": output_len,
            "max_num_batched_tokens": max_num_batched_tokens,
            "rows": [asdict(r) for r in rows]}


def _timed(engine, prompts: list[list[int]], params) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    return time.perf_counter() - start, [r.token_ids for r in results]


def _print_table(result: dict) -> None:
    print(f"\npipeline bubble  ({result['requests']} requests queued at once, prompt "
          f"{result['prompt_len']}, output {result['output_len']} tokens, greedy, token budget "
          f"{result['max_num_batched_tokens']}, 1 thread per process)")
    stages = result["stages"]
    ranks = "  ".join(f"rank {r:>2}" for r in range(stages))
    print(f"{'setup':<24} {'wall s':>7} {'out tok/s':>10} {'compute s':>10}  bubble: {ranks}"
          "  same tokens")
    for row in result["rows"]:
        bubble = "  ".join(f"{b:>7.0%}" for b in row["bubble"]) or " " * (9 * stages - 2)
        print(f"{row['setup']:<24} {row['wall_s']:>7.2f} {row['output_tok_s']:>10.1f} "
              f"{row['compute_s']:>10.2f}          {bubble}  "
              f"{'yes' if row['tokens_match'] else 'NO'}")
