"""Every bad input gets the right 4xx in the OpenAI error shape, and the gateway keeps serving;
mesh failures get 503 (or 500 for a worker error), mid-stream failures an SSE error event."""

from __future__ import annotations

import json

import pytest
from test_gateway_harness import (
    MODEL_NAME,
    FakeMesh,
    clear_redis,
    gateway_client,
    make_settings,
    sse_payloads,
)

OK = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 2}
CHAT_OK = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def assert_openai_error(response, status: int, text: str, param: str | None = "-",
                        code: str | None = "-") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert text in error["message"], error
    if param != "-":
        assert error["param"] == param, error
    if code != "-":
        assert error["code"] == code, error
    return error


@pytest.fixture
async def mesh():
    await clear_redis()
    async with FakeMesh() as fake:
        yield fake


@pytest.fixture
async def client(tmp_path, mesh):
    async with gateway_client(make_settings(tmp_path)) as (_, http):
        yield http


BAD_COMPLETIONS = [
    ({**OK, "n": 2}, "n > 1 is not supported", "n"),
    ({**OK, "max_tokens": -1}, "max_tokens must be at least 1", "max_tokens"),
    ({**OK, "max_tokens": 0}, "max_tokens must be at least 1", "max_tokens"),
    ({**OK, "max_tokens": 10**30}, "maximum context length is 256", "max_tokens"),
    ({**OK, "max_tokens": 253}, "maximum context length is 256", "max_tokens"),
    ({**OK, "max_tokens": "many"}, "valid integer", "max_tokens"),
    ({**OK, "temperature": 2.5}, "temperature must be in [0, 2]", "temperature"),
    ({**OK, "temperature": "hot"}, "valid number", "temperature"),
    ({**OK, "top_p": 0}, "top_p must be in (0, 1]", "top_p"),
    ({**OK, "top_p": 1.5}, "top_p must be in (0, 1]", "top_p"),
    ({**OK, "top_k": -2}, "top_k must be", "top_k"),
    ({**OK, "presence_penalty": 3}, "presence_penalty must be in [-2, 2]", "presence_penalty"),
    ({**OK, "stop": [""]}, "stop strings must be non-empty", "stop"),
    ({**OK, "stop_token_ids": [512]}, "out of the vocabulary", "stop_token_ids"),
    ({**OK, "seed": 2**70}, "less than", "seed"),
    ({"model": MODEL_NAME, "max_tokens": 2}, "Field required", "prompt"),
    ({"prompt": "hi"}, "Field required", "model"),
    ({**OK, "prompt": 42}, "prompt must be a string", "prompt"),
    ({**OK, "prompt": ["a", "b"]}, "batched prompts are not supported", "prompt"),
    ({**OK, "prompt": [[1, 2], [3]]}, "batched prompts are not supported", "prompt"),
    ({**OK, "prompt": ""}, "prompt is empty", "prompt"),
    ({**OK, "prompt": []}, "prompt is empty", "prompt"),
    ({**OK, "prompt": [5, 99999]}, "token id 99999 is out of the vocabulary", "prompt"),
    ({**OK, "prompt": [-1]}, "token id -1 is out of the vocabulary", "prompt"),
    ({**OK, "prompt": list(range(10, 266))}, "maximum context length is 256", "prompt"),
    ({**OK, "prompt": "word " * 300}, "maximum context length is 256", "prompt"),
    ({**OK, "prompt": "x" * 100_000}, "maximum context length is 256", "prompt"),
    ({**OK, "logprobs": 3}, "logprobs is not supported", "logprobs"),
    ({**OK, "echo": True}, "echo is not supported", "echo"),
    ({**OK, "suffix": "end"}, "suffix is not supported", "suffix"),
    ({**OK, "best_of": 3}, "best_of > 1 is not supported", "best_of"),
    ({**OK, "stream_options": {"include_usage": True}}, "stream_options is only allowed with "
     "stream: true", "stream_options"),
]


@pytest.mark.parametrize(("body", "message", "param"), BAD_COMPLETIONS,
                         ids=[m for _, m, _ in BAD_COMPLETIONS])
async def test_bad_completion_request_is_400(client, mesh, body, message, param):
    error = assert_openai_error(await client.post("/v1/completions", json=body), 400, message,
                                param)
    assert error["type"] == "invalid_request_error"
    assert mesh.received == []  # refused before reaching the mesh


