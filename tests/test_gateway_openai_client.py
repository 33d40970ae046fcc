"""The official ``openai`` client against the gateway on a real port (uvicorn thread)."""

from __future__ import annotations

import openai
import pytest
from test_gateway_harness import (
    MODEL_NAME,
    FakeMesh,
    clear_redis,
    make_settings,
    served_gateway,
)


@pytest.fixture
async def mesh():
    await clear_redis()
    async with FakeMesh(token_delay_s=0.001) as fake:
        yield fake


@pytest.fixture
async def client(tmp_path, mesh):
    with served_gateway(make_settings(tmp_path)) as (url, _):
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused",
                                      max_retries=0) as client:
            yield client


async def test_streaming_chat(client, mesh):
    stream = await client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Say hello"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True}, temperature=0)
    chunks = [chunk async for chunk in stream]
    _, text = mesh.expected_tokens(6)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert mesh.received[-1].request.sampling.temperature == 0


async def test_non_streaming_completion(client, mesh):
    completion = await client.completions.create(model=MODEL_NAME, prompt="Once upon a time",
                                                 max_tokens=5, seed=1, stop=["\n\n"])
    ids, text = mesh.expected_tokens(5)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == text
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 5
    extended = await client.completions.create(model=MODEL_NAME, prompt=[1, 2, 3], max_tokens=2,
                                               extra_body={"return_token_ids": True})
    assert extended.model_extra["prompt_token_ids"] == [1, 2, 3]
    assert extended.choices[0].model_extra["token_ids"] == ids[:2]


async def test_errors_raise_the_clients_exceptions(client, mesh):
    with pytest.raises(openai.BadRequestError, match="n > 1 is not supported"):
        await client.completions.create(model=MODEL_NAME, prompt="hi", n=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await client.chat.completions.create(model="gpt-4o", messages=[
            {"role": "user", "content": "hi"}])
    mesh.mode = "no_worker"
    with pytest.raises(openai.InternalServerError) as unavailable:
        await client.completions.create(model=MODEL_NAME, prompt="hi", stream=True)
    assert unavailable.value.status_code == 503
