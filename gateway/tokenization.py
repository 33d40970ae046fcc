"""Prompts to token ids, with the checkpoint's own files and no ``transformers``.

``tokenizer.json`` is run by the ``tokenizers`` library; the chat template comes from
``tokenizer_config.json`` (``chat_template``, a string or a list of named templates) or a
``chat_template.jinja`` beside it, and is rendered with jinja2 the way ``transformers``'
``apply_chat_template`` does (sandboxed, ``trim_blocks``/``lstrip_blocks``,
``raise_exception``). Completions encode with the tokenizer's special tokens (its
post-processor, e.g. a BOS); chat prompts do not, since templates write their own.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class ChatTemplateError(ValueError):
    """The template refused the conversation (e.g. roles not alternating), or is missing."""


class PromptTokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = _read_json(model_dir / "tokenizer_config.json")
        self._special = {name: _token_text(config.get(name))
                         for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        source = _chat_template_source(model_dir, config)
        self._template = _compile(source) if source else None
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        # no token covers more characters of text than the longest token string has
        self._max_token_chars = max(map(len, vocab), default=1) or 1

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``add_special_tokens=False`` for rendered chat prompts."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         **self._special)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template: {exc}") from exc

    def min_tokens(self, text: str) -> int:
        """A lower bound on ``len(encode(text))`` that costs nothing: lets a huge prompt be
        refused without tokenizing it."""
        return len(text) // self._max_token_chars


def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent)
    return env.from_string(source)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _chat_template_source(model_dir: Path, config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default") or next(iter(named.values()), None)
    if template:
        return template
    jinja_file = model_dir / "chat_template.jinja"
    return jinja_file.read_text() if jinja_file.is_file() else None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
