"""Tests for kunserve.tiny_model: the random-checkpoint maker used by the other tests and the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kunserve.tiny_model import (
    BOS_TOKEN,
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    make_tiny_model,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SMALL = {"layers": 2, "hidden_size": 64, "heads": 4, "intermediate_size": 96}
UNICODE_SAMPLES = [
    "Hello, world!",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "Déjà vu: où est le café? Grüße aus München, Straße.",
    "今天天气很好。東京の駅はいつも人が多いです。",
    "emoji 🎉👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷",
    "\x00\x7f control bytes and a lone <|im_start|> marker",
    "def f(x):\n    return {'a': [1, 2.5, -3e-4]}\n",
]


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default checkpoint (llama, GQA 4/2, untied), built once for the module."""
    return make_tiny_model(tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def tokenizer(default_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(default_dir)


def _load(path: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return model.eval(), info


def _assert_clean(info: dict) -> None:
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"{key}: {info.get(key)}"


# --------------------------------------------------------------------------- layout / loading


def test_writes_hf_layout(default_dir: Path) -> None:
    names = {p.name for p in default_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    } <= names
    assert not [n for n in names if n.startswith(".")], "temporary files left behind"
    cfg = json.loads((default_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 32)
    assert cfg["vocab_size"] == 1024 and cfg["rope_theta"] == 10000.0
    assert cfg["rope_scaling"] is None and cfg["attention_bias"] is False
    gen = json.loads((default_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (0, 1)


@pytest.mark.parametrize(
    ("arch", "tied", "kv_heads"),
    [
        ("llama", False, 2),
        ("llama", True, 4),
        ("qwen2", False, 4),
        ("qwen2", True, 2),
    ],
)
def test_transformers_loads_without_missing_keys(
    tmp_path: Path, arch: str, tied: bool, kv_heads: int
) -> None:
    path = make_tiny_model(
        tmp_path, arch=arch, tie_word_embeddings=tied, kv_heads=kv_heads, **SMALL
    )
    model, info = _load(path)
    _assert_clean(info)
    expected_cls = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert type(model).__name__ == expected_cls
    assert model.config.num_key_value_heads == kv_heads
    assert model.config.tie_word_embeddings is tied

    saved = load_file(path / "model.safetensors")
    assert ("lm_head.weight" in saved) is not tied
    assert ("model.layers.0.self_attn.q_proj.bias" in saved) is (arch == "qwen2")
    assert "model.layers.0.self_attn.o_proj.bias" not in saved
    # The weights transformers uses are exactly the saved ones.
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    if tied:
        assert torch.equal(state["lm_head.weight"], saved["model.embed_tokens.weight"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_greedy_output_is_not_degenerate(tmp_path: Path, tokenizer, arch: str, tied: bool) -> None:
    """Greedy decoding varies, depends on context, and has clear top-1/top-2 logit gaps."""
    model, _ = _load(make_tiny_model(tmp_path, arch=arch, tie_word_embeddings=tied))
    gaps = []
    for prompt in ["Hello, my name is", "The scheduler reduces", "今天天气"]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=tokenizer.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
            new = out.sequences[0, ids.shape[1] :]
            assert len(set(new.tolist())) >= 6, tokenizer.decode(new)
            gaps += [float(t[0] - t[1]) for t in (lg[0].topk(2).values for lg in out.logits)]
    gaps_t = torch.tensor(gaps)
    assert float((gaps_t < 1e-2).float().mean()) < 0.05
    assert float(gaps_t.median()) > 0.1


def test_rope_scaling_is_written_and_read(tmp_path: Path) -> None:
    scaling = {"rope_type": "linear", "factor": 2.0}
    path = make_tiny_model(tmp_path, rope_scaling=scaling, max_position_embeddings=512, **SMALL)
    assert json.loads((path / "config.json").read_text())["rope_scaling"] == scaling
    config = transformers.AutoConfig.from_pretrained(path)
    # transformers 5 folds rope_theta/rope_scaling into rope_parameters; 4.x keeps rope_scaling.
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling
    assert rope["rope_type"] == "linear" and rope["factor"] == 2.0
    assert config.max_position_embeddings == 512


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens(tokenizer) -> None:
    assert tokenizer.is_fast
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        BOS_TOKEN,
        EOS_TOKEN,
        PAD_TOKEN,
    )
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 4)
    assert len(tokenizer) == 1024
    # No bos/eos is added on encode.
    ids = tokenizer("hello").input_ids
    assert ids and ids[0] != tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_tokenizer_round_trips_unicode(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text


def test_tokenizer_splits_rare_characters_into_byte_tokens(tokenizer) -> None:
    # A rare CJK character and a rare emoji are not whole tokens: they are encoded as several
    # byte-level pieces (common UTF-8 prefixes may be merged), and still decode exactly.
    for char in ("龘", "🦩"):
        ids = tokenizer(char).input_ids
        assert 1 < len(ids) <= len(char.encode("utf-8")), ids
        assert tokenizer.decode(ids) == char
        assert all(tokenizer.decode([i]) != char for i in ids)


def test_tokenizer_size_is_capped_by_training(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path, vocab_size=50_000, **SMALL)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert MIN_VOCAB_SIZE < len(tok) < 50_000
    assert json.loads((path / "config.json").read_text())["vocab_size"] == 50_000
    with safe_open(path / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape()[0] == 50_000


def test_chat_template(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2? Répondez 🙂"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is 2 + 2? Répondez 🙂<|im_end|>\n" in text
    assert "<|im_start|>system\nYou are terse.<|im_end|>\n" in text
    assert "<|im_start|>assistant\n4<|im_end|>\n" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert no_prompt.endswith("And 3 + 3?<|im_end|>\n")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids.count(2) == 5 and ids.count(3) == 4  # <|im_start|> / <|im_end|> are single tokens


# --------------------------------------------------------------------------- seeds / dtypes


def test_same_seed_same_tensors_different_seed_differs(tmp_path: Path) -> None:
    a = load_file(make_tiny_model(tmp_path / "a", seed=7, **SMALL) / "model.safetensors")
    b = load_file(make_tiny_model(tmp_path / "b", seed=7, **SMALL) / "model.safetensors")
    c = load_file(make_tiny_model(tmp_path / "c", seed=8, **SMALL) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "c" / "tokenizer.json"
    ).read_bytes()


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("bfloat16", torch.bfloat16), ("float16", torch.float16)]
)
def test_dtype_is_saved(tmp_path: Path, dtype: str, torch_dtype: torch.dtype) -> None:
    path = make_tiny_model(tmp_path, dtype=dtype, arch="qwen2", **SMALL)
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == dtype
    tensors = load_file(path / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch_dtype}
    ref = load_file(make_tiny_model(tmp_path / "f32", arch="qwen2", **SMALL) / "model.safetensors")
    assert all(torch.equal(tensors[k], ref[k].to(torch_dtype)) for k in ref)
    model, info = _load(path)
    _assert_clean(info)


def test_rewriting_a_directory_replaces_files(tmp_path: Path) -> None:
    make_tiny_model(tmp_path, seed=1, **SMALL)
    make_tiny_model(tmp_path, seed=2, arch="qwen2", **SMALL)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2"
    assert "model.layers.0.self_attn.q_proj.bias" in load_file(tmp_path / "model.safetensors")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "gpt2"}, "supported: llama, qwen2"),
        ({"dtype": "int8"}, "unknown dtype"),
        ({"hidden_size": 130, "heads": 4}, "divisible by heads"),
        ({"heads": 4, "kv_heads": 3}, "divisible by kv_heads"),
        ({"hidden_size": 12, "heads": 4}, "must be even"),
        ({"vocab_size": MIN_VOCAB_SIZE - 1}, f">= {MIN_VOCAB_SIZE}"),
        ({"layers": 0}, "layers must be a positive int"),
        ({"kv_heads": -2}, "kv_heads must be a positive int"),
        ({"rope_scaling": "linear"}, "rope_scaling must be a dict"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make_tiny_model(tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists()


def test_minimum_vocab_size_works(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path, vocab_size=MIN_VOCAB_SIZE, **SMALL)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tok) == MIN_VOCAB_SIZE
    assert tok.decode(tok("Grüße 🎉").input_ids) == "Grüße 🎉"


def test_module_does_not_import_transformers() -> None:
    code = "import sys, kunserve.tiny_model; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
