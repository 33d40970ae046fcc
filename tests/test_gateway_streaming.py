"""The gateway's answers on the happy path: SSE framing byte for byte, usage chunks,
``return_token_ids``, non-streaming bodies, chat templates, and the ledger row."""

from __future__ import annotations

import json
import time

import pytest
from test_gateway_harness import (
    MODEL_NAME,
    FakeMesh,
    clear_redis,
    gateway_client,
    make_settings,
    model_dir,
    sse_payloads,
)
from tokenizers import Tokenizer

from kunserve.ledger import Ledger
from kunserve.protocol import Sampling

PROMPT = "The quick brown fox"


def compact(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def prompt_ids(text: str = PROMPT) -> list[int]:
    return Tokenizer.from_file(f"{model_dir()}/tokenizer.json").encode(text).ids


@pytest.fixture
async def mesh():
    await clear_redis()
    async with FakeMesh() as fake:
        await fake.set_load(blocks_total=100, blocks_used=25)
        yield fake


@pytest.fixture
async def client(tmp_path, mesh):
    async with gateway_client(make_settings(tmp_path)) as (_, http):
        yield http


async def test_completion_stream_is_framed_exactly_as_openai(client, mesh):
    response = await client.post("/v1/completions", json={
        "model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    first = json.loads(sse_payloads(response.text)[0])
    ids, _ = mesh.expected_tokens(4)
    envelope = {"id": first["id"], "object": "text_completion", "created": first["created"],
                "model": MODEL_NAME}
    chunks = [{**envelope, "choices": [{"index": 0, "text": mesh._decode([t]), "logprobs": None,
                                        "finish_reason": "length" if i == 3 else None}]}
              for i, t in enumerate(ids)]
    chunks.append({**envelope, "choices": [],
                   "usage": {"prompt_tokens": len(prompt_ids()), "completion_tokens": 4,
                             "total_tokens": len(prompt_ids()) + 4}})
    expected = "".join(f"data: {compact(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    assert response.text == expected
    assert first["id"].startswith("cmpl-")


async def test_chat_stream_opens_with_role_and_ends_with_finish_reason(client, mesh):
    response = await client.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "stream": True, "max_tokens": 3,
        "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 4
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]
    _, text = mesh.expected_tokens(3)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    assert all("usage" not in c for c in chunks)  # include_usage not asked


async def test_stream_return_token_ids(client, mesh):
    response = await client.post("/v1/completions", json={
        "model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3, "stream": True,
        "return_token_ids": True})
    chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    ids, _ = mesh.expected_tokens(3)
    assert [c["choices"][0]["token_ids"] for c in chunks] == [[t] for t in ids]
    assert chunks[0]["prompt_token_ids"] == prompt_ids()
    assert all("prompt_token_ids" not in c for c in chunks[1:])


async def test_completion_non_streaming_with_token_ids(client, mesh):
    response = await client.post("/v1/completions", json={
        "model": MODEL_NAME, "prompt": [prompt_ids()], "max_tokens": 5,
        "return_token_ids": True})
    assert response.status_code == 200, response.text
    body = response.json()
    ids, text = mesh.expected_tokens(5)
    assert body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": text, "logprobs": None,
                                "finish_reason": "length", "token_ids": ids,
                                "prompt_token_ids": prompt_ids()}]
    assert body["prompt_token_ids"] == prompt_ids()
    n = len(prompt_ids())
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 5, "total_tokens": n + 5}


async def test_chat_non_streaming_applies_template_and_maps_sampling(client, mesh):
    response = await client.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "max_completion_tokens": 2, "temperature": 0.5, "top_p": 0.9,
        "top_k": 5, "seed": 7, "stop": "xyz", "stop_token_ids": [3], "ignore_eos": True,
        "presence_penalty": 0.1, "frequency_penalty": -0.2, "user": "ignored-field",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "hi "},
                                                  {"type": "text", "text": "there"}]}]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    _, text = mesh.expected_tokens(2)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert body["choices"][0]["finish_reason"] == "length"
    assert "token_ids" not in body["choices"][0] and "prompt_token_ids" not in body
    sent = mesh.received[-1].request
    rendered = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert sent.prompt_token_ids == prompt_ids(rendered)
    assert sent.sampling == Sampling(max_tokens=2, temperature=0.5, top_p=0.9, top_k=5, seed=7,
                                     stop=["xyz"], stop_token_ids=[3], ignore_eos=True,
                                     presence_penalty=0.1, frequency_penalty=-0.2)
    assert body["usage"]["prompt_tokens"] == len(sent.prompt_token_ids)


async def test_defaults_completion_16_tokens_chat_up_to_context(client, mesh):
    await client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPT})
    assert mesh.received[-1].request.sampling.max_tokens == 16
    response = await client.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200
    sent = mesh.received[-1].request
    assert sent.sampling.max_tokens == 256 - len(sent.prompt_token_ids)  # max_model_len 256
    assert response.json()["usage"]["completion_tokens"] == sent.sampling.max_tokens


async def test_a_late_router_answer_does_not_hold_the_stream(client, mesh):
    mesh.answer_delay_s = 3.0  # the worker's accepted and tokens come first
    started = time.monotonic()
    response = await client.post("/v1/completions", json={
        "model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "stream": True})
    assert response.status_code == 200 and time.monotonic() - started < 2.0
    ids, text = mesh.expected_tokens(4)
    chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_ledger_records_the_request(tmp_path, mesh):
    settings = make_settings(tmp_path)
    async with gateway_client(settings) as (app, http):
        response = await http.post("/v1/completions", json={
            "model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3, "stream": True})
        request_id = json.loads(sse_payloads(response.text)[0])["id"]
        row = await app.state.ledger.get(request_id)
    assert row["model"] == MODEL_NAME and row["stream"] is True
    assert row["prompt_tokens"] == len(prompt_ids())
    assert row["dispatch_instance"] == "fake-0"
    assert row["arrival_time"] <= row["dispatch_time"] <= row["first_token_time"]
    assert row["first_token_time"] <= row["finish_time"]
    assert (row["output_tokens"], row["finish_reason"], row["status"]) == (3, "length",
                                                                           "finished")
    assert row["error"] is None
    assert isinstance(app.state.ledger, Ledger)
