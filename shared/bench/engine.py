"""``kunserve bench engine``: our engine against ``transformers`` ``generate``, side by side.

Same process, same checkpoint, same threads, same greedy workload (``--prompt-len`` random
prompt tokens, ``--output-len`` forced output tokens per request). The reference runs every
concurrency level as one padded static batch, which is how ``generate`` batches. Prints output
tokens/s per concurrency, per-token decode latency at concurrency 1, and whether the greedy
tokens agree.
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
class EngineBenchRow:
    concurrency: int
    ours_tok_s: float
    reference_tok_s: float
    speedup: float
    tokens_match: bool


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="engine vs transformers generate (output tokens/s)")
    p.add_argument("--model", default=None, help="checkpoint dir (default: a tiny 8-layer, "
                                                 "hidden-512 Llama built on the fly)")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per point; the fastest counts (shared machines are noisy)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or _build_default_model(Path(tmp) / "bench-model")
        result = measure(model_dir, levels, args.prompt_len, args.output_len, args.repeats)
    _print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _build_default_model(path: Path) -> str:
    from kunserve.tiny_model import make_tiny_model

    print("building the default bench model (8 layers, hidden 512) ...", flush=True)
    make_tiny_model(path, layers=8, hidden_size=512, heads=8, kv_heads=4,
                    intermediate_size=1408, vocab_size=1024, seed=0)
    return str(path)


def measure(model_dir: str, levels: list[int], prompt_len: int, output_len: int,
            repeats: int = 1) -> dict:
    from transformers import AutoModelForCausalLM

    from kunserve.worker.engine import EngineConfig, LLMEngine
    from kunserve.worker.sampling_params import SamplingParams

    max_c = max(levels)
    kv_tokens = max_c * (prompt_len + output_len)
    engine = LLMEngine(EngineConfig(model=model_dir, max_num_seqs=max(max_c, 1),
                                    memory_per_instance=4 * 1024**3, max_num_batched_tokens=2048))
    if engine.block_manager.num_blocks * engine.block_manager.block_size < kv_tokens:
        raise ValueError("the bench budget does not hold the whole workload's KV cache")
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None  # run to max_new_tokens, like ignore_eos
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = []
    _warm_up(engine, reference, params, vocab)
    for c in levels:
        prompts = torch.randint(0, vocab, (c, prompt_len), generator=gen)
        ours_s, ours_tokens = _best_of(repeats, _time_ours, engine, prompts, params)
        ref_s, ref_tokens = _best_of(repeats, _time_reference, reference, prompts, output_len)
        rows.append(EngineBenchRow(c, c * output_len / ours_s, c * output_len / ref_s,
                                   ref_s / ours_s, ours_tokens == ref_tokens))
        print(f"  concurrency {c}: ours {ours_s:.2f}s, transformers {ref_s:.2f}s", flush=True)
    latency = _decode_latency(engine, reference, params, vocab, prompt_len, output_len, repeats)
    return {"model": model_dir, "prompt_len": prompt_len, "output_len": output_len,
            "threads": torch.get_num_threads(), "rows": [asdict(r) for r in rows],
            "decode_latency_ms": latency}


def _best_of(repeats: int, timed, *args) -> tuple[float, list]:
    runs = [timed(*args) for _ in range(max(1, repeats))]
    return min(runs, key=lambda run: run[0])


def _warm_up(engine, reference, params, vocab: int) -> None:
    prompts = torch.randint(0, vocab, (2, 8))
    _time_ours(engine, prompts, params.__class__(max_tokens=4, temperature=0.0, ignore_eos=True))
    _time_reference(reference, prompts, 4)


def _time_ours(engine, prompts: torch.Tensor, params) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    results = engine.generate(prompts.tolist(), params)
    return time.perf_counter() - start, [r.token_ids for r in results]


@torch.inference_mode()
def _time_reference(model, prompts: torch.Tensor, output_len: int) -> tuple[float, list]:
    start = time.perf_counter()
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts),
                         max_new_tokens=output_len, do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - start
    return elapsed, out[:, prompts.shape[1]:].tolist()


def _decode_latency(engine, reference, params, vocab: int, prompt_len: int,
                    output_len: int, repeats: int) -> dict[str, float]:
    """Per-token decode latency at concurrency 1: (time for N tokens - time for 1) / (N - 1)."""
    prompt = torch.randint(0, vocab, (1, prompt_len))
    one = params.__class__(max_tokens=1, temperature=0.0, ignore_eos=True)
    ours = (_best_of(repeats, _time_ours, engine, prompt, params)[0]
            - _best_of(repeats, _time_ours, engine, prompt, one)[0])
    ref = (_best_of(repeats, _time_reference, reference, prompt, output_len)[0]
           - _best_of(repeats, _time_reference, reference, prompt, 1)[0])
    return {"ours": 1e3 * ours / (output_len - 1), "reference": 1e3 * ref / (output_len - 1)}


def _print_table(result: dict) -> None:
    print(f"\nengine vs transformers.generate  (prompt {result['prompt_len']}, output "
          f"{result['output_len']} tokens, greedy, {result['threads']} threads)")
    print(f"{'concurrency':>11} {'ours tok/s':>11} {'hf tok/s':>10} {'speedup':>8} {'same tokens':>12}")
    for r in result["rows"]:
        print(f"{r['concurrency']:>11} {r['ours_tok_s']:>11.1f} {r['reference_tok_s']:>10.1f} "
              f"{r['speedup']:>7.2f}x {str(r['tokens_match']):>12}")
    lat = result["decode_latency_ms"]
    print(f"decode latency at concurrency 1: ours {lat['ours']:.2f} ms/token, "
          f"transformers {lat['reference']:.2f} ms/token")
