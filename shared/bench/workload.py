"""The requests a replay sends: arrivals, lengths and prompts, from traces or synthetic.

Pure and seeded: the same inputs and seed give the same request list, which is how
``bench compare`` replays the same requests against every policy.

- **Arrivals**: a trace's (window of) arrival times, or synthetic ones: gamma-distributed
  inter-arrival times with shape ``burstiness`` and mean ``1/rate`` (vLLM's benchmark; 1 is
  Poisson, below 1 burstier).
- **Lengths**: the arrivals' own trace row by row, or, from another trace (``--lengths``),
  (prompt, output) pairs drawn at random with replacement from its rows.
- **Length scale** ``s``: prompt ``max(1, round(I·s))``, output ``max(1, round(O·s))``; then the
  output is cut to half the context and the prompt to what is left of it. Default
  (``default_length_scale``): the largest ``s ≤ 1`` at which the lengths' p99 request
  (prompt + output) fits the served model's context and an instance's KV cache holds at
  least ``REQUESTS_PER_INSTANCE`` (4) requests of the mean length. On a GPU, a decode step
  costs about the same for 1 or ~100 sequences, so memory bounds a burst long before compute
  does (the paper's Qwen-2.5-14B on 80 GB holds ~170 conversation requests); on 2 CPU cores
  the tiny model's step costs 1.7 ms for 1 sequence, 2.8 ms for 4, 4.4 for 8 and 6.4 for 16,
  so batching stops paying beyond a few sequences, and a burst bounded by memory is one of a
  few requests per instance.
- **Time scale** ``X``: arrivals multiplied by ``X`` (below 1: faster).
- **Prompts**: random token ids in ``[10, vocab)`` from a seeded generator, sent as a token-id
  prompt, so every policy prefills the same tokens and no tokenizer is involved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kunserve.bench.kv_demand import DemandRequest
from kunserve.bench.stats import percentile
from kunserve.bench.traces import Trace

FIRST_PROMPT_TOKEN = 10  # below: the tiny tokenizer's special tokens
REQUESTS_PER_INSTANCE = 4


@dataclass(frozen=True)
class BenchRequest:
    index: int
    arrival_s: float  # from the start of the run
    prompt_token_ids: list[int]
    output_tokens: int

    @property
    def input_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class Shape:
    """A request before prompts: when it comes and how long it is (unscaled)."""

    arrival_s: float
    input_tokens: int
    output_tokens: int

    def demand(self) -> DemandRequest:
        return DemandRequest(self.arrival_s, self.input_tokens, self.output_tokens)


def trace_shapes(arrivals: Trace, lengths: Trace | None = None, seed: int = 0,
                 max_requests: int | None = None) -> list[Shape]:
    """The arrivals' requests, with lengths from ``lengths`` (drawn) or their own."""
    rows = arrivals.rows[:max_requests] if max_requests else arrivals.rows
    times = [r.arrival_s - rows[0].arrival_s for r in rows]
    if lengths is None:
        pairs = [(r.input_tokens, r.output_tokens) for r in rows]
    else:
        pairs = draw_lengths(lengths, len(rows), seed)
    return [Shape(t, i, o) for t, (i, o) in zip(times, pairs, strict=True)]


def synthetic_shapes(lengths: Trace, rate: float, burstiness: float, n: int,
                     seed: int = 0) -> list[Shape]:
    """``n`` requests with gamma inter-arrivals (first at 0) and lengths drawn from
    ``lengths``."""
    return [Shape(t, i, o) for t, (i, o) in zip(gamma_arrivals(rate, burstiness, n, seed),
                                                  draw_lengths(lengths, n, seed), strict=True)]


def gamma_arrivals(rate: float, burstiness: float, n: int, seed: int = 0) -> list[float]:
    if rate <= 0 or burstiness <= 0:
        raise ValueError("--rate and --burstiness must be positive")
    rng = np.random.default_rng([seed, 1])
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


def draw_lengths(lengths: Trace, n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng([seed, 2])
    picks = rng.integers(0, len(lengths.rows), size=n)
    return [(lengths.rows[k].input_tokens, lengths.rows[k].output_tokens) for k in picks]


def default_length_scale(shapes: list[Shape], max_model_len: int,
                         tokens_per_instance: float | None = None) -> float:
    """See the module docstring; ``tokens_per_instance`` None: the context alone decides."""
    sizes = [s.input_tokens + s.output_tokens for s in shapes]
    scale = min(1.0, max_model_len / (percentile(sizes, 99) or 1.0))
    if tokens_per_instance:
        mean = sum(sizes) / len(sizes)
        scale = min(scale, tokens_per_instance / (REQUESTS_PER_INSTANCE * mean))
    return scale


def scale_lengths(input_tokens: int, output_tokens: int, scale: float,
                  max_model_len: int) -> tuple[int, int]:
    if max_model_len < 2:
        raise ValueError("the context must hold at least two tokens")
    out = min(max(1, round(output_tokens * scale)), max_model_len // 2)
    inp = min(max(1, round(input_tokens * scale)), max_model_len - out)
    return inp, out


def scale_shapes(shapes: list[Shape], length_scale: float, max_model_len: int,
                 time_scale: float = 1.0) -> list[Shape]:
    if length_scale <= 0 or time_scale <= 0 or not math.isfinite(time_scale):
        raise ValueError("length and time scales must be positive")
    return [Shape(s.arrival_s * time_scale,
                  *scale_lengths(s.input_tokens, s.output_tokens, length_scale, max_model_len))
            for s in shapes]


def make_requests(shapes: list[Shape], vocab_size: int, seed: int = 0) -> list[BenchRequest]:
    """Each shape with a random prompt of its length (seeded, so the same for every run)."""
    if vocab_size <= FIRST_PROMPT_TOKEN:
        raise ValueError(f"vocab size {vocab_size} too small for random prompts")
    rng = np.random.default_rng([seed, 3])
    return [BenchRequest(k, s.arrival_s,
                         rng.integers(FIRST_PROMPT_TOKEN, vocab_size, size=s.input_tokens
                                      ).tolist(), s.output_tokens)
            for k, s in enumerate(shapes)]
