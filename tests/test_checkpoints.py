"""Checkpoint loading: the formats and variants of the Llama family, layer-range loading, and
clear errors for directories the engine cannot serve."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kunserve.worker.checkpoint import load_stage, load_stage_weights
from kunserve.worker.engine import EngineConfig, LLMEngine
from kunserve.worker.instance_memory import model_parameter_bytes
from kunserve.worker.layer_range import LayerRange
from kunserve.worker.model_config import CheckpointError, ModelConfig
from kunserve.worker.sampling_params import SamplingParams
from tests.conftest import hf_greedy, make_prompts

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def _assert_matches_transformers(model_dir: str, **engine_kw) -> None:
    prompts = make_prompts(4, vocab=250, seed=3, lengths=[3, 30, 17, 50])
    engine = LLMEngine(EngineConfig(model=model_dir, **engine_kw))
    got = [r.token_ids for r in engine.generate(prompts, GREEDY)]
    assert got == [hf_greedy(model_dir, p, 16) for p in prompts]


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "linear", "factor": 4.0},
])
def test_rope_scaling_matches_transformers(tmp_path, rope_scaling):
    from kunserve.tiny_model import make_tiny_model

    path = make_tiny_model(tmp_path / "m", layers=2, hidden_size=64, heads=4, kv_heads=2,
                           intermediate_size=96, vocab_size=300, rope_scaling=rope_scaling)
    assert ModelConfig.from_dir(path).rope.rope_type == rope_scaling["rope_type"]
    _assert_matches_transformers(str(path))


def test_mistral_and_sharded_checkpoint(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=1, vocab_size=300,
                           max_position_embeddings=256, sliding_window=None)
    model = MistralForCausalLM(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.15)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _assert_matches_transformers(str(tmp_path), max_num_batched_tokens=24)


def test_layer_range_reads_only_its_tensors(llama_dir):
    config = ModelConfig.from_dir(llama_dir)
    middle = load_stage_weights(llama_dir, config, LayerRange(2, 4, 5), torch.float32)
    assert {k.split(".")[1] for k in middle if k.startswith("layers.")} == {"0", "1"}
    assert not any(k.startswith(("embed_tokens", "lm_head", "norm")) for k in middle)
    first = load_stage(llama_dir, LayerRange(0, 2, 5))
    last = load_stage(llama_dir, LayerRange(2, 5, 5))
    assert first.embed_tokens is not None and not hasattr(first, "lm_head")
    assert last.embed_tokens is None and len(last.layers) == 3
    assert first.parameter_bytes() + last.parameter_bytes() == load_stage(
        llama_dir).parameter_bytes()


def test_parameters_are_copied_out_of_the_checkpoint_file(llama_dir):
    """A drop stages KV in the tensors of the layers it frees (``kv_transfer._Staging``),
    which must be memory torch's allocator owns, not a private mapping of the file."""
    stage = load_stage(llama_dir)
    assert all(p.untyped_storage().resizable() for p in stage.parameters())


