"""Request fields -> the wire ``Sampling``, checked against the served model's limits.

Value ranges are the worker's own ``SamplingParams.validate`` (one source of truth); this
module adds what only the gateway knows: defaults per endpoint, the context length, the vocab.
"""

from __future__ import annotations

import dataclasses

from kunserve.gateway.errors import bad_request, context_length_exceeded
from kunserve.gateway.openai_schemas import SamplingFields
from kunserve.gateway.served_model import ServedModel
from kunserve.protocol import Sampling
from kunserve.worker.sampling_params import SamplingParams

WIRE_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def check_prompt_length(num_prompt_tokens: int, model: ServedModel, param: str) -> None:
    """At least one token of room must be left for the output."""
    if num_prompt_tokens == 0:
        raise bad_request(f"{param} is empty", param)
    if num_prompt_tokens >= model.max_model_len:
        raise context_length_exceeded(
            f"This model's maximum context length is {model.max_model_len} tokens. However, "
            f"your prompt has {num_prompt_tokens} tokens, which leaves no room for output. "
            "Please shorten the prompt.", param)


def check_token_ids(token_ids: list[int], model: ServedModel, param: str) -> None:
    if any(not 0 <= t < model.vocab_size for t in token_ids):
        bad = next(t for t in token_ids if not 0 <= t < model.vocab_size)
        raise bad_request(f"token id {bad} is out of the vocabulary [0, {model.vocab_size})",
                          param)


def build_sampling(fields: SamplingFields, num_prompt_tokens: int, model: ServedModel,
                   default_max_tokens: int | None) -> Sampling:
    """``default_max_tokens`` None: up to the end of the context (chat)."""
    max_tokens = fields.max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens or model.max_model_len - num_prompt_tokens
    params = {name: getattr(fields, name) for name in WIRE_FIELDS - {"max_tokens", "stop"}}
    stop = [fields.stop] if isinstance(fields.stop, str) else fields.stop
    try:
        checked = SamplingParams(max_tokens=max_tokens, stop=stop or [],
                                 **{k: v for k, v in params.items() if v is not None})
    except ValueError as exc:
        param = str(exc).split(" ", 1)[0]
        raise bad_request(str(exc), param if param in WIRE_FIELDS else None) from None
    if num_prompt_tokens + max_tokens > model.max_model_len:
        raise context_length_exceeded(
            f"This model's maximum context length is {model.max_model_len} tokens. However, "
            f"you requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in "
            f"the prompt, {max_tokens} in the completion). Please reduce the prompt or "
            "max_tokens.", "max_tokens")
    check_token_ids(checked.stop_token_ids, model, "stop_token_ids")
    return Sampling(**dataclasses.asdict(checked))
