"""The estimated time of one micro-batch, for lookahead micro-batching. Pure: numpy, no torch.

A micro-batch is a list of chunks; chunk ``i`` runs ``n_i`` new tokens of a request that
already has ``p_i`` tokens in its KV cache (its prefix; a decode is ``n = 1``). Its time is

    t = a * sum(p_i * n_i)   prefix attention: every new token reads the whole prefix
      + b * sum(n_i ** 2)    self attention among the new tokens (causal, quadratic)
      + c * sum(n_i)         FFN, projections, norms: linear in the tokens
      + d                    once per micro-batch: weight reads, launches, input building
      + e * sum(p_i)         over decodes (n_i = 1): what the fused decode kernel pays per
                             key and value read beyond ``a`` (it reads them several times
                             dearer than prefill attention does)
      + g * sum(p_i)         over prefill chunks (n_i > 1) after a prefix: the prefix's keys
                             and values are gathered out of the cache blocks once per chunk
                             and layer, whatever the chunk's length

(The engine runs every one-token chunk as a decode.) ``fit`` finds the coefficients by least
squares from measured steps (``kunserve profile`` measures them on the served model),
weighting each step by ``1 / t`` so that the relative error is what is minimised, with every
coefficient non-negative (exact non-negative least squares), so cost grows with every token.
The model is saved as JSON next to the checkpoint (``kunserve-cost-model.json``), where the
engine finds it; a file without the last two terms (an older profile) reads them as 0.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

FILE_NAME = "kunserve-cost-model.json"
TERMS = ("prefix_attention", "self_attention", "linear", "constant", "decode_attention",
         "prefix_gather")
REQUIRED_TERMS = TERMS[:4]  # the rest read as 0 when a saved model lacks them
Chunk = tuple[int, int]  # (prefix tokens already in the KV cache, new tokens)
FORM = ("t = a*sum(p*n) + b*sum(n^2) + c*sum(n) + d + e*sum(p | n = 1) + g*sum(p | n > 1)  "
        "(seconds; p: prefix tokens in the KV cache, n: new tokens, per chunk; d once per "
        "batch)")


def features(chunks: Iterable[Chunk]) -> list[float]:
    """One micro-batch's feature row, in ``TERMS`` order."""
    prefix = quadratic = linear = decode = gather = 0
    for p, n in chunks:
        prefix += p * n
        quadratic += n * n
        linear += n
        if n == 1:
            decode += p
        elif n > 1:
            gather += p
    return [float(prefix), float(quadratic), float(linear), 1.0, float(decode), float(gather)]


