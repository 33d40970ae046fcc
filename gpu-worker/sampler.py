"""Turn one step's last-position logits into one next token per request.

The sampler's job starts at a ``(B, V)`` logits tensor (one row per request sampling this
step) and ends at a list of token ids. It applies, in this order: presence/frequency
penalties, then for greedy rows an argmax, and for random rows temperature, top-k, top-p and
a draw from the softmax. It does not decide when a request stops (EOS, ``stop_token_ids``,
``max_tokens``) and never sees text: that is the engine's and the detokenizer's job.

Reproducibility contract: a row with its own ``torch.Generator`` (a seeded request) draws
only from that generator, exactly once per step in which it samples (greedy rows draw
nothing), and every transformation of its logits is row-local. So a seeded request gets the
same tokens from the same logits whatever else shares the batch and whatever its row index.
Unseeded random rows are drawn together from the global RNG of the logits' device.
"""

from __future__ import annotations

import torch

from kunserve.worker.sampling_params import SamplingParams


def make_generator(
    params: SamplingParams, device: torch.device | str = "cpu"
) -> torch.Generator | None:
    """The per-request generator the sampler expects for ``params``: None when unseeded.

    Create it once per request (at admission) on the device the logits live on, and pass the
    same object every step; its state is the request's position in its random stream.
    """
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def skip_draws(generator: torch.Generator, vocab_size: int, samples: int) -> None:
    """Advance ``generator`` past the random numbers ``samples`` sampled tokens took: a
    request that already produced that many tokens somewhere else (a failover's resubmission,
    a group's fallback) goes on with the draws it would have made next. One sample of a
    ``vocab_size`` row leaves the generator where an ``exponential_`` of ``vocab_size``
    entries does, whatever the probabilities (checked with torch 2.13's CPU generator). The
    generator cannot jump ahead, so this costs what drawing them does: about 2.3 ms per token
    for a 152k vocabulary on this CPU (24 us for 1k), on the engine's thread."""
    ones = torch.ones(vocab_size, device=generator.device)
    for _ in range(samples):
        torch.multinomial(ones, 1, generator=generator)


def apply_penalties(
    logits: torch.Tensor, params: list[SamplingParams], output_token_ids: list[list[int]]
) -> torch.Tensor:
    """Subtract OpenAI-style presence and frequency penalties; returns ``logits`` untouched
    (same object) when no row has penalties and output tokens, otherwise a new tensor.

    ``logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)``, where
    ``count[t]`` is how often token ``t`` appears in that request's output so far.
    """
    rows = [i for i, p in enumerate(params) if p.has_penalties and output_token_ids[i]]
    if not rows:
        return logits
    device, dtype = logits.device, logits.dtype
    counts = _token_counts([output_token_ids[i] for i in rows], logits.shape[1], device, dtype)
    frequency = torch.tensor(
        [params[i].frequency_penalty for i in rows], device=device, dtype=dtype
    )
    presence = torch.tensor([params[i].presence_penalty for i in rows], device=device, dtype=dtype)
    penalty = counts * frequency[:, None] + (counts > 0).to(dtype) * presence[:, None]  # (P, V)
    index = torch.tensor(rows, device=device)  # (P,)
    penalized = logits.clone()  # (B, V)
    penalized[index] -= penalty
    return penalized


