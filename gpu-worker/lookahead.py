"""Lookahead micro-batching: split queued work into micro-batches of equal estimated cost.

A pipeline group runs as fast as its slowest micro-batch allows: a stage that finishes a cheap
micro-batch waits for the next one while its neighbour is still busy with a dear one (the
bubble). So instead of filling each micro-batch with the next ``max_num_batched_tokens``
tokens, the scheduler looks ahead at the work the next ``parts`` micro-batches will carry
(``Work`` items in serving order: each request's next tokens and how much of it is already in
the KV cache) and splits it recursively: cut it into two halves of equal estimated cost
(``cost_model.py``), chunking the request the cut falls in, then cut each half again, until
there are ``parts`` micro-batches or a cut would leave a side with fewer than ``min_tokens``
tokens. For ``parts`` that is not a power of two the cut gives the left side
``ceil(parts / 2)`` of them and a matching share of the cost. Pure: no torch, no scheduler.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from kunserve.worker.cost_model import CostModel


@dataclass(frozen=True)
class Work:
    """The next ``num_tokens`` tokens of a request that has ``prefix`` tokens before them."""

    request_id: str
    prefix: int
    num_tokens: int

    def cost(self, model: CostModel) -> float:
        return model.chunk_cost(self.prefix, self.num_tokens)


MicroBatch = list[Work]


def split(work: Sequence[Work], parts: int, model: CostModel,
          min_tokens: int = 1) -> list[MicroBatch]:
    """At most ``parts`` micro-batches covering ``work`` token for token, in order (a request
    cut in two ends one micro-batch and starts the next); every micro-batch has at least
    ``min_tokens`` tokens unless there is only one. Empty work: no micro-batch."""
    items = [w for w in work if w.num_tokens > 0]
    return _split(items, parts, model, max(1, min_tokens)) if items else []


def cost(batch: Sequence[Work], model: CostModel) -> float:
    """Estimated seconds of one micro-batch (its constant included)."""
    return model.predict((w.prefix, w.num_tokens) for w in batch)


def num_tokens(batch: Sequence[Work]) -> int:
    return sum(w.num_tokens for w in batch)


def _split(items: list[Work], parts: int, model: CostModel, min_tokens: int) -> list[MicroBatch]:
    total = num_tokens(items)
    for k in range(parts, 1, -1):  # fewer parts when a cut would leave too few tokens
        left_parts = (k + 1) // 2
        cut = equal_cost_cut(items, left_parts, k - left_parts, model)
        if min_tokens <= cut <= total - min_tokens:
            left, right = cut_at(items, cut)
            return (_split(left, left_parts, model, min_tokens)
                    + _split(right, k - left_parts, model, min_tokens))
    return [items]


def equal_cost_cut(items: Sequence[Work], left_parts: int, right_parts: int,
                   model: CostModel) -> int:
    """The token offset that splits ``items`` so that each of the ``left_parts``
    micro-batches on the left costs what each of the ``right_parts`` on the right does:
    ``right_parts * W_left = left_parts * W_right`` (``W``: the chunks' costs; every
    micro-batch's constant is the same, so it drops out), to within one token."""
    costs = [w.cost(model) for w in items]
    before = [0.0, *accumulate(costs)]  # cost of the items before item k
    offsets = [0, *accumulate(w.num_tokens for w in items)]
    total_cost = before[-1]
    if total_cost <= 0:  # a model that prices nothing: cut by tokens
        return offsets[-1] * left_parts // (left_parts + right_parts)

    def imbalance_at_item(k: int) -> float:  # cut just before item k
        return right_parts * before[k] - left_parts * (total_cost - before[k])

    # the item whose start is on the left-heavy side's edge: imbalance <= 0 before it, > 0
    # after it (whole items moving left only raise the imbalance)
    k = max(0, bisect_right(range(len(items) + 1), 0.0, key=imbalance_at_item) - 1)
    if k == len(items):
        return offsets[-1]
    item, rest = items[k], total_cost - before[k + 1]

    def imbalance(t: int) -> float:  # cut after the first t tokens of item k
        left = before[k] + model.chunk_cost(item.prefix, t)
        right = model.chunk_cost(item.prefix + t, item.num_tokens - t) + rest
        return right_parts * left - left_parts * right

    lo, hi = 0, item.num_tokens  # imbalance(lo) <= 0 < imbalance(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if imbalance(mid) <= 0:
            lo = mid
        else:
            hi = mid
    best = lo if abs(imbalance(lo)) <= abs(imbalance(hi)) else hi
    return offsets[k] + best


def cut_at(items: Sequence[Work], cut: int) -> tuple[MicroBatch, MicroBatch]:
    """The first ``cut`` tokens and the rest; the request the cut falls in is chunked."""
    left: MicroBatch = []
    right: MicroBatch = []
    seen = 0
    for w in items:
        if seen + w.num_tokens <= cut:
            left.append(w)
        elif seen >= cut:
            right.append(w)
        else:
            t = cut - seen
            left.append(Work(w.request_id, w.prefix, t))
            right.append(Work(w.request_id, w.prefix + t, w.num_tokens - t))
        seen += w.num_tokens
    return left, right


def truncate(batch: Sequence[Work], max_tokens: int) -> MicroBatch:
    """The first ``max_tokens`` tokens of a micro-batch (the scheduler's per-step cap)."""
    return cut_at(batch, max_tokens)[0] if num_tokens(batch) > max_tokens else list(batch)


def tokens_within(model: CostModel, seconds: float, limit: int) -> int:
    """The most tokens (at most ``limit``) of one fresh prefill chunk that a micro-batch can
    carry for at most ``seconds`` by ``model``; 0 when not even one fits."""
    lo, hi = 0, max(0, limit)  # predict(lo tokens) <= seconds, or lo == 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if model.predict([(0, mid)]) <= seconds:
            lo = mid
        else:
            hi = mid - 1
    return lo
