"""Samples one token per sampling chunk and owns the seeded generators, keyed by request id.

A generator is made on a request's first sample here and lives until the engine says the
request finished (``forget``), so a seeded request draws from one stream for its whole life,
across preemptions and whatever shares its batch; a request that arrives with tokens it
produced elsewhere (a failover's resubmission, a group's fallback) starts its stream past the
draws they took. It lives next to the logits: in a pipeline group,
on the last stage. The token choice itself is ``sampler.py``'s.
"""

from __future__ import annotations

import time

import torch

from kunserve.worker.sampler import Sampler, make_generator, skip_draws
from kunserve.worker.sampling_params import SamplingParams
from kunserve.worker.scheduler_output import ScheduledChunk


class RequestSampler:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.sampler = Sampler()
        self.busy_seconds = 0.0
        self._generators: dict[str, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, chunks: list[ScheduledChunk]) -> list[int]:
        """One token per row of ``logits`` (S, V), row ``i`` being ``chunks[i]``'s."""
        start = time.perf_counter()
        tokens = self.sampler(
            logits,
            [c.sampling_params for c in chunks],
            [c.output_token_ids for c in chunks],
            [self._generator(c, logits.shape[-1]) for c in chunks],
        )
        self.busy_seconds += time.perf_counter() - start
        return tokens

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._generators.pop(request_id, None)

    def export_generators(self, request_ids: list[str] | None = None) -> dict[str, bytes]:
        """The random-stream positions of these requests (all by default), removed here; a
        request that has not sampled yet has none (it starts from its seed wherever it goes)."""
        ids = list(self._generators) if request_ids is None else request_ids
        return {rid: bytes(self._generators.pop(rid).get_state().numpy())
                for rid in ids if rid in self._generators}

    def import_generators(self, states: dict[str, bytes], params: dict[str, SamplingParams]
                          ) -> None:
        """Resume the streams ``export_generators`` gave (``params``: each request's)."""
        for rid, state in states.items():
            generator = make_generator(params[rid], self.device)
            generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
            self._generators[rid] = generator

    @property
    def num_generators(self) -> int:
        return len(self._generators)

    def _generator(self, chunk: ScheduledChunk, vocab_size: int) -> torch.Generator | None:
        """The request's stream; a new one starts where the request's earlier tokens (sampled
        elsewhere, or before a group fell back) left it."""
        if chunk.sampling_params.seed is None:
            return None
        generator = self._generators.get(chunk.request_id)
        if generator is None:
            generator = make_generator(chunk.sampling_params, self.device)
            skip_draws(generator, vocab_size, chunk.num_output_tokens)
            self._generators[chunk.request_id] = generator
        return generator