def _token_counts(
    token_lists: list[list[int]], vocab_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``(P, V)`` occurrence counts of each token in each list, built with one scatter_add_."""
    lengths = [len(ids) for ids in token_lists]
    width = max(lengths)
    padded = [ids + [0] * (width - len(ids)) for ids in token_lists]
    ids = torch.tensor(padded, dtype=torch.long, device=device)  # (P, L)
    length = torch.tensor(lengths, device=device)  # (P,)
    valid = (torch.arange(width, device=device)[None, :] < length[:, None]).to(dtype)  # (P, L)
    counts = torch.zeros(len(token_lists), vocab_size, device=device, dtype=dtype)  # (P, V)
    return counts.scatter_add_(1, ids, valid)


def _needs_filter(params: SamplingParams, vocab_size: int) -> bool:
    return 0 < params.top_k < vocab_size or params.top_p < 1.0


def apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Set to ``-inf`` the logits each row's top-k and then top-p filters drop.

    Top-k keeps the ``k`` highest logits, top-p then keeps the smallest set of the highest
    remaining probabilities whose sum reaches ``top_p`` (at least one token). Ties are ranked
    by index (a stable sort), so ``top_k == 1`` keeps exactly the argmax. Rows that filter
    nothing are not touched at all, which keeps every row's result independent of its batch.
    Returns ``logits`` itself when no row filters, otherwise a new tensor.
    """
    vocab_size = logits.shape[1]
    rows = [i for i, p in enumerate(params) if _needs_filter(p, vocab_size)]
    if not rows:
        return logits
    device = logits.device
    index = torch.tensor(rows, device=device)  # (F,)
    subset = logits[index]  # (F, V)
    sorted_logits, order = subset.sort(dim=-1, descending=True, stable=True)  # (F, V)
    top_k = [params[i].top_k if params[i].top_k > 0 else vocab_size for i in rows]
    k = torch.tensor(top_k, device=device)  # (F,)
    drop = torch.arange(vocab_size, device=device)[None, :] >= k[:, None]  # (F, V)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))  # (F, V)
    top_p = torch.tensor([params[i].top_p for i in rows], device=device, dtype=logits.dtype)
    probs = sorted_logits.softmax(dim=-1)  # (F, V)
    mass_before = torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))  # (F, V)
    drop |= (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]  # (F, V)
    unsorted_drop = torch.empty_like(drop).scatter_(1, order, drop)  # (F, V)
    filtered = logits.clone()  # (B, V)
    filtered[index] = subset.masked_fill(unsorted_drop, float("-inf"))
    return filtered


class Sampler:
    """Stateless: all per-request state (output tokens, generators) is passed in each step."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
    ) -> list[int]:
        """One token per row of ``logits`` ``(B, V)``; the caller's tensor is never modified."""
        _check_batch(logits, params, output_token_ids, generators)
        if all(p.greedy and not p.has_penalties for p in params):
            return logits.argmax(dim=-1).tolist()  # (B,)
        logits = apply_penalties(logits, params, output_token_ids)  # (B, V)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not random_rows:
            return logits.argmax(dim=-1).tolist()  # (B,)
        tokens = logits.argmax(dim=-1)  # (B,) greedy rows keep theirs, random rows overwritten
        index = torch.tensor(random_rows, device=logits.device)  # (R,)
        tokens[index] = _sample(
            logits[index],
            [params[i] for i in random_rows],
            [generators[i] for i in random_rows],
        )
        return tokens.tolist()


def _sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Draw one token per row of ``(R, V)`` non-greedy logits; returns ``(R,)`` token ids."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device, dtype=logits.dtype)
    scaled = logits / temperature[:, None]  # (R, V)
    probs = apply_top_k_top_p(scaled, params).softmax(dim=-1)  # (R, V)
    tokens = torch.empty(len(params), dtype=torch.long, device=device)  # (R,)
    unseeded = []
    for row, generator in enumerate(generators):
        if generator is None:
            unseeded.append(row)
        else:
            tokens[row] = torch.multinomial(probs[row], 1, generator=generator)[0]
    if unseeded:
        index = torch.tensor(unseeded, device=device)  # (U,)
        tokens[index] = torch.multinomial(probs[index], 1).squeeze(1)  # (U,)
    return tokens


def _check_batch(
    logits: torch.Tensor,
    params: list[SamplingParams],
    output_token_ids: list[list[int]],
    generators: list[torch.Generator | None],
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    if not len(params) == len(output_token_ids) == len(generators) == batch:
        raise ValueError(
            f"batch mismatch: {batch} logits rows, {len(params)} params, "
            f"{len(output_token_ids)} output lists, {len(generators)} generators"
        )
