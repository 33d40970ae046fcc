"""The whole mesh as a user runs it: ``kunserve up --instances 2`` (real nats-server,
redis-server, planner, router, two worker processes, gateway) and the official ``openai``
client, unchanged. Greedy outputs must equal transformers' on the same checkpoint."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import httpx
import openai
import pytest

from tests.conftest import hf_greedy
from tests.stack import running_stack


@pytest.fixture(scope="module")
def stack(model_dirs, tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    with running_stack(model_dirs["llama-gqa"], state) as (_, url):
        yield {"url": url, "ledger": state / "ledger.db", "model_dir": model_dirs["llama-gqa"]}


@pytest.fixture(scope="module")
def model_name(stack) -> str:
    return httpx.get(f"{stack['url']}/v1/models", timeout=10).json()["data"][0]["id"]


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack['url']}/v1", api_key="unused", max_retries=0)


def test_streaming_chat_matches_transformers(stack, model_name):
    stream = client(stack).chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Bonjour, ça va ?"}],
        max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True})
    prompt_ids, token_ids, text, usage, finish = None, [], "", None, None
    for chunk in stream:
        extra = chunk.model_extra or {}
        prompt_ids = prompt_ids or extra.get("prompt_token_ids")
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            token_ids += (choice.model_extra or {}).get("token_ids") or []
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert prompt_ids, "return_token_ids gives the prompt ids on the first chunk"
    assert token_ids == hf_greedy(stack["model_dir"], prompt_ids, 12)
    assert finish == "length"
    assert usage.completion_tokens == 12 and usage.prompt_tokens == len(prompt_ids)
    assert text  # detokenized on the worker, streamed as deltas


def test_completion_matches_transformers(stack, model_name):
    result = client(stack).completions.create(
        model=model_name, prompt="The quick brown fox", max_tokens=10, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True})
    extra = result.model_extra or {}
    choice = result.choices[0]
    prompt_ids = extra.get("prompt_token_ids") or (choice.model_extra or {})["prompt_token_ids"]
    assert (choice.model_extra or {})["token_ids"] == hf_greedy(stack["model_dir"],
                                                               prompt_ids, 10)
    assert choice.finish_reason == "length" and result.usage.completion_tokens == 10


def test_concurrent_requests_spread_over_both_workers(stack, model_name):
    async def run() -> list:
        aclient = openai.AsyncOpenAI(base_url=f"{stack['url']}/v1", api_key="unused",
                                     max_retries=0)
        calls = [aclient.completions.create(model=model_name, prompt=f"request {i}",
                                            max_tokens=16, temperature=0,
                                            extra_body={"ignore_eos": True})
                 for i in range(12)]
        return await asyncio.gather(*calls)

    results = asyncio.run(run())
    assert all(r.usage.completion_tokens == 16 for r in results)
    ids = {r.id for r in results}
    deadline = time.monotonic() + 10  # the ledger writes in batches, up to 0.5 s late
    while True:
        with sqlite3.connect(stack["ledger"]) as db:
            rows = db.execute("SELECT request_id, dispatch_instance FROM requests").fetchall()
        instances = {inst for rid, inst in rows if any(rid in i for i in ids)}
        if instances == {"worker-0", "worker-1"} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert instances == {"worker-0", "worker-1"}


@pytest.mark.parametrize("body, status", [
    ("{not json", 400),
    ({"prompt": "hi", "max_tokens": 4}, 400),  # no model
    ({"model": "MODEL", "prompt": "hi", "max_tokens": -1}, 400),
    ({"model": "MODEL", "prompt": "hi", "max_tokens": 10**9}, 400),
    ({"model": "MODEL", "prompt": "hi", "temperature": 7}, 400),
    ({"model": "MODEL", "prompt": "hi", "top_p": 0}, 400),
    ({"model": "MODEL", "prompt": 12}, 400),
    ({"model": "nope", "prompt": "hi"}, 404),
    ({"model": "MODEL", "prompt": "word " * 5000, "max_tokens": 1}, 400),  # over the context
])
def test_bad_input_gets_openai_errors_and_the_stack_keeps_serving(stack, model_name, body,
                                                                  status):
    url = f"{stack['url']}/v1/completions"
    if isinstance(body, dict):
        body = {k: (model_name if v == "MODEL" else v) for k, v in body.items()}
        response = httpx.post(url, json=body, timeout=30)
    else:
        response = httpx.post(url, content=body, timeout=30,
                              headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    ok = httpx.post(url, json={"model": model_name, "prompt": "still there?", "max_tokens": 2},
                    timeout=30)
    assert ok.status_code == 200
