"""The gateway tokenizes exactly as ``transformers`` does, without importing it at runtime."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gateway_harness import gateway_client, make_settings, model_dir

from kunserve.gateway.tokenization import ChatTemplateError, PromptTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a fox."},
     {"role": "assistant", "content": "Vulpes."},
     {"role": "user", "content": "Another, with ünïcödé 🦊?"}],
]

STRICT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    "{% endif %}"
    "{{ bos_token + message['role'] + ': ' + message['content'] | trim }}\n"
    "{% endfor %}")


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


@pytest.fixture(scope="module")
def tokenizer():
    return PromptTokenizer(model_dir())


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_matches_transformers(tokenizer, hf_tokenizer, messages, add_generation_prompt):
    expected_text = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = tokenizer.render_chat(messages, add_generation_prompt)
    assert text == expected_text
    expected_ids = hf_tokenizer(expected_text, add_special_tokens=False)["input_ids"]
    assert tokenizer.encode(text, add_special_tokens=False) == expected_ids


@pytest.mark.parametrize("text", ["The quick brown fox", "  spaces\tand\nnewlines ",
                                  "<|im_start|>special<|im_end|>", "日本語 🦊"])
def test_completion_prompt_matches_transformers(tokenizer, hf_tokenizer, text):
    assert tokenizer.encode(text) == hf_tokenizer(text)["input_ids"]


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_min_tokens_is_a_lower_bound(tokenizer, text):
    assert tokenizer.min_tokens(text) <= len(tokenizer.encode(text))


def test_template_sources_and_template_errors(tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(model_dir(), checkpoint)
    config_file = checkpoint / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "unused"},
                               {"name": "default", "template": STRICT_TEMPLATE}]
    config_file.write_text(json.dumps(config))
    strict = PromptTokenizer(checkpoint)
    assert strict.render_chat([{"role": "user", "content": " hi "}]) == (
        "<|begin_of_text|>user: hi\n")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        strict.render_chat([{"role": "assistant", "content": "hi"}])

    del config["chat_template"]
    config_file.write_text(json.dumps(config))
    assert not PromptTokenizer(checkpoint).has_chat_template
    with pytest.raises(ChatTemplateError, match="no chat template"):
        PromptTokenizer(checkpoint).render_chat([{"role": "user", "content": "hi"}])
    (checkpoint / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert PromptTokenizer(checkpoint).render_chat([{"role": "user", "content": "hi"}]) == "hi!"


async def test_template_refusal_is_a_400(tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(model_dir(), checkpoint)
    config_file = checkpoint / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "chat_template": STRICT_TEMPLATE}))
    settings = make_settings(tmp_path, model=str(checkpoint), served_model_name="strict")
    async with gateway_client(settings) as (_, client):
        response = await client.post("/v1/chat/completions", json={
            "model": "strict", "messages": [{"role": "assistant", "content": "hi"}]})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "chat template: Conversation roles must alternate user/assistant")
    assert response.json()["error"]["param"] == "messages"
