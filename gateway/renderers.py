"""One generation's updates as OpenAI JSON: stream chunks and the whole response.

``CompletionRenderer`` speaks ``/v1/completions``, ``ChatRenderer`` ``/v1/chat/completions``;
both give the same four things (opening chunks, a chunk per update, the usage chunk, the
response), so the streaming and collecting code is shared. ``return_token_ids`` (vLLM):
``prompt_token_ids`` on the response (also on the completion choice, as vLLM puts it) or on the
first stream chunk, and ``token_ids`` on each choice.
"""

from __future__ import annotations

import time

from kunserve.gateway.openai_schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    ResponseModel,
    Usage,
)
from kunserve.protocol import RequestUpdate


class Renderer:
    def __init__(self, request_id: str, model_name: str, prompt_token_ids: list[int],
                 return_token_ids: bool) -> None:
        self.request_id = request_id
        self.model_name = model_name
        self.created = int(time.time())
        self.return_token_ids = return_token_ids
        self._prompt_token_ids = prompt_token_ids
        self._prompt_ids_sent = False

    def opening_chunks(self) -> list[str]:
        return []

    def chunk(self, update: RequestUpdate) -> str | None:
        """The chunk for one update, or None when it has nothing to show."""
        if not (update.text or update.finished or (self.return_token_ids and update.token_ids)):
            return None
        return self._chunk(update.text, self._ids(update.token_ids),
                           update.finish_reason if update.finished else None).model_dump_json()

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> str:
        return self._envelope([], usage=Usage.of(prompt_tokens, completion_tokens)
                              ).model_dump_json()

    def response(self, text: str, token_ids: list[int], finish_reason: str | None,
                 prompt_tokens: int, completion_tokens: int) -> ResponseModel:
        raise NotImplementedError

    def _chunk(self, text: str, token_ids: list[int] | None,
               finish_reason: str | None) -> ResponseModel:
        raise NotImplementedError

    def _envelope(self, choices: list, **fields) -> ResponseModel:
        raise NotImplementedError

    def _ids(self, token_ids: list[int]) -> list[int] | None:
        return token_ids if self.return_token_ids else None

    def _prompt_ids_once(self) -> list[int] | None:
        """The prompt's ids for the first stream chunk (return_token_ids only)."""
        if not self.return_token_ids or self._prompt_ids_sent:
            return None
        self._prompt_ids_sent = True
        return self._prompt_token_ids


class CompletionRenderer(Renderer):
    def response(self, text, token_ids, finish_reason, prompt_tokens, completion_tokens):
        prompt_ids = self._ids(self._prompt_token_ids)
        choice = CompletionChoice(text=text, finish_reason=finish_reason,
                                  token_ids=self._ids(token_ids), prompt_token_ids=prompt_ids)
        return self._envelope([choice], usage=Usage.of(prompt_tokens, completion_tokens),
                              prompt_token_ids=prompt_ids)

    def _chunk(self, text, token_ids, finish_reason):
        choice = CompletionChoice(text=text, finish_reason=finish_reason, token_ids=token_ids)
        return self._envelope([choice], prompt_token_ids=self._prompt_ids_once())

    def _envelope(self, choices, **fields):
        return CompletionResponse(id=self.request_id, created=self.created,
                                  model=self.model_name, choices=choices, **fields)


class ChatRenderer(Renderer):
    def opening_chunks(self) -> list[str]:
        """OpenAI's first chunk announces the role with empty content."""
        choice = ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))
        return [self._envelope([choice], prompt_token_ids=self._prompt_ids_once()
                               ).model_dump_json()]

    def response(self, text, token_ids, finish_reason, prompt_tokens, completion_tokens):
        choice = ChatChoice(message=ChatResponseMessage(content=text),
                            finish_reason=finish_reason, token_ids=self._ids(token_ids))
        return ChatCompletionResponse(
            id=self.request_id, created=self.created, model=self.model_name, choices=[choice],
            usage=Usage.of(prompt_tokens, completion_tokens),
            prompt_token_ids=self._ids(self._prompt_token_ids))

    def _chunk(self, text, token_ids, finish_reason):
        # the finishing chunk has an empty delta when it brings no text, as OpenAI's does
        delta = DeltaMessage(content=text if text or finish_reason is None else None)
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason, token_ids=token_ids)
        return self._envelope([choice])

    def _envelope(self, choices, **fields):
        return ChatCompletionChunk(id=self.request_id, created=self.created,
                                   model=self.model_name, choices=choices, **fields)
