"""The engine computes exactly what transformers computes: greedy tokens are identical and
logits agree to 1e-4 in float32, whatever batching, chunking, preemption or stage split."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kunserve.worker.engine import EngineConfig, LLMEngine
from kunserve.worker.sampling_params import SamplingParams
from tests.conftest import hf_greedy, hf_model, make_prompts

MAX_TOKENS = 24
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)

VARIANTS = {
    "default": {},
    "chunked-prefill-16": {"max_num_batched_tokens": 16},
    "two-stages": {"num_stages": 2},
    "three-stages-chunked": {"num_stages": 3, "max_num_batched_tokens": 13},
}


@pytest.fixture(scope="module")
def references(model_dirs):
    refs = {}
    for name, path in model_dirs.items():
        prompts = make_prompts(10, vocab=500)
        refs[name] = (prompts, [hf_greedy(path, p, MAX_TOKENS) for p in prompts])
    return refs


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", ["llama-gqa", "qwen2-tied-mha"])
def test_concurrent_greedy_matches_transformers(model, variant, model_dirs, references):
    engine = LLMEngine(EngineConfig(model=model_dirs[model], **VARIANTS[variant]))
    prompts, expected = references[model]
    results = engine.generate(prompts, GREEDY)
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason == "length" for r in results)
    assert engine.block_manager.usage().used == 0  # every block came back


def test_recompute_preemption_keeps_outputs_exact(model_dirs, references):
    """A KV budget that holds far fewer tokens than the batch needs forces preemptions."""
    probe = LLMEngine(EngineConfig(model=model_dirs["llama-gqa"]))
    m = probe.memory
    small = m.parameter_bytes + m.reserve_bytes + 12 * m.block_bytes  # 12 blocks = 192 tokens
    engine = LLMEngine(EngineConfig(model=model_dirs["llama-gqa"], memory_per_instance=small))
    assert engine.block_manager.num_blocks == 12
    prompts, expected = references["llama-gqa"]
    results = engine.generate(prompts, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert [r.token_ids for r in results] == expected


@pytest.mark.parametrize("host_blocks", [64, 3], ids=["room-for-all", "host-fills-up"])
def test_swap_preemption_keeps_outputs_exact_and_resumes_without_recompute(
        model_dirs, references, host_blocks):
    """The infercept policy's preemption: the victim's KV goes to host memory and comes back.
    With room on the host nothing is recomputed; when the host fills up, preemption falls back
    to recompute. Either way the tokens are transformers'."""
    probe = LLMEngine(EngineConfig(model=model_dirs["llama-gqa"]))
    m = probe.memory
    small = m.parameter_bytes + m.reserve_bytes + 12 * m.block_bytes
    engine = LLMEngine(EngineConfig(model=model_dirs["llama-gqa"], memory_per_instance=small,
                                    swap_bytes=host_blocks * m.block_bytes))
    computed = []
    execute = engine.runner.execute

    def counting(out):  # every prompt token computed, to catch recomputation
        computed.append(sum(c.num_tokens for c in out.chunks))
        return execute(out)

    engine.runner.execute = counting
    prompts, expected = references["llama-gqa"]
    results = engine.generate(prompts, GREEDY)
    assert [r.token_ids for r in results] == expected
    scheduler, swap = engine.scheduler, engine.runner.swap_spaces[0]
    assert scheduler.num_swaps > 0 and swap.bytes_copied > 0 and swap.bandwidth > 0
    assert scheduler.host_blocks.usage().used == 0  # every host block came back
    needed = sum(len(p) + MAX_TOKENS - 1 for p in prompts)  # each token computed once
    if host_blocks == 64:
        assert scheduler.num_preemptions == scheduler.num_swaps
        assert sum(computed) == needed
    else:
        assert scheduler.num_preemptions > scheduler.num_swaps
        assert sum(computed) > needed