def test_stages_chain_to_the_full_model_hidden_states(llama_dir):
    from kunserve.worker.model.attention import AttentionMetadata
    from kunserve.worker.model.llama import LlamaStage

    full, first, last = (load_stage(llama_dir, r) for r in
                         (None, LayerRange(0, 2, 5), LayerRange(2, 5, 5)))
    ids = torch.tensor(make_prompts(1, vocab=500, lengths=[12])[0])
    positions = torch.arange(12)

    def run(stage: LlamaStage, x: torch.Tensor) -> torch.Tensor:
        caches = [(torch.zeros(1, 16, 2, 16), torch.zeros(1, 16, 2, 16))
                  for _ in stage.layers]
        from kunserve.worker.model.attention import PrefillSpan
        meta = AttentionMetadata(torch.zeros(12, dtype=torch.long), positions, 0, None, None,
                                 [PrefillSpan(0, 12, 0, torch.zeros(1, dtype=torch.long), None)])
        return stage(x, positions, caches, meta)

    hidden = run(first, ids)  # (12, H) hidden states between the stages
    assert hidden.shape == (12, 64)
    torch.testing.assert_close(run(last, hidden), run(full, ids), rtol=0, atol=1e-5)

    # a drop narrows the whole stage in place: the kept layers are the same tensors, and the
    # narrowed stages chain to the same hidden states
    head, tail = full.narrow(LayerRange(0, 2, 5)), full.narrow(LayerRange(2, 5, 5))
    assert head.embed_tokens is full.embed_tokens and not hasattr(head, "lm_head")
    assert tail.embed_tokens is None and tail.lm_head is full.lm_head
    assert [layer is full.layers[i] for i, layer in enumerate(head.layers)] == [True] * 2
    assert [layer is full.layers[2 + i] for i, layer in enumerate(tail.layers)] == [True] * 3
    assert list(tail.model_state()) == list(last.model_state())
    assert not head.training and not any(p.requires_grad for p in tail.parameters())
    torch.testing.assert_close(run(tail, run(head, ids)), run(full, ids), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not all held"):
        head.narrow(LayerRange(1, 3, 5))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs(llama_dir, dtype):
    engine = LLMEngine(EngineConfig(model=llama_dir, dtype=dtype))
    assert engine.kv_caches[0].storage.dtype == getattr(torch, dtype)
    results = engine.generate(make_prompts(3, vocab=500), GREEDY)
    assert all(len(r.token_ids) == 16 for r in results)
    fp32 = LLMEngine(EngineConfig(model=llama_dir)).memory.parameter_bytes
    assert engine.memory.parameter_bytes == fp32 // 2
    # a group member sizes its budget from the whole model counted on the meta device: in
    # the same dtype as the loaded one (it used to count float32 whatever the dtype)
    model = ModelConfig.from_dir(llama_dir)
    assert model_parameter_bytes(model, dtype) == engine.memory.parameter_bytes
    assert model_parameter_bytes(model, "float32") == fp32


# -- bad checkpoints ------------------------------------------------------------------------
def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        LLMEngine(EngineConfig(model=str(tmp_path / "nope")))


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        LLMEngine(EngineConfig(model=str(tmp_path)))


def test_broken_config_json(tmp_path, llama_dir):
    shutil.copytree(llama_dir, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        LLMEngine(EngineConfig(model=str(tmp_path / "m")))


def test_unsupported_architecture_lists_supported(tmp_path, llama_dir):
    shutil.copytree(llama_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported architecture 'gpt2'.*llama, mistral, qwen2"):
        LLMEngine(EngineConfig(model=str(tmp_path / "m")))


def test_missing_weights_file(tmp_path, llama_dir):
    shutil.copytree(llama_dir, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        LLMEngine(EngineConfig(model=str(tmp_path / "m")))


def test_truncated_weights_file(tmp_path, llama_dir):
    shutil.copytree(llama_dir, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        LLMEngine(EngineConfig(model=str(tmp_path / "m")))


def test_too_long_prompt_fails_alone(llama_dir):
    engine = LLMEngine(EngineConfig(model=llama_dir, max_model_len=64))
    prompts = make_prompts(3, vocab=500, lengths=[10, 64, 20])
    results = engine.generate(prompts, GREEDY)
    assert results[1].finish_reason == "error"
    assert "64 tokens" in results[1].error and "maximum context length is 64" in results[1].error
    assert [r.finish_reason for r in (results[0], results[2])] == ["length", "length"]
    assert results[0].token_ids == hf_greedy(llama_dir, prompts[0], 16)


def test_budget_too_small_for_parameters(llama_dir):
    with pytest.raises(ValueError, match="cannot hold parameters"):
        LLMEngine(EngineConfig(model=llama_dir, memory_per_instance=100_000))


def test_kv_to_parameters_sizes_the_kv_cache_from_the_parameters(llama_dir):
    """budget = parameters + reserve + ratio x parameters; the KV cache is the whole blocks of
    ratio x parameters; and a ratio cannot be combined with a budget."""
    engine = LLMEngine(EngineConfig(model=llama_dir, kv_to_parameters=0.25))
    memory = engine.memory_report()
    params, reserve = memory["parameter_bytes"], memory["reserve_bytes"]
    assert memory["budget_bytes"] == params + reserve + int(0.25 * params)
    assert memory["blocks_total"] == int(0.25 * params) // memory["block_bytes"]
    assert memory["kv_bytes"] == memory["blocks_total"] * memory["block_bytes"]
    with pytest.raises(ValueError, match="not both"):
        LLMEngine(EngineConfig(model=llama_dir, kv_to_parameters=0.25,
                               memory_per_instance=64 * 1024**2))
