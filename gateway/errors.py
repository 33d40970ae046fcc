"""Errors in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``.

Handlers raise ``OpenAIError`` (through the constructors below); ``install_error_handlers``
turns it, FastAPI's validation errors (422 there, 400 here), unknown routes and anything
unexpected into that shape, so the process answers every bad input and keeps serving.

=====  ==========================  ====================================================
400    invalid_request_error       malformed JSON, wrong types, missing fields, values out
                                   of range, n > 1, unsupported options, empty prompt,
                                   token ids outside the vocab, prompt (+ max_tokens) over
                                   max_model_len (code ``context_length_exceeded``), a chat
                                   template that refuses the conversation
401    authentication_error        admin endpoints without the bearer token
404    invalid_request_error       unknown model (code ``model_not_found``), unknown route
405    invalid_request_error       wrong method on a known route
409    conflict_error              admin drop/restore while another reconfiguration of those
                                   instances is under way
413    invalid_request_error       request body over ``max_body_bytes`` (only that: a long
                                   prompt in a small body is a 400, as with OpenAI)
429    rate_limit_error            admission budget full; ``Retry-After`` header
500    server_error                the worker reported an error; unexpected gateway error
503    service_unavailable_error   no router, no live worker, no planner, NATS down, timeouts
=====  ==========================  ====================================================
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def context_length_exceeded(message: str, param: str = "messages") -> OpenAIError:
    return bad_request(message, param, "context_length_exceeded")


def invalid_body(errors: list[dict]) -> OpenAIError:
    """pydantic's validation errors as one 400: FastAPI's request bodies and the bodies the
    admin handlers validate themselves (after the token check)."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return bad_request(f"malformed JSON body: {detail}".rstrip(": "))
    messages = [_describe(error) for error in errors]
    param = _param(first.get("loc", ())) or None
    return bad_request("; ".join(messages) or "invalid request", param)


def unauthorized(message: str = "a valid admin bearer token is required") -> OpenAIError:
    return OpenAIError(401, message, "authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def not_found(message: str, param: str | None = None, code: str = "not_found") -> OpenAIError:
    return OpenAIError(404, message, "invalid_request_error", param, code)


def payload_too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"request body larger than {limit} bytes",
                       "invalid_request_error", code="request_too_large")


def conflict(message: str, code: str | None = None) -> OpenAIError:
    return OpenAIError(409, message, "conflict_error", code=code)


def too_many_requests(message: str, retry_after_s: int) -> OpenAIError:
    return OpenAIError(429, message, "rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(retry_after_s)})


def service_unavailable(message: str) -> OpenAIError:
    return OpenAIError(503, message, "service_unavailable_error", code="service_unavailable")


def server_error(message: str) -> OpenAIError:
    return OpenAIError(500, message, "server_error", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return exc.response()


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return invalid_body(list(exc.errors())).response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        error = not_found(f"no route {request.method} {request.url.path}")
    else:
        error = OpenAIError(exc.status_code, str(exc.detail), "invalid_request_error")
    error.headers = dict(exc.headers or {}) or None
    return error.response()


async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return server_error(f"internal error: {exc.__class__.__name__}").response()


def _describe(error: dict) -> str:
    """The message, after the field it is about unless it starts with its name."""
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    param = _param(error.get("loc", ()))
    if not param or message.startswith(f"{param} "):
        return message
    return f"{param}: {message}"


def _param(loc: tuple | list) -> str:
    """``("body", "messages", 0, "content")`` -> ``messages[0].content``."""
    text = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