BAD_CHATS = [
    ({**CHAT_OK, "messages": []}, "at least 1 item", "messages"),
    ({**CHAT_OK, "messages": "hi"}, "valid list", "messages"),
    ({**CHAT_OK, "messages": [{"content": "hi"}]}, "Field required", "messages[0].role"),
    ({**CHAT_OK, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "content must be a string or a list", "messages[0].content"),
    ({**CHAT_OK, "n": 3}, "n > 1 is not supported", "n"),
    ({**CHAT_OK, "tools": [{"type": "function"}]}, "tools are not supported", "tools"),
    ({**CHAT_OK, "top_logprobs": 2}, "logprobs is not supported", "top_logprobs"),
    ({**CHAT_OK, "response_format": {"type": "json_object"}}, "response_format other than "
     "text is not supported", "response_format"),
    ({**CHAT_OK, "messages": [{"role": "wizard", "content": "hi"}]},
     "messages[0].role: role must be one of system, developer, user, assistant, tool, "
     "function, got 'wizard'", "messages[0].role"),
    ({**CHAT_OK, "messages": [{"role": "user", "content": None}]},
     "messages[0]: a user message needs content", "messages[0]"),
    ({**CHAT_OK, "max_completion_tokens": 1000}, "maximum context length", "max_tokens"),
    ({**CHAT_OK, "messages": [{"role": "user", "content": "word " * 400}]},
     "maximum context length is 256", "messages"),
]


@pytest.mark.parametrize(("body", "message", "param"), BAD_CHATS,
                         ids=[m for _, m, _ in BAD_CHATS])
async def test_bad_chat_request_is_400(client, body, message, param):
    assert_openai_error(await client.post("/v1/chat/completions", json=body), 400, message,
                        param)


async def test_malformed_and_odd_bodies_are_400_and_the_app_keeps_serving(client, mesh):
    post = client.post
    for content, headers in [(b'{"model": ', {}), (b"not json", {}), (b"[1, 2]", {}),
                             (b'"prompt"', {}), (b"", {}),
                             (b'{"model": "x"}', {"content-type": "text/plain"}),
                             (b'\xff\xfe{"model"', {"content-type": "application/json"})]:
        response = await post("/v1/completions", content=content,
                              headers={"content-type": "application/json", **headers})
        assert_openai_error(response, 400, "")
    response = await post("/v1/completions", content=b'{"model": ', headers={
        "content-type": "application/json"})
    assert "malformed JSON" in response.json()["error"]["message"]
    response = await post("/v1/completions", json=OK)
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"]


@pytest.mark.parametrize("content_type", [None, "text/plain",
                                          "application/x-www-form-urlencoded"])
async def test_a_json_body_is_read_as_json_whatever_its_content_type(client, content_type):
    """``curl -d`` sends a form's content type: the body is JSON all the same, as on the
    admin endpoints."""
    headers = {"content-type": content_type} if content_type else {}
    response = await client.post("/v1/completions", content=json.dumps(OK).encode(),
                                 headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"]


async def test_unknown_model_and_route_are_404(client):
    assert_openai_error(await client.post("/v1/completions", json={**OK, "model": "gpt-9"}),
                        404, "The model `gpt-9` does not exist", "model", "model_not_found")
    assert_openai_error(await client.post("/v1/chat/completions",
                                          json={**CHAT_OK, "model": "gpt-9"}),
                        404, "does not exist", "model", "model_not_found")
    assert_openai_error(await client.get("/v1/nothing"), 404, "no route GET /v1/nothing")
    assert_openai_error(await client.get("/v1/completions"), 405, "Method Not Allowed")


async def test_body_over_limit_is_413(tmp_path, mesh):
    async with gateway_client(make_settings(tmp_path, max_body_bytes=64 * 1024)) as (_, client):
        big = {**OK, "prompt": "x" * (70 * 1024)}
        assert_openai_error(await client.post("/v1/completions", json=big), 413,
                            "larger than 65536 bytes", code="request_too_large")

        async def chunked():  # no Content-Length: counted while read
            yield b'{"model": "tiny-llama", "prompt": "'
            for _ in range(80):
                yield b"x" * 1024
            yield b'"}'
        assert_openai_error(await client.post("/v1/completions", content=chunked()), 413,
                            "larger than")
        assert (await client.post("/v1/completions", json=OK)).status_code == 200


async def test_no_live_worker_is_503(client, mesh):
    mesh.mode = "no_worker"
    for stream in (False, True):
        response = await client.post("/v1/completions", json={**OK, "stream": stream})
        assert_openai_error(response, 503, "no live worker instance")
        assert not response.headers["content-type"].startswith("text/event-stream")


async def test_no_router_is_503_at_once(tmp_path):
    await clear_redis()
    async with gateway_client(make_settings(tmp_path, dispatch_timeout_s=30)) as (_, client):
        response = await client.post("/v1/completions", json=OK)
    assert_openai_error(response, 503, "no router is running")


async def test_worker_error_before_and_after_first_byte(client, mesh):
    mesh.mode = "error"  # the worker fails after its first token
    response = await client.post("/v1/completions", json={**OK, "max_tokens": 5})
    assert_openai_error(response, 500, "instance fake-0: CUDA error: out of memory")
    response = await client.post("/v1/completions", json={**OK, "max_tokens": 5,
                                                           "stream": True})
    assert response.status_code == 200  # the stream had begun
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[0])["choices"][0]["text"]
    assert json.loads(payloads[-2])["error"]["message"].endswith("out of memory")


async def test_a_request_the_worker_refuses_is_a_400_not_a_500(client, mesh):
    mesh.mode = "rejected"
    for stream in (False, True):
        response = await client.post("/v1/completions", json={**OK, "stream": stream})
        assert_openai_error(response, 400, "instance fake-0: the prompt needs 9 tokens of KV "
                                           "cache but this instance holds only 8")
        assert response.json()["error"]["type"] == "invalid_request_error"
    mesh.mode = "stream"  # and the gateway goes on serving
    assert (await client.post("/v1/completions", json=OK)).status_code == 200


async def test_silent_worker_times_out_with_503_and_abort(tmp_path, mesh):
    mesh.mode = "hold"
    settings = make_settings(tmp_path, request_timeout_s=0.3)
    async with gateway_client(settings) as (_, client):
        response = await client.post("/v1/completions", json=OK)
        assert_openai_error(response, 503, "the worker went silent within 0.3s")
        await mesh.aborted.wait()
    assert mesh.aborts[0].request_id == mesh.received[0].request.request_id
