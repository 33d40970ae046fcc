"""Read the tensors of one layer range from a Hugging Face safetensors checkpoint.

Only the tensors the range needs are read from disk (single-file or sharded checkpoints).
Names are translated to the stage's own parameter names; q/k/v and gate/up are fused here so
the model runs one matmul where Hugging Face runs two or three.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kunserve.worker.layer_range import LayerRange
from kunserve.worker.model.llama import LlamaStage
from kunserve.worker.model.rope import RotaryEmbedding
from kunserve.worker.model_config import CheckpointError, ModelConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tensor_index(path: Path) -> dict[str, Path]:
    """Map every tensor name in the checkpoint to the file that holds it."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: path / shard for name, shard in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(
            f"{str(path)!r} has neither model.safetensors nor model.safetensors.index.json")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {single}: {exc}") from exc


def wanted(name: str, layers: LayerRange, tied: bool) -> bool:
    """Whether a checkpoint tensor belongs to this stage."""
    match = _LAYER.match(name)
    if match:
        return int(match.group(1)) in layers
    if name == "model.embed_tokens.weight":
        return layers.is_first or (layers.is_last and tied)
    if name in ("model.norm.weight", "lm_head.weight"):
        return layers.is_last
    return False


def read_tensors(path: Path, names: list[str], index: dict[str, Path],
                 dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for the named tensors, opening each shard once."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(index[name], []).append(name)
    for file, file_names in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in file_names:
                    # a copy in memory the allocator owns, not a private mapping of the file:
                    # a drop reuses the memory of the layers it frees (``kv_transfer``)
                    yield name, f.get_tensor(name).to(dtype, copy=True)
        except (OSError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(f"cannot read {file}: {exc}") from exc


def load_stage_weights(path: str | Path, config: ModelConfig, layers: LayerRange,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict of a stage holding ``layers``, in the stage's parameter names."""
    path = Path(path)
    index = tensor_index(path)
    names = [n for n in index if wanted(n, layers, config.tie_word_embeddings)]
    raw = dict(read_tensors(path, names, index, dtype))
    return _rename_and_fuse(raw, config, layers)


def _rename_and_fuse(raw: dict[str, torch.Tensor], config: ModelConfig,
                     layers: LayerRange) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    if layers.is_first:
        state["embed_tokens.weight"] = _take(raw, "model.embed_tokens.weight")
    for local, layer in enumerate(range(layers.start, layers.end)):
        prefix = f"model.layers.{layer}."
        out = f"layers.{local}."
        attn = prefix + "self_attn."
        state[out + "qkv_proj.weight"] = torch.cat(
            [_take(raw, attn + p + "_proj.weight") for p in "qkv"])
        if config.qkv_bias:
            state[out + "qkv_proj.bias"] = torch.cat(
                [_take(raw, attn + p + "_proj.bias") for p in "qkv"])
        state[out + "o_proj.weight"] = _take(raw, attn + "o_proj.weight")
        state[out + "gate_up_proj.weight"] = torch.cat(
            [_take(raw, prefix + "mlp.gate_proj.weight"), _take(raw, prefix + "mlp.up_proj.weight")])
        state[out + "down_proj.weight"] = _take(raw, prefix + "mlp.down_proj.weight")
        state[out + "input_layernorm.weight"] = _take(raw, prefix + "input_layernorm.weight")
        state[out + "post_attention_layernorm.weight"] = _take(
            raw, prefix + "post_attention_layernorm.weight")
    if layers.is_last:
        state["norm.weight"] = _take(raw, "model.norm.weight")
        head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        state["lm_head.weight"] = _take(raw, head)
    return state


def _take(raw: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return raw[name]
    except KeyError:
        raise CheckpointError(f"checkpoint lacks tensor {name!r}") from None


def load_stage(path: str | Path, layers: LayerRange | None = None,
               dtype: str | None = None) -> LlamaStage:
    """Build the stage for ``layers`` (default: the whole model) with the checkpoint's weights.

    ``dtype`` defaults to float32 (the CPU default); pass the checkpoint's or another of
    float32, bfloat16, float16.
    """
    config = ModelConfig.from_dir(path)
    layers = layers or LayerRange.full(config.num_layers)
    if layers.num_layers != config.num_layers:
        raise CheckpointError(
            f"layer range is for {layers.num_layers} layers, the model has {config.num_layers}")
    torch_dtype = TORCH_DTYPES[dtype or "float32"]
    return build_stage(config, layers, torch_dtype,
                       load_stage_weights(path, config, layers, torch_dtype))


def build_stage(config: ModelConfig, layers: LayerRange, dtype: torch.dtype,
                state: dict[str, torch.Tensor]) -> LlamaStage:
    """The stage of ``layers`` around ``state`` (its tensors, taken as they are)."""
    with torch.device("meta"):
        stage = LlamaStage(config, layers, dtype)
    missing, unexpected = stage.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"weights do not fit the model: missing {missing}, "
                              f"unexpected {unexpected}")
    stage.rotary = RotaryEmbedding(config.rope, config.head_dim,
                                   config.max_position_embeddings, dtype)
    return stage.eval().requires_grad_(False)
