"""What every rank but the leader runs for one epoch: receive, compute its stage, pass on.

Loop until ``StopPipeline``: receive a micro-batch's chunks (``StageBatch``) and hidden states
from rank ``r-1``; build the same ``StepInputs`` the leader built; run this rank's layers
against its own KV cache; then either send the chunks (the very bytes received) and the new
hidden states on to ``r+1``, or, on the last rank, compute logits, sample (the seeded
generators live here, dropped when a batch lists their request as finished) and send the
token ids to rank 0. The runner keeps no request state besides the generators: the block
tables come with every batch. Its job ends when the epoch does (``StopPipeline``) or when the
leader starts a restore (``BeginRestore``, handed to the caller); forming the next group is the
worker's.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import torch

from kunserve.worker.engine import EngineConfig
from kunserve.worker.model_config import ModelConfig
from kunserve.worker.pipeline.group_member import GroupMember, join_group
from kunserve.worker.pipeline.stage_link import Received, StageLink, StageLinkError
from kunserve.worker.pipeline.stage_messages import (
    BeginRestore,
    PipelineStopped,
    SampledTokens,
    StageBatch,
    StageMessage,
    StopPipeline,
)
from kunserve.worker.request_sampler import RequestSampler
from kunserve.worker.scheduler_output import ScheduledChunk
from kunserve.worker.stage_executor import StageExecutor
from kunserve.worker.step_inputs import StepInputs, prepare_inputs


class StageRunner:
    def __init__(self, link: StageLink, executor: StageExecutor, model_config: ModelConfig,
                 sampler: RequestSampler | None = None,
                 landed: Callable[[list[ScheduledChunk]], bool] | None = None,
                 served: Callable[[], None] | None = None) -> None:
        """``executor``: this rank's layers and KV cache; ``sampler`` (last rank): the seeded
        generators (a new one when None); ``landed``: called with a micro-batch's chunks
        before its layers run, until it returns True, while a drop's KV still moves here
        (``KVExchange.wait_landed``: waits when they need it); ``served``: called after each
        micro-batch (a drop's ``ParamsRelease``)."""
        if link.is_leader:
            raise ValueError("rank 0 is the leader: it runs PipelineEngine, not StageRunner")
        self.link = link
        self.model_config = model_config
        self.executor = executor
        self.dtype = self.executor.kv_cache.storage.dtype
        self.sampler = None
        if link.is_last:
            self.sampler = sampler or RequestSampler(self.executor.kv_cache.storage.device)
        self._landed = landed
        self._served = served
        self.num_batches = 0
        self.busy_report: list[float] = []  # every rank's busy seconds, once stopped

    @classmethod
    def join(cls, config: EngineConfig, link: StageLink) -> StageRunner:
        """Load this rank's layers from the checkpoint and join the group
        (``group_member.join_group``)."""
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        model_config = ModelConfig.from_dir(config.model)
        member: GroupMember = join_group(config, model_config, link)
        return cls(link, member.executor, model_config)

    def run(self) -> BeginRestore | None:
        """Serve micro-batches until the leader stops the epoch (None; ``busy_report`` then
        holds every rank's busy seconds as far as this rank knows them, all of them on the
        last rank) or starts a restore (the ``BeginRestore``, already forwarded)."""
        decoder = msgspec.msgpack.Decoder(StageMessage)
        prev = self.link.rank - 1
        with torch.inference_mode():
            while True:
                received = self.link.recv_frame(prev, idle=True)
                message = self._decode(decoder, received.data)
                if isinstance(message, StopPipeline):
                    self.busy_report = self._stop(message)
                    return None
                if isinstance(message, BeginRestore):
                    if not self.link.is_last:
                        self.link.send_frame(received.data, self.link.rank + 1)
                    return message
                # a micro-batch: another message will follow it, so its receive can be
                # posted now, before this one's forward pass
                self.link.post_ahead(prev)
                self._serve(message, received)

    def _serve(self, batch: StageBatch, received: Received) -> None:
        inputs = prepare_inputs(batch.chunks, self.executor.block_size)
        hidden = received.tensor((inputs.num_tokens, self.model_config.hidden_size),
                                 self.dtype)  # (N, H)
        if self._landed is not None and self._landed(batch.chunks):
            self._landed = None
        hidden = self.executor.forward(hidden, inputs)  # (N, H)
        if self.sampler is None:
            self.link.send_frame(received.data, self.link.rank + 1, hidden)
        else:
            self.link.send_message(SampledTokens(seq=batch.seq,
                                                 token_ids=self._sample(batch, hidden, inputs)),
                                   0)
        self.num_batches += 1
        if self._served is not None:
            self._served()

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

    def _decode(self, decoder: msgspec.msgpack.Decoder, raw: bytes) -> StageMessage:
        try:
            return decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise StageLinkError(f"epoch {self.link.epoch}: rank {self.link.rank - 1} sent "
                                 f"something that is not a stage message: {exc}") from exc
