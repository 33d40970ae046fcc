"""``kunserve profile --model DIR``: measure the engine's step times, fit the cost model that
lookahead micro-batching uses, report its error on held-out batches and save it next to the
checkpoint (``kunserve-cost-model.json``, where the engine finds it).

The batches are real engine steps (the model runner: inputs, every layer against the paged KV
cache, logits and sampling) on made-up requests whose blocks are allocated for the occasion:
single prefill chunks of several lengths after several prefix lengths, decode batches of
several sizes and context lengths, and mixed batches (a few prefill chunks among decodes).
Every batch runs ``--repeats`` times, the batches in a shuffled order each round, then cheap
batches run more rounds until their runs add up to a second (at most five times
``--repeats``): their times vary the most. A batch's fastest time counts (other processes on a
shared machine only ever slow a run down; the fastest of up to 25 runs also beat their median
and the mean of the faster half in held-out error). With one torch thread (the default here,
as a worker runs) a step's time is the process's CPU time, which other processes taking the
cores do not inflate (though sharing the caches with them still does); with more, wall time.
One batch in ``--held-out-every`` (every k-th of a shuffled list) is kept out of the fit; the
table reports the model's relative error on those, per kind of batch.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

Chunk = tuple[int, int]  # (prefix tokens in the KV cache, new tokens)


@dataclass
class ProfiledBatch:
    kind: str  # prefill | decode | mixed
    chunks: list[Chunk]
    seconds: float = 0.0  # the time that counts (see ``summarise``)
    runs: list[float] = field(default_factory=list)  # every measured time, in order

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    def kv_blocks(self, block_size: int) -> int:
        return sum(-(-(p + n) // block_size) for p, n in self.chunks)


def plan_batches(rng: random.Random, *, max_tokens: int, max_seqs: int, max_context: int,
                 num_blocks: int, block_size: int, num_mixed: int) -> list[ProfiledBatch]:
    """The batches to measure, each within the step's token budget, the sequence limit, the
    context length and the KV cache (``num_blocks`` of ``block_size`` tokens)."""
    kv_tokens = num_blocks * block_size
    batches: list[ProfiledBatch] = []
    lengths = [n for n in (8, 32, 96, 192, 384, 768, 1536) if n <= max_tokens]
    for n in lengths:
        for p in (0, 128, 512, 1024, 1792):
            if p + n <= max_context:
                batches.append(ProfiledBatch("prefill", [(p, n)]))
    for size in (1, 2, 4, 8, 16, 32, 64, 128):
        for context in (64, 384, 1280):
            context = min(context, max_context, kv_tokens // size)
            if size <= min(max_seqs, max_tokens) and context >= 2:
                batches.append(ProfiledBatch("decode", [(rng.randint(context // 2, context) - 1,
                                                         1) for _ in range(size)]))
    for _ in range(num_mixed):
        chunks: list[Chunk] = []
        kv_left = kv_tokens
        for _ in range(rng.randint(1, 3)):
            n = rng.randint(8, max(8, min(max_tokens // 2, 384)))
            p = rng.choice([0, 0, rng.randint(0, max(0, min(max_context, kv_left // 2) - n))])
            chunks.append((p, n))
            kv_left -= p + n
        seats = min(max_seqs, max_tokens) - len(chunks)
        decodes = min(rng.randint(0, 48), max(0, seats))
        for _ in range(decodes):
            context = rng.randint(16, max(16, min(max_context, kv_left // decodes)))
            chunks.append((context - 1, 1))
            kv_left -= context
        batches.append(ProfiledBatch("mixed", chunks))
    return [b for b in batches if b.num_tokens <= max_tokens and len(b.chunks) <= max_seqs
            and b.kv_blocks(block_size) <= num_blocks
            and all(p + n <= max_context for p, n in b.chunks)]


def step_clock():
    """CPU time of this process with one torch thread (ops run on the calling thread, and
    time other processes take on a shared machine does not count), else wall time."""
    import torch

    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def measure(engine, batches: list[ProfiledBatch], repeats: int, rng: random.Random, *,
            min_seconds: float = 0.0, max_repeats: int = 0) -> None:
    """Run every batch ``repeats`` times on the engine's runner, in a shuffled order each
    round, and then more rounds of the batches whose runs add up to less than
    ``min_seconds`` (cheap batches, whose times are the noisiest), up to ``max_repeats``
    runs; fill in each batch's runs and the time that counts."""
    from kunserve.worker.sampling_params import SamplingParams
    from kunserve.worker.scheduler_output import ScheduledChunk, SchedulerOutput

    clock = step_clock()
    vocab = engine.model_config.vocab_size
    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    manager = engine.block_manager
    for batch in batches:
        batch.runs = []
    pending = list(batches)
    while pending:
        rng.shuffle(pending)
        for batch in pending:
            chunks = []
            for k, (prefix, n) in enumerate(batch.chunks):
                rid = f"profile-{k}"
                if not manager.allocate(rid, prefix + n):
                    raise ValueError("the KV cache cannot hold a profiling batch: lower "
                                     "--max-num-batched-tokens or raise --memory-per-instance")
                chunks.append(ScheduledChunk(rid, [rng.randrange(vocab) for _ in range(n)],
                                             prefix, list(manager.block_table(rid)), True,
                                             greedy, []))
            start = clock()
            engine.runner.execute(SchedulerOutput(chunks=chunks))
            batch.runs.append(clock() - start)
            for chunk in chunks:
                manager.free(chunk.request_id)
        pending = [b for b in batches if len(b.runs) < repeats or (
            sum(b.runs) < min_seconds and len(b.runs) < max_repeats)]
    for batch in batches:
        batch.seconds = summarise(batch.runs)


