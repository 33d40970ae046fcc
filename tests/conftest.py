"""Shared fixtures: tiny checkpoints built locally (no hub) and transformers references."""

from __future__ import annotations

import os
import queue
from functools import cache
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

# name -> make_tiny_model arguments; between them: GQA and MHA, tied and untied, odd layer
# counts, QKV bias (qwen2)
TINY_MODELS = {
    "llama-gqa": dict(arch="llama", layers=5, hidden_size=64, heads=4, kv_heads=2,
                      intermediate_size=160, vocab_size=512, seed=1),
    "qwen2-tied-mha": dict(arch="qwen2", layers=3, hidden_size=64, heads=4, kv_heads=4,
                           intermediate_size=128, vocab_size=512, tie_word_embeddings=True,
                           seed=2),
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    from kunserve.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {name: str(make_tiny_model(root / name, **kw)) for name, kw in TINY_MODELS.items()}


@pytest.fixture(scope="session")
def llama_dir(model_dirs) -> str:
    return model_dirs["llama-gqa"]


@cache
def hf_model(model_dir: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    # no EOS: generate runs to max_new_tokens with plain argmax, as ignore_eos does
    # (min_new_tokens would instead ban EOS from the argmax)
    model.generation_config.eos_token_id = None
    return model


@torch.inference_mode()
def hf_greedy(model_dir: str, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt, EOS ignored."""
    model = hf_model(model_dir)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def make_prompts(n: int, vocab: int, seed: int = 0, lengths: list[int] | None = None):
    gen = torch.Generator().manual_seed(seed)
    lengths = lengths or [1 + (7 * i * i + 3 * i) % 61 for i in range(n)]
    return [torch.randint(3, vocab, (n_,), generator=gen).tolist() for n_ in lengths]


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def collect_members(results, processes, finals: int, solos: int) -> tuple[dict, list]:
    """What spawned group members put on ``results``: a ``(rank, "solo", tokens, _)`` message
    each before reconfiguring (``solos`` of them, by rank), then ``finals`` final messages
    ``(rank, tokens, report, error)``. Fails the test when one is missing after 240 s or a
    member reported an error; every process is joined (killed if it lingers)."""
    solo, got = {}, []
    try:
        while len(solo) < solos or len(got) < finals:
            message = results.get(timeout=240)
            if message[1] == "solo":
                solo[message[0]] = message[2]
            else:
                got.append(message)
    except queue.Empty:
        pytest.fail("a member did not finish within 240 s")
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    errors = [error for *_, error in got if error]
    assert not errors, "\n".join(errors)
    return solo, got
