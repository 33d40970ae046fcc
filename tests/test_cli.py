"""The ``kunserve`` command line as a user runs it (real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys

from tokenizers import Tokenizer

from kunserve.worker.engine import EngineConfig, LLMEngine
from kunserve.worker.sampling_params import SamplingParams


def kunserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kunserve.cli", *args], capture_output=True,
                          text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})


def test_make_tiny_model_then_generate_json(tmp_path):
    model = tmp_path / "tiny"
    made = kunserve("make-tiny-model", str(model), "--arch", "qwen2", "--layers", "3",
                    "--hidden-size", "64", "--heads", "4", "--kv-heads", "2",
                    "--intermediate-size", "128", "--vocab-size", "600", "--seed", "7")
    assert made.returncode == 0, made.stderr
    assert (model / "model.safetensors").is_file()

    out = kunserve("generate", "--model", str(model), "--prompt", "Héllo wörld 🙂",
                   "--prompt-token-ids", "5,6,7,8", "--prompt", "def f(x):",
                   "--max-tokens", "12", "--ignore-eos", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 3
    assert rows[1]["prompt_token_ids"] == [5, 6, 7, 8]
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    assert rows[0]["prompt_token_ids"] == tokenizer.encode("Héllo wörld 🙂",
                                                           add_special_tokens=False).ids
    engine = LLMEngine(EngineConfig(model=str(model)))
    expected = engine.generate([r["prompt_token_ids"] for r in rows],
                               SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    for row, ref in zip(rows, expected, strict=True):
        assert row["token_ids"] == ref.token_ids and len(row["token_ids"]) == 12
        assert row["text"] == ref.text
        assert row["finish_reason"] == "length"


def test_generate_reports_a_missing_model_without_a_traceback(tmp_path):
    out = kunserve("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_generate_rejects_bad_token_ids_and_sizes(tmp_path):
    out = kunserve("generate", "--model", str(tmp_path), "--prompt-token-ids", "1,x")
    assert out.returncode == 2 and "comma-separated integers" in out.stderr
    out = kunserve("generate", "--model", str(tmp_path), "--prompt", "a",
                   "--memory-per-instance", "lots")
    assert out.returncode == 2 and "64MiB" in out.stderr
