"""The model's shape, read from a Hugging Face ``config.json``.

This file knows which checkpoint families the engine runs and turns their configs into one
plain dataclass. It does not read weights (``checkpoint.py``) or build modules (``model/``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# model_type -> whether q/k/v projections carry a bias
SUPPORTED_MODEL_TYPES = {"llama": False, "mistral": False, "qwen2": True}
DTYPES = ("float32", "bfloat16", "float16")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be served, with the reason."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope: RopeConfig = field(default_factory=RopeConfig)
    dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (and ``generation_config.json`` for EOS ids) from a checkpoint."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{str(path)!r} has no config.json: not a Hugging Face checkpoint")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc
        generation = _read_optional_json(path / "generation_config.json")
        return cls.from_dict(raw, generation)

    @classmethod
    def from_dict(cls, raw: dict, generation: dict | None = None) -> ModelConfig:
        model_type = raw.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
            raise CheckpointError(
                f"unsupported architecture {model_type!r} ({raw.get('architectures')}); "
                f"supported model types: {supported}")
        if model_type == "mistral" and raw.get("sliding_window") not in (None, 0):
            if raw["sliding_window"] < raw.get("max_position_embeddings", 0):
                raise CheckpointError("Mistral with a sliding window is not supported")
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            config = cls(
                model_type=model_type,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=SUPPORTED_MODEL_TYPES[model_type] or bool(raw.get("attention_bias")),
                rope=_parse_rope(raw),
                dtype=_parse_dtype(raw),
                eos_token_ids=_eos_ids(raw, generation or {}),
                bos_token_id=raw.get("bos_token_id"),
            )
        except KeyError as exc:
            raise CheckpointError(f"config.json lacks required field {exc.args[0]!r}") from exc
        if config.num_heads % config.num_kv_heads:
            raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads")
        return config


def _read_optional_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _parse_dtype(raw: dict) -> str:
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    return dtype if dtype in DTYPES else "float32"


def _parse_rope(raw: dict) -> RopeConfig:
    """Both layouts: transformers 5 ``rope_parameters`` and the classic ``rope_theta`` +
    ``rope_scaling``."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise CheckpointError(f"unsupported rope_scaling type {rope_type!r} "
                              "(supported: default, linear, llama3)")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", 8192)),
    )


def _eos_ids(raw: dict, generation: dict) -> tuple[int, ...]:
    eos = generation.get("eos_token_id", raw.get("eos_token_id"))
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)
