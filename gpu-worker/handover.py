"""A request as plain data, so that it can move to another engine with its progress: the
group leader at a drop, a member at a restore. Pure: no torch.

What moves is everything the receiving engine needs to carry on as if nothing happened: the
tokens so far, the progress counter (the KV of the computed tokens moves separately, by
``pipeline/kv_transfer.py``), the block table in the sender's numbering, whether it was
running, and the detokenizer's position (so no text is repeated or lost). A seeded request's
random stream moves with the sampler (``RequestSampler.export_generators``).
"""

from __future__ import annotations

import msgspec

from kunserve.worker.detokenizer import DetokenizerState
from kunserve.worker.request import Request, RequestStatus
from kunserve.worker.sampling_params import SamplingParams


class RequestState(msgspec.Struct, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    num_computed_tokens: int
    running: bool
    block_table: list[int]
    num_preemptions: int = 0
    detokenizer: DetokenizerState | None = None


def export_request(request: Request, block_table: list[int],
                   detokenizer: DetokenizerState | None) -> RequestState:
    return RequestState(
        request_id=request.request_id, prompt_token_ids=list(request.prompt_token_ids),
        output_token_ids=list(request.output_token_ids), sampling_params=request.sampling_params,
        eos_token_ids=list(request.eos_token_ids),
        num_computed_tokens=request.num_computed_tokens,
        running=request.status == RequestStatus.RUNNING, block_table=list(block_table),
        num_preemptions=request.num_preemptions, detokenizer=detokenizer)


def import_request(state: RequestState) -> Request:
    return Request(state.request_id, list(state.prompt_token_ids), state.sampling_params,
                   tuple(state.eos_token_ids), output_token_ids=list(state.output_token_ids),
                   num_computed_tokens=state.num_computed_tokens,
                   status=RequestStatus.RUNNING if state.running else RequestStatus.WAITING,
                   num_preemptions=state.num_preemptions)
