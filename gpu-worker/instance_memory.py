"""How one instance sizes its KV cache from its ``EngineConfig``: solo (the whole model) or a
pipeline-group member (a layer range of it).

The budget is the instance's, whatever it holds: without ``memory_per_instance`` it is the one
that makes the *whole model's* parameters 40% of it, or (``kv_to_parameters``) the whole
model's parameters plus that many times as much KV (plus the reserve either way), so a member holding
``1/g`` of the layers turns the parameter bytes it does not hold into KV blocks, which is the
point of dropping parameters. The arithmetic is ``memory_budget.py``'s; this module only
gathers its inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kunserve.worker.checkpoint import TORCH_DTYPES
from kunserve.worker.layer_range import LayerRange
from kunserve.worker.memory_budget import (
    KVGeometry,
    MemoryBudgetError,
    MemoryPlan,
    activation_reserve,
    default_cpu_budget,
    plan_memory,
)
from kunserve.worker.model.llama import LlamaStage
from kunserve.worker.model_config import ModelConfig

if TYPE_CHECKING:
    from kunserve.worker.engine import EngineConfig


def kv_geometry(config: EngineConfig, model: ModelConfig, layers_held: int) -> KVGeometry:
    return KVGeometry(layers_held=layers_held, block_size=config.block_size,
                      num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
                      dtype_bytes=TORCH_DTYPES[config.dtype].itemsize)


def model_parameter_bytes(model: ModelConfig, dtype: str) -> int:
    """Bytes of the whole model's parameters as this engine holds them (counted on the meta
    device: nothing is read or allocated)."""
    with torch.device("meta"):
        whole = LlamaStage(model, LayerRange.full(model.num_layers), TORCH_DTYPES[dtype])
    return whole.parameter_bytes()


def plan_instance_memory(config: EngineConfig, model: ModelConfig, parameter_bytes: int,
                         layers_held: int, whole_model_bytes: int | None = None) -> MemoryPlan:
    """``parameter_bytes``: what this instance holds; ``whole_model_bytes`` (default: the
    same) sizes the default budget."""
    reserve = config.reserve_bytes
    if reserve is None:
        reserve = activation_reserve(model.hidden_size, model.intermediate_size,
                                     model.q_size + 2 * model.kv_size, model.vocab_size,
                                     config.max_num_batched_tokens, config.max_num_seqs,
                                     TORCH_DTYPES[config.dtype].itemsize)
    whole = parameter_bytes if whole_model_bytes is None else whole_model_bytes
    if config.memory_per_instance and config.kv_to_parameters is not None:
        raise MemoryBudgetError("give a memory budget or a KV-to-parameters ratio, not both")
    budget = (config.memory_per_instance
              or default_cpu_budget(whole, config.kv_to_parameters) + reserve)
    return plan_memory(budget, parameter_bytes, reserve,
                       kv_geometry(config, model, layers_held))
