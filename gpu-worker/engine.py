"""The engine loop: ``step()`` = schedule -> execute -> update.

``LLMEngine`` wires a step runner (the model and its KV caches), the block manager, the
scheduler and the detokenizers together. Here the runner is the whole model in this process;
``pipeline/pipeline_engine.py`` subclasses it with a runner that is stage 0 of a pipeline group,
which keeps several steps in flight. It is transport-free: the worker process (and the
``kunserve generate`` CLI) drive it by calling ``add_request`` and ``step``.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
from tokenizers import Tokenizer

from kunserve.worker.block_manager import BlockManager
from kunserve.worker.checkpoint import TORCH_DTYPES, load_stage
from kunserve.worker.cost_model import CostModel
from kunserve.worker.detokenizer import IncrementalDetokenizer
from kunserve.worker.handover import RequestState, export_request, import_request
from kunserve.worker.instance_memory import kv_geometry, plan_instance_memory
from kunserve.worker.kv_cache import KVCache
from kunserve.worker.layer_range import LayerRange
from kunserve.worker.memory_budget import MemoryPlan
from kunserve.worker.model import paged_decode
from kunserve.worker.model_config import ModelConfig
from kunserve.worker.model_runner import ModelRunner
from kunserve.worker.request import Request, RequestStatus
from kunserve.worker.sampling_params import SamplingParams
from kunserve.worker.scheduler import Scheduler, SchedulerConfig
from kunserve.worker.scheduler_output import SchedulerOutput


@dataclass
class EngineConfig:
    model: str
    dtype: str = "float32"
    memory_per_instance: int | None = None  # bytes; None: parameters take 40% (CPU)
    # without memory_per_instance: KV = this x the whole model's parameter bytes
    kv_to_parameters: float | None = None
    reserve_bytes: int | None = None  # None: activation_reserve() for the largest step
    block_size: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    num_threads: int | None = None  # torch intra-op threads; None: torch's default
    num_stages: int = 1  # >1: run the model as that many chained in-process stages
    # host memory for swap preemption (the infercept policy), outside the budget; 0:
    # preemption recomputes; -1: as much as the KV cache holds
    swap_bytes: int = 0
    # lookahead micro-batching when several micro-batches are in flight (a pipeline group):
    # None: on when the model directory holds a cost model (``kunserve profile``)
    lookahead: bool | None = None
    cost_model: str | None = None  # its JSON; None: <model>/kunserve-cost-model.json
    lookahead_min_tokens: int = 32


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    invalid_request: bool = False  # the error is the request's (rejected at add_request)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


@dataclass
class Completion:
    """A finished request, as ``generate`` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


