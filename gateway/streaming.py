"""Server-sent events framed exactly as OpenAI's: ``data: {json}\\n\\n`` per chunk, then
``data: [DONE]\\n\\n``.

``sse_events`` turns a ``Generation`` into those bytes through a renderer; an error after the
stream began becomes one ``data: {"error": {...}}`` event before ``[DONE]`` (the status line is
already sent). ``SSEResponse`` sends them and, whatever happens (end, client gone, error),
calls ``on_close`` once, which aborts an unfinished request and frees its budget.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from functools import partial

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from kunserve.gateway.disconnect import run_until_disconnect
from kunserve.gateway.errors import OpenAIError
from kunserve.gateway.generation import Generation
from kunserve.gateway.renderers import Renderer

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: str) -> bytes:
    return b"data: " + payload.encode() + b"\n\n"


async def sse_events(generation: Generation, renderer: Renderer,
                     include_usage: bool) -> AsyncIterator[bytes]:
    for chunk in renderer.opening_chunks():
        yield sse_event(chunk)
    try:
        async for update in generation.updates():
            chunk = renderer.chunk(update)
            if chunk is not None:
                yield sse_event(chunk)
    except OpenAIError as exc:
        yield sse_event(json.dumps(exc.body(), separators=(",", ":")))
        yield DONE
        return
    if include_usage:
        yield sse_event(renderer.usage_chunk(generation.num_prompt_tokens,
                                             generation.num_output_tokens))
    yield DONE


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        self._events = events
        self._on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers(SSE_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await run_until_disconnect(receive, partial(self._stream, send))
        except OSError:  # the client went away mid-write
            pass
        finally:
            self._on_close()
            await self._events.aclose()

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        async for event in self._events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
