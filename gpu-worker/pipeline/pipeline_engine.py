"""The leader of a pipeline group: ``LLMEngine``'s surface, the model spread over ``g`` ranks.

Rank 0 owns the scheduler, the detokenizers and the request outputs for the whole group and
runs stage 0 itself; ranks ``1..g-1`` run ``StageRunner``. Up to ``max_in_flight`` (default:
``g``) micro-batches are in flight, so while micro-batch ``k`` is in later stages the leader
schedules and runs stage 0 of ``k+1``; the scheduler skips requests whose previous chunk has
not come back. ``add_request``, ``abort_request``, ``step``, ``has_unfinished``, ``generate``
and ``memory_report`` behave as ``LLMEngine``'s, so the worker process can drive either.
Forming the group (the epoch's ``StageLink``) is the caller's; ``close`` ends the epoch.
"""

from __future__ import annotations

from kunserve.worker.engine import EngineConfig, LLMEngine, RequestOutput, StepRunner
from kunserve.worker.memory_budget import MemoryPlan
from kunserve.worker.pipeline.group_member import join_group
from kunserve.worker.pipeline.leader_runner import LeaderRunner
from kunserve.worker.pipeline.stage_link import StageLink, StageLinkError


class PipelineEngine(LLMEngine):
    def __init__(self, config: EngineConfig, link: StageLink, *, num_blocks: int | None = None,
                 max_in_flight: int | None = None) -> None:
        """``num_blocks``: the group's KV blocks (None: what the smallest member's budget
        holds); ``max_in_flight``: micro-batches in flight (None: one per stage)."""
        if config.num_stages != 1:
            raise ValueError("num_stages chains stages in one process; a pipeline group "
                             "takes its stages from the link")
        if not link.is_leader:
            raise ValueError("PipelineEngine runs on rank 0; other ranks run StageRunner")
        self.link = link
        self._num_blocks = num_blocks
        self._depth = max_in_flight or link.size
        self.busy_seconds: list[float] | None = None  # per rank, filled by close()
        self._closed = False
        super().__init__(config)

    def _load_model(self) -> tuple[StepRunner, MemoryPlan]:
        member = join_group(self.config, self.model_config, self.link, self._num_blocks)
        self.stages = [member.executor.stage]
        self.kv_caches = [member.executor.kv_cache]
        return LeaderRunner(member.executor, self.link, self._depth), member.memory

    @property
    def leader_runner(self) -> LeaderRunner:
        assert isinstance(self.runner, LeaderRunner)
        return self.runner

    def memory_report(self) -> dict[str, int]:
        """The leader's own memory (its layers' parameters and KV) and the group's blocks."""
        return {**super().memory_report(), "group_size": self.link.size,
                "epoch": self.link.epoch}

    def close(self) -> list[RequestOutput]:
        """End the epoch: take back the micro-batches in flight, stop every stage and record
        each rank's busy seconds in ``busy_seconds``. Returns the drained micro-batches'
        outputs (publish them); unfinished requests stay in the scheduler. On a broken group
        it only releases the link (the error was raised where it happened)."""
        if self._closed:
            return []
        self._closed = True
        try:
            if self.leader_runner.broken is not None:
                return []
            outputs = self.drain()
            self.busy_seconds = self.leader_runner.stop()
            return outputs
        finally:
            self.link.close()

    def __enter__(self) -> PipelineEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.close()
        except StageLinkError:
            if exc_info[0] is None:
                raise  # else already failing: the first error is the one to see
