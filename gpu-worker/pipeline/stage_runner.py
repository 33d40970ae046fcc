"""What every rank but the leader runs for one epoch: receive, compute its stage, pass on.

Loop until ``StopPipeline``: receive a micro-batch's chunks (``StageBatch``) and hidden states
from rank ``r-1``; build the same ``StepInputs`` the leader built; run this rank's layers
against its own KV cache; then either send the chunks (the very bytes received) and the new
hidden states on to ``r+1``, or, on the last rank, compute logits, sample (the seeded
generators live here, dropped when a batch lists their request as finished) and send the
token ids to rank 0. The runner keeps no request state besides the generators: the block
tables come with every batch. Its job ends when the epoch does; forming the next group is the
worker's.
"""

from __future__ import annotations

import msgspec
import torch

from kunserve.worker.engine import EngineConfig
from kunserve.worker.model_config import ModelConfig
from kunserve.worker.pipeline.group_member import GroupMember, join_group
from kunserve.worker.pipeline.stage_link import StageLink, StageLinkError
from kunserve.worker.pipeline.stage_messages import (
    PipelineStopped,
    SampledTokens,
    StageBatch,
    StageMessage,
    StopPipeline,
)
from kunserve.worker.request_sampler import RequestSampler
from kunserve.worker.step_inputs import StepInputs, prepare_inputs


class StageRunner:
    def __init__(self, config: EngineConfig, link: StageLink) -> None:
        if link.is_leader:
            raise ValueError("rank 0 is the leader: it runs PipelineEngine, not StageRunner")
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.link = link
        self.model_config = ModelConfig.from_dir(config.model)
        self.member: GroupMember = join_group(config, self.model_config, link)
        self.executor = self.member.executor
        self.dtype = self.executor.kv_cache.storage.dtype
        self.sampler = RequestSampler(self.executor.kv_cache.storage.device) \
            if link.is_last else None
        self.num_batches = 0

    def run(self) -> list[float]:
        """Serve micro-batches until the leader stops the epoch; returns every rank's busy
        seconds as far as this rank knows them (all of them on the last rank)."""
        decoder = msgspec.msgpack.Decoder(StageMessage)
        with torch.inference_mode():
            while True:
                raw = self.link.recv_bytes(self.link.rank - 1, idle=True)
                message = self._decode(decoder, raw)
                if isinstance(message, StopPipeline):
                    return self._stop(message)
                self._serve(message, raw)

    def _serve(self, batch: StageBatch, raw: bytes) -> None:
        inputs = prepare_inputs(batch.chunks, self.executor.block_size)
        hidden = self.link.recv_tensor((inputs.num_tokens, self.model_config.hidden_size),
                                       self.dtype, self.link.rank - 1)  # (N, H)
        hidden = self.executor.forward(hidden, inputs)  # (N, H)
        if self.sampler is None:
            self.link.send_bytes(raw, self.link.rank + 1)
            self.link.send_tensor(hidden, self.link.rank + 1)
        else:
            self.link.send_message(SampledTokens(seq=batch.seq,
                                                 token_ids=self._sample(batch, hidden, inputs)),
                                   0)
        self.num_batches += 1

    def _sample(self, batch: StageBatch, hidden: torch.Tensor, inputs: StepInputs) -> list[int]:
        assert self.sampler is not None
        self.sampler.forget(batch.finished)
        if not inputs.sampling_chunks:
            return []
        logits = self.executor.logits(hidden, inputs)  # (S, V)
        return self.sampler.sample(logits, inputs.sampling_chunks)

    def _stop(self, message: StopPipeline) -> list[float]:
        busy = [*message.busy_seconds, self.busy_seconds]
        if self.link.is_last:
            self.link.send_message(PipelineStopped(busy_seconds=busy), 0)
        else:
            self.link.send_message(StopPipeline(busy_seconds=busy), self.link.rank + 1)
        self.link.flush()
        return busy

    @property
    def busy_seconds(self) -> float:
        sampling = self.sampler.busy_seconds if self.sampler is not None else 0.0
        return self.executor.busy_seconds + sampling

    def _decode(self, decoder: msgspec.msgpack.Decoder, raw: bytes) -> StageBatch | StopPipeline:
        try:
            return decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise StageLinkError(f"epoch {self.link.epoch}: rank {self.link.rank - 1} sent "
                                 f"something that is not a stage message: {exc}") from exc
