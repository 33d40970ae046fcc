"""``kunserve bench compare``: the same requests against a fresh stack per serving policy.

For each policy: ``kunserve up --policy P --instances N`` (its own port, state and log under
``OUT/<policy>/``), the replay, then the stack is stopped. The scenario (traces, window,
scales, prompts) is built once, on the first policy's stack (its KV capacity and speed feed
the KV-demand rule), and the very same request list is replayed against every policy. The SLO
reference is the best policy's P50 TTFT and TPOT. Prints one side-by-side table with each
policy's ratio to ``kunserve``; writes ``OUT/compare.{json,csv}``, ``OUT/slo.csv``, the TTFT
CDF of all policies and each policy's files (``results.py``) and timeline.

The default demo (no trace options) sizes every worker's budget so that its KV cache is a
third of its parameters (``DEMO_KV_TO_PARAMETERS``) unless ``--memory-per-instance`` or
``--kv-to-parameters`` says otherwise: on 2 CPU cores, decode batching stops paying beyond a
few sequences per instance, so the burst must run out of memory while a few requests run, not
of cores (``kv_demand.py``'s compute bound keeps the replay within them).

Every policy serves the same checkpoint (``--model``, else ``kunserve up``'s tiny model, built
here first). Pipelined groups (``kunserve``'s drops, ``vllm-pp``'s pairs) cut their
micro-batches by lookahead only with the model's cost model next to it, so a checkpoint that
has none is profiled first (``kunserve profile``, once: ~1.5 min for the tiny model), unless
``--no-profile``.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from kunserve.bench.cluster_monitor import read_states, wait_until_settled
from kunserve.bench.local_stack import LocalStack, StackOptions
from kunserve.bench.mechanisms import counted_between, fetch_counters
from kunserve.bench.plots import plot_ttft_cdf
from kunserve.bench.replay import RunResult, add_run_args, replay_scenario, write_result
from kunserve.bench.report import format_mechanisms, format_repeats, format_table, repeat_rows
from kunserve.bench.results import summary_row, write_csv, write_json
from kunserve.bench.scenario import Scenario, add_scenario_args, build_scenario, describe
from kunserve.bench.stack_probe import fetch_stack_info, warm_up
from kunserve.bench.stats import SloPoint, slo_reference

POLICIES = ("kunserve", "vllm", "vllm-pp", "infercept", "llumnix")
BASELINE = "kunserve"
# the default demo's budget: each worker's KV cache a third of its parameters' bytes, a model
# that fills most of its memory (a 70B model on two 80 GB GPUs: ~0.1); a drop into a pair then
# gives the pair 1 + 1 / (2 x 1/3) = 2.5x the KV of the two solo instances
DEMO_KV_TO_PARAMETERS = 1 / 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="replay the same requests against a fresh stack per policy; one "
                        "side-by-side table (no trace options: the default burst demo)",
        description=__doc__.splitlines()[0])
    p.add_argument("--policies", type=_policies, default=list(POLICIES),
                   help=f"comma-separated, from {','.join(POLICIES)} (default: all)")
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default=None, help="checkpoint (default: kunserve up's tiny "
                                                 "model)")
    p.add_argument("--memory-per-instance", default=None, help="passed to kunserve up")
    p.add_argument("--kv-to-parameters", type=float, default=None,
                   help="size each worker's budget as its parameters plus this many times as "
                        "much KV cache (KUNSERVE_KV_TO_PARAMETERS; instead of "
                        "--memory-per-instance; the default demo: 1/3)")
    p.add_argument("--threads-per-worker", type=int, default=None, help="passed to kunserve up")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of every policy, each a fresh stack per policy replaying the "
                        "same requests; with more than one, each round's files go to "
                        "OUT/round-K/ and a table gives each figure's median and range and "
                        "each policy's ratio to kunserve round by round (runs here vary a lot)")
    p.add_argument("--no-profile", action="store_true",
                   help="do not profile a checkpoint that has no cost model (pipelined groups "
                        "then batch without lookahead)")
    add_run_args(p)
    add_scenario_args(p)
    p.set_defaults(func=run)


def _policies(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"--policies takes distinct names from {','.join(POLICIES)}, got {text!r}")
    return names


def run(args: argparse.Namespace) -> int:
    if args.repeat < 1:
        raise ValueError("--repeat must be >= 1")
    model = served_model(args.model, profile=not args.no_profile)
    options = StackOptions(instances=args.instances, model=model,
                           memory_per_instance=args.memory_per_instance,
                           threads_per_worker=args.threads_per_worker,
                           startup_timeout_s=args.startup_timeout,
                           extra_env=_budget_env(args))
    scenario: Scenario | None = None
    rounds: list[list[RunResult]] = []
    for k in range(1, args.repeat + 1):
        out = args.out if args.repeat == 1 else args.out / f"round-{k}"
        if args.repeat > 1:
            print(f"== round {k} of {args.repeat}", flush=True)
        results, scenario = _one_round(args, options, out, scenario)
        _report(out, results)
        rounds.append(results)
    if args.repeat > 1:
        _report_repeats(args.out, rounds)
    return 0


def _one_round(args: argparse.Namespace, options: StackOptions, out: Path,
               scenario: Scenario | None) -> tuple[list[RunResult], Scenario]:
    """Every policy once, each on a fresh stack under ``out/<policy>``; the scenario is
    built on the first stack of the first round and replayed as it is from then on."""
    results: list[RunResult] = []
    for policy in args.policies:
        print(f"== {policy}: starting kunserve up --instances {args.instances} --policy "
              f"{policy}", flush=True)
        with LocalStack(out / policy, options, policy) as stack:
            args.admin_token = stack.admin_token
            info = asyncio.run(fetch_stack_info(stack.url, stack.admin_token, args.block_size))
            baseline = asyncio.run(read_states(stack.url, stack.admin_token))
            if scenario is None:
                scenario = asyncio.run(build_scenario(args, stack.url, info))
                print(describe(scenario.description), flush=True)
            asyncio.run(warm_up(stack.url, info.model, info.vocab_size))
            # the speed probe may have made it drop: that drop's restore is not the replay's
            asyncio.run(wait_until_settled(stack.url, stack.admin_token, baseline, args.settle,
                                           args.sample_interval))
            before = asyncio.run(fetch_counters(stack.url))
            result = asyncio.run(replay_scenario(args, stack.url, scenario, policy, baseline))
            mechanisms = counted_between(before, asyncio.run(fetch_counters(stack.url)))
            mechanisms["pipelined at start"] = sum(state == "pipelined"
                                                   for state in (baseline or {}).values())
            result.config.update(policy=policy, instances=args.instances,
                                 mechanisms=mechanisms)
            results.append(result)
    assert scenario is not None
    return results, scenario


def _budget_env(args: argparse.Namespace) -> dict[str, str]:
    demo = args.trace is None and args.rate is None
    if args.kv_to_parameters is None and args.memory_per_instance is None and demo:
        args.kv_to_parameters = DEMO_KV_TO_PARAMETERS
        print(f"== the demo's budget: KV cache {DEMO_KV_TO_PARAMETERS:.2f} x the parameters "
              "(a pair's drop gives it 2.5x the KV)", flush=True)
    if args.kv_to_parameters is None:
        return {}
    if args.memory_per_instance is not None:
        raise ValueError("give --memory-per-instance or --kv-to-parameters, not both")
    if args.kv_to_parameters <= 0:
        raise ValueError(f"--kv-to-parameters must be positive, got {args.kv_to_parameters}")
    return {"KUNSERVE_KV_TO_PARAMETERS": repr(args.kv_to_parameters)}


def served_model(model: str | None, profile: bool) -> str:
    """The checkpoint every policy serves, with its cost model when ``profile``."""
    from kunserve.launcher import LauncherSettings, ensure_tiny_model
    from kunserve.worker.cost_model import FILE_NAME

    if model is None:
        model = str(ensure_tiny_model(LauncherSettings().cache_dir.expanduser().resolve()))
    if profile and not (Path(model) / FILE_NAME).is_file():
        print(f"== profiling {model} for the lookahead's cost model (kunserve profile; once)",
              flush=True)
        subprocess.run([sys.executable, "-m", "kunserve.cli", "profile", "--model", model],
                       check=True)
    return model


def _report(out: Path, results: list[RunResult]) -> None:
    summaries = {r.name: r.summary for r in results}
    ref = slo_reference(summaries.values())
    slo: dict[str, list[SloPoint]] = {r.name: write_result(out / r.name, r, ref)
                                      for r in results}
    plot_ttft_cdf({r.name: r.records for r in results}, out / "ttft_cdf.png",
                  title="TTFT CDF per policy")
    write_json(out / "compare.json", {
        "slo_reference": ref and asdict(ref),
        "scenario": results[0].config if results else {},
        "policies": {r.name: {"summary": summaries[r.name].to_dict(),
                              "slo": [asdict(p) for p in slo[r.name]],
                              "mechanisms": r.config.get("mechanisms", {})} for r in results}})
    write_csv(out / "compare.csv", [{"policy": n, **summary_row(s)}
                                    for n, s in summaries.items()])
    write_csv(out / "slo.csv", [{"policy": n, **asdict(p)} for n, points in slo.items()
                                for p in points])
    print()
    print(format_table(summaries, slo, baseline=BASELINE))
    print(format_mechanisms({r.name: r.config.get("mechanisms", {}) for r in results}))
    print(f"\nresults in {out}")


def _report_repeats(out: Path, rounds: list[list[RunResult]]) -> None:
    summaries = [{r.name: r.summary for r in results} for results in rounds]
    write_json(out / "repeats.json", {"rounds": len(rounds), "rows": [
        {"figure": label, "policy": policy, "values": values, "ratios_to_kunserve": ratios}
        for label, policy, values, ratios in repeat_rows(summaries, BASELINE)]})
    print(f"\n{len(rounds)} rounds, the same requests in each (every round's tables above; "
          f"files under {out}/round-K/):")
    print(format_repeats(summaries, BASELINE))
    print(f"\nsummary in {out / 'repeats.json'}")
