"""The OpenAI routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``.

A handler checks the model name, refuses at once when no request slot is free, turns the
prompt into token ids, maps the sampling fields, and hands the rest to the ``Dispatcher``
(admission, span, ledger, submission). The answer is an SSE stream or one JSON body, both
rendered by the endpoint's renderer; either way the request is closed (aborted if unfinished,
budget freed) when the client leaves.
"""

from __future__ import annotations

import asyncio
import uuid
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kunserve.gateway.dependencies import DispatcherDep, ModelDep, TokenizerDep
from kunserve.gateway.disconnect import run_until_disconnect
from kunserve.gateway.errors import bad_request, context_length_exceeded, not_found
from kunserve.gateway.generation import Generation
from kunserve.gateway.openai_schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    ResponseModel,
    SamplingFields,
)
from kunserve.gateway.renderers import ChatRenderer, CompletionRenderer, Renderer
from kunserve.gateway.request_tracker import Arrival
from kunserve.gateway.sampling import build_sampling, check_prompt_length, check_token_ids
from kunserve.gateway.served_model import ServedModel
from kunserve.gateway.streaming import SSEResponse, sse_events
from kunserve.gateway.tokenization import ChatTemplateError, PromptTokenizer

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# texts longer than this are tokenized on a worker thread, not on the event loop
TOKENIZE_IN_THREAD_CHARS = 64 * 1024
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client left first"; nobody reads it

router = APIRouter()


@router.get("/v1/models")
async def list_models(model: ModelDep) -> ModelList:
    return ModelList(data=[ModelCard(id=model.name, created=model.created, root=model.path,
                                     max_model_len=model.max_model_len)])


@router.post("/v1/completions", responses={200: {"model": CompletionResponse}})
async def create_completion(body: CompletionRequest, request: Request, model: ModelDep,
                            tokenizer: TokenizerDep, dispatcher: DispatcherDep) -> Response:
    arrival = Arrival.now()
    request_id = f"cmpl-{uuid.uuid4().hex}"
    _check_model(body.model, model)
    dispatcher.check_capacity(request_id, arrival, body.stream)
    prompt_ids = await _completion_prompt_ids(body.prompt, tokenizer, model)
    renderer = CompletionRenderer(request_id, model.name, prompt_ids, body.return_token_ids)
    return await _serve(body, request, arrival, prompt_ids, model, dispatcher, renderer,
                        default_max_tokens=COMPLETION_DEFAULT_MAX_TOKENS)


@router.post("/v1/chat/completions", responses={200: {"model": ChatCompletionResponse}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 model: ModelDep, tokenizer: TokenizerDep,
                                 dispatcher: DispatcherDep) -> Response:
    arrival = Arrival.now()
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    _check_model(body.model, model)
    dispatcher.check_capacity(request_id, arrival, body.stream)
    messages = [{**(m.model_extra or {}), "role": m.role, "content": m.text()}
                for m in body.messages]
    try:
        text = tokenizer.render_chat(messages, body.add_generation_prompt)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from None
    prompt_ids = await _encode(text, tokenizer, model, "messages", add_special_tokens=False)
    renderer = ChatRenderer(request_id, model.name, prompt_ids, body.return_token_ids)
    return await _serve(body, request, arrival, prompt_ids, model, dispatcher, renderer,
                        default_max_tokens=None)


# -- shared steps ----------------------------------------------------------------------------
def _check_model(name: str, model: ServedModel) -> None:
    if name != model.name:
        raise not_found(f"The model `{name}` does not exist (this gateway serves "
                        f"`{model.name}`).", "model", "model_not_found")


async def _completion_prompt_ids(prompt, tokenizer: PromptTokenizer,
                                 model: ServedModel) -> list[int]:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise bad_request("batched prompts are not supported: send one prompt per "
                              "request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return await _encode(prompt, tokenizer, model, "prompt", add_special_tokens=True)
    check_prompt_length(len(prompt), model, "prompt")
    check_token_ids(prompt, model, "prompt")
    return prompt


async def _encode(text: str, tokenizer: PromptTokenizer, model: ServedModel, param: str,
                  add_special_tokens: bool) -> list[int]:
    if tokenizer.min_tokens(text) >= model.max_model_len:
        raise context_length_exceeded(
            f"This model's maximum context length is {model.max_model_len} tokens; the "
            f"{param} is longer than that.", param)
    encode = partial(tokenizer.encode, add_special_tokens=add_special_tokens)
    if len(text) > TOKENIZE_IN_THREAD_CHARS:
        ids = await asyncio.to_thread(encode, text)
    else:
        ids = encode(text)
    check_prompt_length(len(ids), model, param)
    return ids


async def _serve(body: SamplingFields, request: Request, arrival: Arrival,
                 prompt_ids: list[int], model: ServedModel, dispatcher: DispatcherDep,
                 renderer: Renderer, default_max_tokens: int | None) -> Response:
    sampling = build_sampling(body, len(prompt_ids), model, default_max_tokens)
    generation = await dispatcher.start(renderer.request_id, arrival, prompt_ids, sampling,
                                        body.stream)
    if body.stream:
        return SSEResponse(sse_events(generation, renderer, body.include_usage),
                           on_close=generation.close)
    try:
        response = await run_until_disconnect(request.receive,
                                              partial(_collect, generation, renderer))
    finally:
        generation.close()
    if response is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return Response(response.model_dump_json(), media_type="application/json")


async def _collect(generation: Generation, renderer: Renderer) -> ResponseModel:
    texts: list[str] = []
    token_ids: list[int] = []
    async for update in generation.updates():
        texts.append(update.text)
        token_ids.extend(update.token_ids)
    return renderer.response("".join(texts), token_ids, generation.finish_reason,
                             generation.num_prompt_tokens, generation.num_output_tokens)
