"""The ``kunserve`` command line: one subcommand per job, settings by flags.

Each subcommand's work lives in its own module; this file only parses and dispatches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kunserve.policies import POLICIES
from kunserve.sizes import parse_size


def _add_make_tiny_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-model", help="write a random-weight Hugging Face checkpoint")
    p.add_argument("dir")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=352)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--tie-word-embeddings", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_run_make_tiny_model)


def _run_make_tiny_model(args: argparse.Namespace) -> int:
    from kunserve.tiny_model import make_tiny_model

    path = make_tiny_model(
        args.dir, arch=args.arch, layers=args.layers, hidden_size=args.hidden_size,
        heads=args.heads, kv_heads=args.kv_heads, intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size, tie_word_embeddings=args.tie_word_embeddings,
        seed=args.seed, dtype=args.dtype)
    print(f"wrote {args.arch} checkpoint to {path}")
    return 0


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-per-instance", type=_size, default=None,
                   help="memory budget of the instance, e.g. 64MiB (CPU default: parameters "
                        "take 40%%)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="run prompts concurrently through the engine offline")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    # both flags append to one list so the output follows the command line's order
    p.add_argument("--prompt", dest="prompts", action="append", default=[],
                   help="a text prompt (repeatable)")
    p.add_argument("--prompt-token-ids", dest="prompts", action="append", type=_token_ids,
                   help="a prompt as comma-separated token ids (repeatable)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    _add_engine_flags(p)
    p.set_defaults(func=_run_generate)


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-token-ids takes comma-separated integers, got {text!r}") from None


def engine_config_from_args(args: argparse.Namespace):
    from kunserve.worker.engine import EngineConfig

    return EngineConfig(
        model=args.model, dtype=args.dtype, memory_per_instance=args.memory_per_instance,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, block_size=args.block_size, num_threads=args.threads)


def _run_generate(args: argparse.Namespace) -> int:
    from kunserve.worker.engine import LLMEngine
    from kunserve.worker.sampling_params import SamplingParams

    prompts = args.prompts
    if not prompts:
        print("kunserve generate: give at least one --prompt or --prompt-token-ids",
              file=sys.stderr)
        return 2
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
                            ignore_eos=args.ignore_eos)
    engine = LLMEngine(engine_config_from_args(args))
    results = engine.generate(prompts, params)
    for result in results:
        if args.json:
            print(json.dumps({"prompt_token_ids": result.prompt_token_ids,
                              "token_ids": result.token_ids, "text": result.text,
                              "finish_reason": result.finish_reason, "error": result.error}))
        elif result.error:
            print(f"error: {result.error}")
        else:
            print(result.text)
    return 1 if any(r.error for r in results) else 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that print a side-by-side table")
    bench = p.add_subparsers(dest="bench", required=True)
    from kunserve.bench import compare as compare_bench
    from kunserve.bench import drop as drop_bench
    from kunserve.bench import engine as engine_bench
    from kunserve.bench import mesh as mesh_bench
    from kunserve.bench import migrate as migrate_bench
    from kunserve.bench import pipeline as pipeline_bench
    from kunserve.bench import plan as plan_bench
    from kunserve.bench import replay as replay_bench

    drop_bench.add_parser(bench)
    engine_bench.add_parser(bench)
    mesh_bench.add_parser(bench)
    migrate_bench.add_parser(bench)
    pipeline_bench.add_parser(bench)
    plan_bench.add_parser(bench)
    replay_bench.add_parser(bench)  # bench run
    compare_bench.add_parser(bench)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure step times, fit the cost model lookahead "
                                       "micro-batching uses, save it next to the model",
                       description="--threads defaults to 1 here, as a worker's does")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--output", default=None,
                   help="where to write it (default: <model>/kunserve-cost-model.json)")
    p.add_argument("--mixed-batches", type=int, default=60,
                   help="random mixed prefill/decode batches besides the grid")
    p.add_argument("--repeats", type=int, default=5, help="runs per batch; the fastest counts")
    p.add_argument("--held-out-every", type=int, default=4,
                   help="every k-th batch is kept out of the fit to measure the error")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every measurement to this file")
    _add_engine_flags(p)
    p.set_defaults(func=_run_profile, threads=1)


def _run_profile(args: argparse.Namespace) -> int:
    from kunserve.profile import run

    return run(engine_config_from_args(args), output=args.output,
               num_mixed=args.mixed_batches, repeats=args.repeats,
               held_out_every=args.held_out_every, seed=args.seed, json_path=args.json)


def _add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run the whole mesh locally: nats, redis, planner, router, "
                                  "workers, gateway (Ctrl-C stops it)")
    p.add_argument("--model", default=None,
                   help="Hugging Face checkpoint directory (default: $KUNSERVE_MODEL, else an "
                        "embedded tiny Llama built once into $KUNSERVE_CACHE_DIR)")
    p.add_argument("--instances", type=int, default=2, help="number of workers")
    p.add_argument("--host", default="127.0.0.1", help="the gateway's address")
    p.add_argument("--port", type=int, default=8000, help="the gateway's port")
    p.add_argument("--memory-per-instance", type=_size, default=None,
                   help="each worker's memory budget, e.g. 256MiB (default: the worker's)")
    p.add_argument("--threads-per-worker", type=int, default=None,
                   help="torch threads per worker (default: cores // instances)")
    p.add_argument("--startup-timeout", type=float, default=600.0,
                   help="seconds to wait for everything to be ready")
    p.add_argument("--policy", default=None, choices=list(POLICIES),
                   help="how the cluster answers a KV burst (default: $KUNSERVE_POLICY, else "
                        "kunserve: drop parameters); the others are the baselines of the "
                        "burst benchmark")
    p.set_defaults(func=_run_up)


def _run_up(args: argparse.Namespace) -> int:
    from kunserve.launcher import run_up

    return run_up(model=args.model, instances=args.instances, host=args.host, port=args.port,
                  memory_per_instance=args.memory_per_instance,
                  threads_per_worker=args.threads_per_worker,
                  startup_timeout=args.startup_timeout, policy=args.policy)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kunserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_make_tiny_model(sub)
    _add_generate(sub)
    _add_bench(sub)
    _add_profile(sub)
    _add_up(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # bad checkpoint, budget, arguments: say why, no trace
        print(f"kunserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