@dataclass(frozen=True)
class CostModel:
    prefix_attention: float  # a: seconds per (prefix token x new token)
    self_attention: float  # b: seconds per new token squared
    linear: float  # c: seconds per new token
    constant: float  # d: seconds per micro-batch
    decode_attention: float = 0.0  # e: seconds per prefix token of a decode, beyond a
    prefix_gather: float = 0.0  # g: seconds per prefix token of a prefill chunk
    info: dict = field(default_factory=dict, compare=False)  # how it was fitted

    @property
    def coefficients(self) -> list[float]:
        return [getattr(self, term) for term in TERMS]

    def chunk_cost(self, prefix: int, num_tokens: int) -> float:
        """One chunk's share of a micro-batch's time (the constant is the batch's)."""
        if num_tokens <= 0:
            return 0.0
        per_prefix = self.decode_attention if num_tokens == 1 else self.prefix_gather
        return (num_tokens * (self.prefix_attention * prefix + self.self_attention * num_tokens
                              + self.linear) + per_prefix * prefix)

    def predict(self, chunks: Iterable[Chunk]) -> float:
        """Seconds for one micro-batch of ``chunks``."""
        return float(np.dot(self.coefficients, features(chunks)))

    def token_cost_bound(self, chunks: Iterable[Chunk]) -> float:
        """An upper bound on what moving one token between two micro-batches changes: the
        dearest token of these chunks (its prefix, its chunk's quadratic share, linear), plus
        the per-prefix terms a chunk gains or loses when a cut makes it one token long (a
        decode) or longer, or empty."""
        per_prefix = self.prefix_attention + self.decode_attention + self.prefix_gather
        return max((per_prefix * (p + n) + 2 * self.self_attention * n + self.linear
                    for p, n in chunks), default=0.0)

    # -- persistence -------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"form": FORM,
                "coefficients": {term: value for term, value
                                 in zip(TERMS, self.coefficients, strict=True)},
                "info": self.info}

    @classmethod
    def from_json(cls, data: dict) -> CostModel:
        coefficients = data["coefficients"]
        values = [float(coefficients[term] if term in REQUIRED_TERMS
                        else coefficients.get(term, 0.0)) for term in TERMS]
        if any(not np.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"cost model coefficients must be finite and >= 0, got {values}")
        return cls(*values, info=dict(data.get("info", {})))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a cost model: {exc!r}") from None

    @classmethod
    def find(cls, model_dir: str | Path) -> CostModel | None:
        """The cost model saved next to a checkpoint, or None."""
        path = Path(model_dir) / FILE_NAME
        return cls.load(path) if path.is_file() else None

    @classmethod
    def estimate(cls, shape) -> CostModel:
        """A stand-in proportional to FLOPs for a model nobody profiled (``shape``: a
        ``ModelConfig``): attention reads each (query, key) pair for scores and values,
        causal self attention half of them; the linear term is the weight matmuls; no
        constant, no decode-kernel or gather term (memory, not FLOPs). Units are FLOPs, not
        seconds."""
        attn = shape.num_heads * shape.head_dim
        pair = 4.0 * attn * shape.num_layers
        weights = (shape.hidden_size * (attn + 2 * shape.num_kv_heads * shape.head_dim)  # qkv
                   + attn * shape.hidden_size  # o
                   + 3 * shape.hidden_size * shape.intermediate_size)  # gate, up, down
        return cls(pair, pair / 2, 2.0 * weights * shape.num_layers, 0.0,
                   info={"source": "estimate from the model's shape (FLOPs)"})


def fit(batches: Sequence[Sequence[Chunk]], seconds: Sequence[float],
        info: dict | None = None, terms: Sequence[str] = TERMS) -> CostModel:
    """Least-squares fit of the coefficients of ``terms`` (the others are 0) to measured
    micro-batch times, relative error weighted, coefficients kept >= 0: the best of the
    unconstrained fits over every subset of the terms whose coefficients all come out >= 0
    (that is the non-negative least-squares optimum; with six terms, 63 small fits)."""
    if len(batches) != len(seconds) or not batches:
        raise ValueError("fit needs as many measured times as batches, and at least one")
    x = np.array([features(b) for b in batches], dtype=np.float64)  # (B, terms)
    y = np.asarray(seconds, dtype=np.float64)  # (B,)
    if np.any(y <= 0):
        raise ValueError("measured times must be positive")
    x, y = x / y[:, None], np.ones_like(y)  # relative error: (Xw - t) / t
    scale = np.abs(x).max(axis=0)  # conditioning: every column in [0, 1]
    used = [j for j, term in enumerate(TERMS) if scale[j] > 0 and term in terms]
    x = x / np.where(scale > 0, scale, 1.0)
    coefficients, best = np.zeros(x.shape[1]), float(np.dot(y, y))  # all zero
    for k in range(1, len(used) + 1):
        for subset in map(list, combinations(used, k)):
            solution, *_ = np.linalg.lstsq(x[:, subset], y, rcond=None)
            if np.all(solution >= 0):
                residual = float(np.sum((x[:, subset] @ solution - y) ** 2))
                if residual < best:
                    coefficients, best = np.zeros(x.shape[1]), residual
                    coefficients[subset] = solution / scale[subset]
    return CostModel(*coefficients.tolist(), info=dict(info or {}))


def relative_errors(model: CostModel, batches: Sequence[Sequence[Chunk]],
                    seconds: Sequence[float]) -> list[float]:
    """``|predicted - measured| / measured`` per batch."""
    return [abs(model.predict(b) - t) / t for b, t in zip(batches, seconds, strict=True)]