def test_logits_match_transformers_to_1e4(llama_dir):
    engine = LLMEngine(EngineConfig(model=llama_dir, max_num_batched_tokens=7, num_stages=2))
    recorded: dict[str, list[torch.Tensor]] = {}
    sample = engine.runner.sample

    def record(logits, chunks):
        for row, chunk in zip(logits, chunks, strict=True):
            recorded.setdefault(chunk.request_id, []).append(row.clone())
        return sample(logits, chunks)

    engine.runner.sample = record
    prompts = make_prompts(4, vocab=500, seed=5, lengths=[1, 9, 20, 33])
    results = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0,
                                                      ignore_eos=True))
    model = hf_model(llama_dir)
    for prompt, result in zip(prompts, results, strict=True):
        full = torch.tensor([prompt + result.token_ids[:-1]])
        with torch.inference_mode():
            ref = model(full).logits[0, len(prompt) - 1:]  # (6, V)
        ours = torch.stack(recorded[result.request_id])  # (6, V)
        assert (ours - ref).abs().max().item() <= 1e-4


def test_seeded_sampling_does_not_depend_on_the_batch(llama_dir):
    engine = LLMEngine(EngineConfig(model=llama_dir))
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    prompt = make_prompts(1, vocab=500, seed=9)[0]
    alone = engine.generate([prompt], seeded)[0].token_ids
    others = make_prompts(6, vocab=500, seed=10)
    noisy = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    batch = engine.generate([*others[:3], prompt, *others[3:]],
                            [noisy] * 3 + [seeded] + [noisy] * 3)
    assert batch[3].token_ids == alone
    again = engine.generate([prompt], seeded)[0].token_ids
    assert again == alone
    other_seed = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=99,
                                ignore_eos=True)
    assert engine.generate([prompt], other_seed)[0].token_ids != alone


def test_a_resumed_request_goes_on_as_if_it_had_never_stopped(llama_dir):
    """A failover resubmits a request as prompt + the tokens it streamed, with
    ``resumed_tokens`` saying how many of them are output: a seeded, penalised request then
    samples exactly the tokens the uninterrupted one did (its random stream goes on past the
    draws they took, and the penalties count them as output)."""
    engine = LLMEngine(EngineConfig(model=llama_dir))
    params = SamplingParams(max_tokens=14, temperature=1.0, seed=11, presence_penalty=0.8,
                            frequency_penalty=0.4, ignore_eos=True)
    prompt = make_prompts(1, vocab=500, seed=12)[0]
    completion = engine.generate([prompt], params)[0]
    whole = completion.token_ids
    texts: list[str] = []

    def resumed(streamed: int, resumed_tokens: int) -> list[int]:
        rid = engine.add_request(prompt + whole[:streamed],
                                 replace(params, max_tokens=params.max_tokens - streamed),
                                 resumed_tokens=resumed_tokens)
        tokens, text, done = [], "", False
        while not done:
            for out in engine.step():
                assert out.request_id == rid and out.error is None, out
                tokens, text, done = tokens + out.new_token_ids, text + out.new_text, out.finished
        texts.append(text)
        return tokens

    assert resumed(5, 5) == whole[5:]
    assert resumed(13, 13) == whole[13:]
    # the streamed tokens' text comes again first (the gateway skips what the client has)
    assert texts == [completion.text, completion.text]
    # without the count (the tail read as prompt) the same resubmission samples otherwise
    assert resumed(5, 0) != whole[5:]


def test_prompts_run_concurrently_not_one_after_another(llama_dir):
    engine = LLMEngine(EngineConfig(model=llama_dir))
    steps = 0
    step = engine.step

    def counting_step():
        nonlocal steps
        steps += 1
        return step()

    engine.step = counting_step
    engine.generate(make_prompts(8, vocab=500), GREEDY)
    assert steps == MAX_TOKENS  # one prefill step (all 8 prompts) + one step per further token


def test_stop_strings_eos_and_max_tokens(llama_dir):
    engine = LLMEngine(EngineConfig(model=llama_dir))
    prompt = make_prompts(1, vocab=500, seed=4)[0]
    free = engine.generate([prompt], GREEDY)[0]
    stop = free.text[5:8]
    assert stop and stop not in free.text[:5]
    stopped = engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                       stop=[stop], ignore_eos=True))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:free.text.index(stop)]
    stop_id = free.token_ids[3]
    with_stop_id = engine.generate([prompt], SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=[stop_id]))[0]
    assert with_stop_id.token_ids == free.token_ids[:free.token_ids.index(stop_id) + 1]
    assert with_stop_id.finish_reason == "stop"
    short = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0,
                                                     ignore_eos=True))[0]
    assert short.token_ids == free.token_ids[:3] and short.finish_reason == "length"