class StepRunner(Protocol):
    """What the engine loop drives. Up to ``depth`` submitted steps are in flight; ``collect``
    returns the sampled tokens of the oldest one (request id -> token)."""

    depth: int

    def submit(self, out: SchedulerOutput) -> None: ...

    def collect(self) -> dict[str, int]: ...

    def release(self, request_ids: list[str]) -> None:
        """Requests that left the engine (reported by a step that ran nothing)."""


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.tokenizer = _load_tokenizer(Path(config.model))
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.cost_model = _lookahead_cost_model(config, self.model_config)
        runner, memory = self._load_model()
        self.install(runner, memory)
        paged_decode.available()  # build or load the fused kernel now, not on the first request
        self._in_flight: deque[SchedulerOutput] = deque()
        # the last step ran nothing: nothing was in flight and nothing could be scheduled
        # (e.g. its blocks are held while a drop's KV moves); the caller may pause
        self.stalled = False
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._rejected: list[RequestOutput] = []
        self._next_id = 0

    def _load_model(self) -> tuple[StepRunner, MemoryPlan]:
        """The whole model in this process, as ``num_stages`` chained stages."""
        config, num_layers = self.config, self.model_config.num_layers
        self.stages = [
            load_stage(config.model, LayerRange.for_stage(r, config.num_stages, num_layers),
                       dtype=config.dtype)
            for r in range(config.num_stages)]
        params = sum(stage.parameter_bytes() for stage in self.stages)
        memory = plan_instance_memory(config, self.model_config, params, num_layers)
        # one stage reserves the whole budget but the reserve: dropping layers (a pipeline
        # group) turns parameter bytes into more blocks of the same range
        capacity = (memory.budget_bytes - memory.reserve_bytes if config.num_stages == 1
                    else None)
        self.kv_caches = [
            KVCache(kv_geometry(config, self.model_config, stage.layer_range.size),
                    memory.num_blocks, TORCH_DTYPES[config.dtype], capacity_bytes=capacity)
            for stage in self.stages]
        swap_bytes = memory.kv_bytes if config.swap_bytes < 0 else config.swap_bytes
        swap_blocks = swap_bytes // memory.block_bytes
        return ModelRunner(self.stages, self.kv_caches, swap_blocks), memory

    # -- reconfiguration (pipeline/reconfigure.py) -------------------------------------------
    def install(self, runner: StepRunner | None, memory: MemoryPlan,
                num_blocks: int | None = None) -> None:
        """Serve with ``runner`` and a fresh block manager of ``num_blocks`` (default:
        ``memory.num_blocks``); the engine must hold no requests. No runner: the engine does
        not serve (a pipeline member that is not the leader) but reports its memory."""
        # (requests rejected at add_request are no requests: their errors come with a step)
        if getattr(self, "scheduler", None) is not None and (self.scheduler.has_unfinished()
                                                              or self._in_flight):
            raise RuntimeError("export or finish the requests before changing the runner")
        preemptions = self.scheduler.num_preemptions if hasattr(self, "scheduler") else 0
        self.runner, self.memory = runner, memory
        self.block_manager = BlockManager(num_blocks or memory.num_blocks, self.config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens,
                            self.max_model_len,
                            num_micro_batches=runner.depth if runner is not None else 1,
                            cost_model=self.cost_model,
                            lookahead_min_tokens=self.config.lookahead_min_tokens,
                            swap_blocks=getattr(runner, "swap_blocks", 0)),
            self.block_manager)
        self.scheduler.num_preemptions = preemptions

    def export_requests(self, request_ids: Collection[str] | None = None
                        ) -> list[RequestState]:
        """Requests (all by default) with their progress and block table, removed from this
        engine, running ones first (call with nothing in flight: after ``drain``). Their blocks
        go back to the free list; their bytes stay as they are until a step reuses them."""
        if self._in_flight:
            raise RuntimeError("steps are in flight: drain first")
        self.runner.release(self.scheduler.take_finished())
        scheduler = self.scheduler
        chosen = set(scheduler.requests) if request_ids is None else set(request_ids)
        for request in scheduler.swapped:  # their KV is on the host: recompute
            if request.request_id in chosen:
                scheduler.host_blocks.free(request.request_id)
                request.num_computed_tokens = 0
        states = []
        for request in [*scheduler.running, *scheduler.swapped, *scheduler.waiting]:
            if request.request_id not in chosen:
                continue
            detok = self._detokenizers.pop(request.request_id, None)
            states.append(export_request(request,
                                         self.block_manager.block_table(request.request_id),
                                         detok.export_state() if detok else None))
        for state in states:
            del scheduler.requests[state.request_id]
            self.block_manager.free(state.request_id)
        for queue in (scheduler.running, scheduler.swapped, scheduler.waiting):
            kept = [r for r in queue if r.request_id not in chosen]
            queue.clear()
            queue.extend(kept)
        scheduler.forget_plan()
        return states

    def abandon_requests(self) -> list[Request]:
        """Every request, removed from the engine with whatever was in flight (the runner
        broke): the caller requeues them. Their detokenizers stay."""
        self._in_flight.clear()
        requests = [*self.scheduler.running, *self.scheduler.swapped, *self.scheduler.waiting]
        self.scheduler.requests.clear()
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()
        return requests

    def adopt_requests(self, states: list[RequestState], tables: dict[str, list[int]],
                       first: bool = False) -> None:
        """Take over requests exported elsewhere; ``tables``: their blocks here. ``first``:
        they were admitted before every request here (a drop's requests whose KV arrived
        while the group served newer ones), so they go ahead of them."""
        self.block_manager.adopt({s.request_id: tables[s.request_id] for s in states})
        self.scheduler.adopt_all([import_request(s) for s in states], first=first)
        self.resume_detokenizers(states)

    def resume_detokenizers(self, states: list[RequestState]) -> None:
        """Carry on each request's text where its state left it."""
        for state in states:
            if state.detokenizer is not None and self.tokenizer is not None:
                self._detokenizers[state.request_id] = IncrementalDetokenizer.resume(
                    self.tokenizer, state.detokenizer)

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, resumed_tokens: int = 0) -> str:
        """Queue a request. An invalid one (too long, bad token ids) is not raised: it comes
        back from the next ``step`` as finished with ``finish_reason='error'`` and the reason,
        so the other requests carry on. ``resumed_tokens``: the last that many tokens of the
        prompt are output the request already produced elsewhere (a failover's resubmission;
        ``params.max_tokens`` counts what is left): they count as output for the penalties,
        a seeded request's random stream starts past their draws, and their text comes first
        in the request's first output (``IncrementalDetokenizer.replay``)."""
        params = params or SamplingParams()
        request_id = request_id or self._new_id()
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        error = self._check_prompt(prompt_ids)
        if error is None and not 0 <= resumed_tokens < len(prompt_ids):
            error = (f"resumed_tokens must be in [0, {len(prompt_ids)}) for a prompt of "
                     f"{len(prompt_ids)} tokens, got {resumed_tokens}")
        if error:
            self._rejected.append(RequestOutput(request_id, [], "", True, "error", error,
                                                invalid_request=True,
                                                num_prompt_tokens=len(prompt_ids)))
            return request_id
        split = len(prompt_ids) - resumed_tokens
        if resumed_tokens:
            params = replace(params, max_tokens=params.max_tokens + resumed_tokens)
        request = Request(request_id, prompt_ids[:split], params,
                          self.model_config.eos_token_ids, arrival_time=time.monotonic(),
                          output_token_ids=prompt_ids[split:])
        self.scheduler.add_request(request)
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids[:split],
                                                 stop=params.stop)
            detokenizer.replay(prompt_ids[split:])  # their text comes with the first output
            self._detokenizers[request_id] = detokenizer
        return request_id

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: pass prompt token ids")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _check_prompt(self, prompt_ids: list[int]) -> str | None:
        if not prompt_ids:
            return "the prompt is empty"
        if len(prompt_ids) >= self.max_model_len:
            return (f"the prompt has {len(prompt_ids)} tokens; this model's maximum context "
                    f"length is {self.max_model_len} (prompt plus at least one output token)")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            return f"prompt token ids must be in [0, {vocab})"
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if len(prompt_ids) + 1 > capacity:
            return (f"the prompt needs {len(prompt_ids) + 1} tokens of KV cache but this "
                    f"instance holds only {capacity}")
        return None

    def abort_request(self, request_id: str) -> None:
        self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        self._detokenizers.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._rejected or self._in_flight)

    def _new_id(self) -> str:
        self._next_id += 1
        return f"req-{self._next_id}"

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Fill the runner with up to ``depth`` scheduled steps, then take back the oldest."""
        outputs = self.take_rejected()
        idle = not self._in_flight
        submitted = self.fill()
        outputs += self._collect()
        self.stalled = idle and not submitted and not outputs
        return outputs

    def drain(self) -> list[RequestOutput]:
        """Take back every step in flight without scheduling more."""
        outputs = []
        while self._in_flight:
            outputs += self._collect()
        return outputs

    def take_rejected(self) -> list[RequestOutput]:
        """The errors of requests ``add_request`` rejected since the last step (which would
        return them), for a caller that cannot step now."""
        rejected, self._rejected = self._rejected, []
        return rejected

    @property
    def num_in_flight(self) -> int:
        """Scheduled steps handed to the runner and not taken back yet."""
        return len(self._in_flight)

    def fill(self) -> int:
        """Hand the runner scheduled steps up to its depth without taking any back (``step``
        does, then takes the oldest back; a drop's leader alone starts the requests that can
        run while the KV of the others is still moving). Returns how many it handed over."""
        submitted = 0
        while len(self._in_flight) < self.runner.depth:
            scheduled = self.scheduler.schedule()
            if scheduled.is_empty:
                self.runner.release(scheduled.finished)
                break
            self.runner.submit(scheduled)
            self._in_flight.append(scheduled)
            submitted += 1
        return submitted

    def _collect(self) -> list[RequestOutput]:
        """Update from the oldest step in flight (or from none: reports capped requests)."""
        scheduled, sampled = SchedulerOutput(), {}
        if self._in_flight:
            scheduled, sampled = self._in_flight.popleft(), self.runner.collect()
        return [self._output(request, new_ids)
                for request, new_ids in self.scheduler.update_from_output(scheduled, sampled)]

    def _output(self, request: Request, new_ids: list[int]) -> RequestOutput:
        text = ""
        detok = self._detokenizers.get(request.request_id)
        if detok is not None:
            text = detok.append(new_ids)
            if detok.stopped and not request.finished:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
            elif request.finished:
                text += detok.flush()
            if request.finished:
                del self._detokenizers[request.request_id]
        return RequestOutput(request.request_id, new_ids, text, request.finished,
                             request.status.finish_reason,
                             num_prompt_tokens=request.num_prompt_tokens,
                             num_output_tokens=request.num_output_tokens)

    def generate(self, prompts: list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Run all prompts concurrently to completion; results in input order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        results = {
            i: Completion(i, self._prompt_ids(p)) for i, p in zip(ids, prompts, strict=True)}
        while self.has_unfinished():
            for out in self.step():
                done = results[out.request_id]
                done.token_ids.extend(out.new_token_ids)
                done.text += out.new_text
                if out.finished:
                    done.finish_reason, done.error = out.finish_reason, out.error
        return [results[i] for i in ids]

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        return self.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def memory_report(self) -> dict[str, int]:
        usage = self.block_manager.usage()
        return {
            "budget_bytes": self.memory.budget_bytes,
            "parameter_bytes": self.memory.parameter_bytes,
            "reserve_bytes": self.memory.reserve_bytes,
            "kv_bytes": sum(cache.nbytes for cache in self.kv_caches),
            "block_bytes": self.memory.block_bytes,
            "blocks_total": usage.total,
            "blocks_used": usage.used,
            "blocks_free": usage.free,
        }


def _lookahead_cost_model(config: EngineConfig, model: ModelConfig) -> CostModel | None:
    """The cost model lookahead micro-batching uses, None when it is off: the given or saved
    JSON, else (lookahead asked for) an estimate from the model's shape."""
    if config.lookahead is False:
        return None
    if config.cost_model is not None:
        return CostModel.load(config.cost_model)
    found = CostModel.find(config.model)
    if found is None and config.lookahead:
        return CostModel.estimate(model)
    return found


def _load_tokenizer(path: Path) -> Tokenizer | None:
    file = path / "tokenizer.json"
    return Tokenizer.from_file(str(file)) if file.is_file() else None


def default_num_threads() -> int:
    return max(1, os.cpu_count() or 1)