def summarise(runs: list[float]) -> float:
    """The fastest run: other processes on a shared machine only ever slow one down."""
    return min(runs)


def profile(engine, *, num_mixed: int = 60, repeats: int = 5, held_out_every: int = 4,
            seed: int = 0, min_seconds: float = 1.0, max_repeats: int | None = None,
            progress=print) -> tuple[object, dict]:
    """Measure, fit, evaluate: the cost model and a report (per-kind held-out errors).
    Every batch runs at least ``repeats`` times, and up to ``max_repeats`` (default five times
    ``repeats``) until its runs add up to ``min_seconds``."""
    import torch

    from kunserve.worker.cost_model import REQUIRED_TERMS, fit, relative_errors

    rng = random.Random(seed)
    manager = engine.block_manager
    batches = plan_batches(rng, max_tokens=engine.config.max_num_batched_tokens,
                           max_seqs=engine.config.max_num_seqs,
                           max_context=engine.max_model_len - 1,
                           num_blocks=manager.num_free, block_size=manager.block_size,
                           num_mixed=num_mixed)
    if len(batches) < 8:
        raise ValueError(f"the KV cache ({manager.num_free} blocks) holds too few profiling "
                         "batches: raise --memory-per-instance")
    max_repeats = 5 * repeats if max_repeats is None else max(repeats, max_repeats)
    progress(f"warming up, then {len(batches)} batches x {repeats}-{max_repeats} runs ...")
    measure(engine, batches[:: max(1, len(batches) // 8)], 1, rng)  # warm-up: not kept
    start = time.perf_counter()
    measure(engine, batches, repeats, rng, min_seconds=min_seconds, max_repeats=max_repeats)
    elapsed = time.perf_counter() - start
    random.Random(seed).shuffle(batches)  # the split: not hanging on how many runs there were
    held = [b for i, b in enumerate(batches) if i % held_out_every == 0]
    train = [b for i, b in enumerate(batches) if i % held_out_every != 0]
    info = {"model": str(engine.config.model), "dtype": engine.config.dtype,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "clock": "cpu" if step_clock() is time.process_time else "wall",
            "max_num_batched_tokens": engine.config.max_num_batched_tokens,
            "fit_batches": len(train), "held_out_batches": len(held), "repeats": repeats,
            "max_repeats": max_repeats, "min_seconds": min_seconds,
            "measured_seconds": round(elapsed, 1)}
    model = fit([b.chunks for b in train], [b.seconds for b in train], info)
    rows = []
    for kind in ("prefill", "decode", "mixed", "all"):
        subset = [b for b in held if kind in ("all", b.kind)]
        if not subset:
            continue
        errors = relative_errors(model, [b.chunks for b in subset], [b.seconds for b in subset])
        rows.append({"kind": kind, "batches": len(subset),
                     "ms_min": 1e3 * min(b.seconds for b in subset),
                     "ms_max": 1e3 * max(b.seconds for b in subset),
                     "mean_error": statistics.fmean(errors), "max_error": max(errors)})
    overall = rows[-1]
    # side by side on the same runs: the paper's four terms alone
    four = fit([b.chunks for b in train], [b.seconds for b in train], terms=REQUIRED_TERMS)
    four_errors = relative_errors(four, [b.chunks for b in held], [b.seconds for b in held])
    rows.append({**overall, "kind": "all, four terms", "mean_error": statistics.fmean(four_errors),
                 "max_error": max(four_errors)})
    fit_errors = relative_errors(model, [b.chunks for b in train], [b.seconds for b in train])
    model.info.update(held_out_mean_error=overall["mean_error"],
                      held_out_max_error=overall["max_error"],
                      fit_mean_error=statistics.fmean(fit_errors))
    return model, {"rows": rows, "coefficients": model.to_json()["coefficients"],
                   "batches": [{"kind": b.kind, "chunks": b.chunks, "seconds": b.seconds,
                                "runs": b.runs, "held_out": b in held} for b in batches]}


def run(config, *, output: str | None, num_mixed: int, repeats: int, held_out_every: int,
        seed: int, json_path: str | None) -> int:
    import json
    from dataclasses import replace

    from kunserve.worker.cost_model import FILE_NAME
    from kunserve.worker.engine import LLMEngine

    engine = LLMEngine(replace(config, lookahead=False))
    model, report = profile(engine, num_mixed=num_mixed, repeats=repeats,
                            held_out_every=held_out_every, seed=seed)
    print_report(model, report)
    path = model.save(Path(output) if output else Path(config.model) / FILE_NAME)
    print(f"wrote {path}")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return 0


def print_report(model, report: dict) -> None:
    from kunserve.worker.cost_model import FORM

    info = model.info
    print(f"\ncost model  (fitted on {info['fit_batches']} batches, {info['threads']} "
          f"thread(s), {info['dtype']})\n  {FORM}")
    for letter, (term, value) in zip("abcdeg", report["coefficients"].items(), strict=True):
        print(f"  {letter}  {term:<17} {value:.4e}")
    print(f"\nheld-out error ({info['held_out_batches']} batches not in the fit; "
          f"|predicted - measured| / measured)")
    print(f"{'batches':<16} {'count':>5} {'step ms':>15} {'mean error':>11} {'max error':>10}")
    for row in report["rows"]:
        span = f"{row['ms_min']:.1f}-{row['ms_max']:.1f}"
        print(f"{row['kind']:<16} {row['batches']:>5} {span:>15} {row['mean_error']:>11.1%} "
              f"{row['max_error']:>10.1%}")
