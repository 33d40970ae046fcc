"""Tiny random-weight checkpoints in the Hugging Face layout, for tests and demos.

:func:`make_tiny_model` writes a directory that ``transformers`` (4.4x and 5.x) can load with
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` and that the
KunServe worker can load with its own safetensors loader:

* ``config.json`` -- classic Llama / Qwen2 config (``rope_theta`` + ``rope_scaling`` keys).
* ``model.safetensors`` -- random weights under the exact Hugging Face tensor names.
* ``tokenizer.json`` -- byte-level BPE trained on ``kunserve/data/corpus.txt``.
* ``tokenizer_config.json`` / ``special_tokens_map.json`` -- special tokens and a ChatML-like
  ``chat_template``.
* ``generation_config.json`` -- bos / eos / pad ids.

Tokenizer contract:

* Special tokens get the first ids, in this order: ``<|begin_of_text|>`` = 0 (bos),
  ``<|end_of_text|>`` = 1 (eos), ``<|im_start|>`` = 2, ``<|im_end|>`` = 3, ``<|pad|>`` = 4.
  The 256 byte tokens follow (ids 5..260), then the learned merges.
* Encoding never adds bos/eos (there is no post-processor, ``add_bos_token`` is false) and the
  chat template does not emit bos either: token ids are exactly the ids of the text.
* ``decode(encode(s)) == s`` for every unicode string ``s`` (byte-level pre-tokenizer and decoder,
  no normalizer, no prefix space).

This module must not import ``transformers`` (a dev/test-only dependency).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
#: Special tokens in id order (ids 0..4).
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN)
BOS_TOKEN_ID = SPECIAL_TOKENS.index(BOS_TOKEN)
EOS_TOKEN_ID = SPECIAL_TOKENS.index(EOS_TOKEN)
PAD_TOKEN_ID = SPECIAL_TOKENS.index(PAD_TOKEN)
#: Smallest tokenizer: the special tokens plus one token per byte value.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

#: ChatML-like template: one ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` block per message
#: (any role: system / user / assistant / tool), then ``<|im_start|>assistant\\n`` when
#: ``add_generation_prompt`` is true. No bos is emitted.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class _ArchSpec:
    """Per-architecture constants."""

    architecture: str
    rope_theta: float
    qkv_bias: bool


_ARCHS: dict[str, _ArchSpec] = {
    "llama": _ArchSpec("LlamaForCausalLM", rope_theta=10000.0, qkv_bias=False),
    "qwen2": _ArchSpec("Qwen2ForCausalLM", rope_theta=1000000.0, qkv_bias=True),
}
SUPPORTED_ARCHS: tuple[str, ...] = tuple(_ARCHS)


@dataclass(frozen=True)
class _Dims:
    """Validated model sizes."""

    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    intermediate_size: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads


def make_tiny_model(
    out_dir: str | Path,
    *,
    arch: str = "llama",
    layers: int = 4,
    hidden_size: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 352,
    vocab_size: int = 1024,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    max_position_embeddings: int = 2048,
    dtype: str = "float32",
    rope_scaling: dict | None = None,
) -> Path:
    """Write a random-weight Hugging Face checkpoint into ``out_dir`` and return its path.

    ``out_dir`` is created if needed; files of the same name are replaced (each file is written
    to a temporary name and renamed into place). The weights depend only on the shape arguments,
    ``arch``, ``dtype`` and ``seed``: same arguments give bit-identical tensors. The tokenizer
    does not depend on ``seed``; its size is ``min(vocab_size, size reachable by training on the
    corpus)``, while ``config.json`` keeps ``vocab_size`` as requested (extra embedding rows are
    never produced by the tokenizer).

    ``head_dim`` is ``hidden_size // heads``. ``arch`` is ``"llama"`` or ``"qwen2"`` (the latter
    has q/k/v projection biases). ``dtype`` is ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Raises ``ValueError`` for an unknown ``arch`` or ``dtype``, non-positive sizes,
    ``hidden_size % heads != 0``, ``heads % kv_heads != 0``, an odd ``head_dim`` (RoPE needs it
    even), ``vocab_size < MIN_VOCAB_SIZE`` (261), or a ``rope_scaling`` that is not a dict.
    """
    dims = _Dims(layers, hidden_size, heads, kv_heads, intermediate_size, vocab_size)
    _validate(
        arch,
        dims,
        seed=seed,
        max_position_embeddings=max_position_embeddings,
        dtype=dtype,
        rope_scaling=rope_scaling,
    )
    spec = _ARCHS[arch]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tensors = _random_weights(
        spec, dims, tie_word_embeddings=tie_word_embeddings, seed=seed, dtype=_DTYPES[dtype]
    )
    _write_atomic(out / "model.safetensors", lambda p: save_file(tensors, str(p), {"format": "pt"}))
    config = _model_config(
        arch,
        spec,
        dims,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        dtype=dtype,
        rope_scaling=rope_scaling,
    )
    _write_json(out / "config.json", config)
    _write_text(out / "tokenizer.json", _trained_tokenizer_json(vocab_size))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(max_position_embeddings))
    _write_json(out / "special_tokens_map.json", _special_tokens_map())
    _write_json(out / "generation_config.json", _generation_config())
    return out


#: Keyword arguments of :func:`make_tiny_model` that :func:`main_args` provides flags for.
TINY_MODEL_CLI_KWARGS: tuple[str, ...] = (
    "arch",
    "layers",
    "hidden_size",
    "heads",
    "kv_heads",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
    "seed",
)


def main_args(parser: argparse.ArgumentParser) -> None:
    """Add the tiny-model flags to ``parser``.

    Flags: ``--arch --layers --hidden-size --heads --kv-heads --intermediate-size --vocab-size
    --tie-word-embeddings --seed``. Their ``dest`` names equal the keyword arguments of
    :func:`make_tiny_model` and their defaults are its defaults, so a CLI can call
    ``make_tiny_model(out, **{k: getattr(args, k) for k in TINY_MODEL_CLI_KWARGS})``.
    """
    defaults = {
        name: p.default for name, p in inspect.signature(make_tiny_model).parameters.items()
    }
    for name in TINY_MODEL_CLI_KWARGS:
        flag, default = "--" + name.replace("_", "-"), defaults[name]
        if name == "arch":
            parser.add_argument(
                flag, choices=SUPPORTED_ARCHS, default=default, help=f"default {default}"
            )
        elif name == "tie_word_embeddings":
            parser.add_argument(flag, action="store_true", help="share embedding and lm_head")
        else:
            parser.add_argument(flag, type=int, default=default, help=f"default {default}")


# --------------------------------------------------------------------------- validation


def _validate(
    arch: str,
    dims: _Dims,
    *,
    seed: int,
    max_position_embeddings: int,
    dtype: str,
    rope_scaling: dict | None,
) -> None:
    """Raise ``ValueError`` unless the arguments of :func:`make_tiny_model` are consistent."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; supported: {', '.join(_DTYPES)}")
    sizes = {**asdict(dims), "max_position_embeddings": max_position_embeddings}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if dims.hidden_size % dims.heads != 0:
        raise ValueError(
            f"hidden_size ({dims.hidden_size}) must be divisible by heads ({dims.heads})"
        )
    if dims.heads % dims.kv_heads != 0:
        raise ValueError(f"heads ({dims.heads}) must be divisible by kv_heads ({dims.kv_heads})")
    if dims.head_dim % 2 != 0:
        raise ValueError(f"head_dim = hidden_size // heads = {dims.head_dim} must be even (RoPE)")
    if dims.vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size ({dims.vocab_size}) must be >= {MIN_VOCAB_SIZE} "
            f"({len(SPECIAL_TOKENS)} special tokens + 256 byte tokens)"
        )
    if rope_scaling is not None and not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(rope_scaling).__name__}")


# --------------------------------------------------------------------------- weights

# Init scales, chosen by measuring greedy decoding of the random models with transformers
# (6 prompts x 32 new tokens, llama/qwen2, tied/untied): most continuations have 15-32 distinct
# tokens, the prompt context changes the greedy choice, and <1% of top-1/top-2 logit gaps are
# below 1e-2 (the 1st percentile is ~0.01-0.03).
# * q/k/v/gate/up use std = 1 / sqrt(fan_in), so each matmul roughly preserves RMS;
# * the residual branches (o_proj, down_proj) use _RESIDUAL_GAIN / sqrt(2 * layers): the residual
#   stream stays O(1) at any depth while the layers still outweigh the token embedding (so the
#   output depends on the context, not just on the last token);
# * the output head gives logits with std ~ _LOGIT_STD (top-1 probability ~0.4 at temperature 1,
#   so sampling is not degenerate either).
_EMBED_STD = 1.0
_PROJ_GAIN = 1.0
_RESIDUAL_GAIN = 1.5
_LOGIT_STD = 4.0
_NORM_NOISE = 0.1
_BIAS_STD = 0.1


def _random_weights(
    spec: _ArchSpec, dims: _Dims, *, tie_word_embeddings: bool, seed: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Return ``{hf_name: tensor}`` cast to ``dtype``.

    Values are drawn in float32, in a fixed order, from a CPU generator seeded with ``seed``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = dims.hidden_size
    q_out, kv_out = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    residual_gain = _RESIDUAL_GAIN / math.sqrt(2 * dims.layers)

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    def linear(out_f: int, in_f: int, gain: float = _PROJ_GAIN) -> torch.Tensor:
        return normal((out_f, in_f), gain / math.sqrt(in_f))

    def norm() -> torch.Tensor:
        return 1.0 + normal((hidden,), _NORM_NOISE)

    w = {"model.embed_tokens.weight": normal((dims.vocab_size, hidden), _EMBED_STD)}
    for i in range(dims.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = linear(q_out, hidden)
        w[p + "self_attn.k_proj.weight"] = linear(kv_out, hidden)
        w[p + "self_attn.v_proj.weight"] = linear(kv_out, hidden)
        if spec.qkv_bias:
            w[p + "self_attn.q_proj.bias"] = normal((q_out,), _BIAS_STD)
            w[p + "self_attn.k_proj.bias"] = normal((kv_out,), _BIAS_STD)
            w[p + "self_attn.v_proj.bias"] = normal((kv_out,), _BIAS_STD)
        w[p + "self_attn.o_proj.weight"] = linear(hidden, q_out, residual_gain)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = linear(dims.intermediate_size, hidden)
        w[p + "mlp.up_proj.weight"] = linear(dims.intermediate_size, hidden)
        w[p + "mlp.down_proj.weight"] = linear(hidden, dims.intermediate_size, residual_gain)
    w["model.norm.weight"] = norm()
    if tie_word_embeddings:
        # With a tied head, logits = E @ norm(x) and x still contains the current token's own
        # embedding row, so the model would predict its input token forever. Random signs on the
        # final norm weight make that self-similarity term zero-mean.
        signs = torch.randint(0, 2, (hidden,), generator=gen, dtype=torch.float32) * 2 - 1
        w["model.norm.weight"] *= signs
        # The tied matrix is also the output head: rescale it so that logits have std
        # ~ _LOGIT_STD (the embedding scale itself is irrelevant: layers RMS-normalise inputs).
        w["model.embed_tokens.weight"] *= _LOGIT_STD / (_EMBED_STD * math.sqrt(hidden))
    else:
        w["lm_head.weight"] = linear(dims.vocab_size, hidden, _LOGIT_STD)
    return {name: t.to(dtype).contiguous() for name, t in w.items()}


# --------------------------------------------------------------------------- json files


def _model_config(
    arch: str,
    spec: _ArchSpec,
    dims: _Dims,
    *,
    tie_word_embeddings: bool,
    max_position_embeddings: int,
    dtype: str,
    rope_scaling: dict | None,
) -> dict[str, Any]:
    """Return the classic-format ``config.json`` dict (readable by transformers 4.4x and 5.x)."""
    config: dict[str, Any] = {
        "architectures": [spec.architecture],
        "model_type": arch,
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads,
        "head_dim": dims.head_dim,
        "vocab_size": dims.vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": spec.rope_theta,
        "rope_scaling": dict(rope_scaling) if rope_scaling is not None else None,
        "tie_word_embeddings": tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": dtype,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if arch == "llama":
        config["attention_bias"] = False
        config["mlp_bias"] = False
    elif arch == "qwen2":
        config["use_sliding_window"] = False
        config["sliding_window"] = None
        config["max_window_layers"] = dims.layers
    return config


def _tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """Return ``tokenizer_config.json``: fast tokenizer, special tokens, chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        # Read by transformers 4.x and mapped to ``extra_special_tokens`` by 5.x.
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {
                "content": tok,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": True,
            }
            for i, tok in enumerate(SPECIAL_TOKENS)
        },
    }


def _special_tokens_map() -> dict[str, Any]:
    """Return ``special_tokens_map.json``."""
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
    }


def _generation_config() -> dict[str, Any]:
    """Return ``generation_config.json`` (greedy by default, bos/eos/pad ids)."""
    return {
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        "do_sample": False,
    }


# --------------------------------------------------------------------------- tokenizer


def _corpus_paragraphs() -> list[str]:
    """Return the blank-line separated paragraphs of the packaged training corpus."""
    text = resources.files("kunserve").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    return [para for para in text.split("\n\n") if para.strip()]


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Train (once per ``vocab_size`` per process) and return the serialized tokenizer.

    The result has at most ``vocab_size`` tokens: fewer when the corpus runs out of merges.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_paragraphs(), trainer=trainer)
    assert tokenizer.get_vocab_size() <= vocab_size
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    return tokenizer.to_str()


# --------------------------------------------------------------------------- file writing


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` for a temporary file next to ``path``, then rename it over."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    """Atomically write ``text`` as UTF-8."""
    _write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Atomically write ``obj`` as indented JSON."""
    _write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
