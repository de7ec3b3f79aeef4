"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable
from typing import Annotated, Any

import msgspec
from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, ValidationError

from ollamad.api.common import (
    CTX,
    ApiError,
    AppContext,
    check_capable,
    dumps,
    model_facts,
    read_json,
    reply,
    resolve,
    validate,
)
from ollamad.api.embedding import check_count, shorten, stream_embeddings
from ollamad.api.limits import check_prompt, check_schemas, openai_texts
from ollamad.api.relay import forward_pushed
from ollamad.api.reqlog import record_of
from ollamad.api.runner_calls import one_reply
from ollamad.api.translate import cap_predict, check_tools, tool_choice
from ollamad.api.truncate import fit_openai, too_long
from ollamad.models.catalog import Model
from ollamad.models.facts import ModelFacts
from ollamad.models.options import Options, deterministic, with_ollama_defaults
from ollamad.models.plan import request_context
from ollamad.runner.events import UpstreamError

# OpenAI parameter names that llama-server takes as they are, and Ollama's names for the rest
_OLLAMA_TO_OPENAI = {"num_predict": "max_tokens"}


class _OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    stream: StrictBool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    stream_options: dict[str, Any] | None = None


class ChatCompletionRequest(_OpenAIBase):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: Annotated[list[dict[str, Any]] | None, AfterValidator(check_tools)] = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_OpenAIBase):
    prompt: str | list[str]
    suffix: str | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: str | list[str]
    encoding_format: str = "float"
    dimensions: int | None = Field(None, ge=1)



def upstream_payload(body: dict[str, Any], defaults: dict[str, object]) -> dict[str, Any]:
    """The client's OpenAI body for llama-server, with the model's default options under it (pure).

    ValueError for a ``tool_choice`` llama-server cannot honour.
    """
    payload: dict[str, Any] = {}
    try:
        sampling = Options.model_validate(defaults).sampling() if defaults else {}
    except ValidationError:
        sampling = {}
    for key, value in sampling.items():
        payload[_OLLAMA_TO_OPENAI.get("num_predict" if key == "n_predict" else key, key)] = value
    payload.update({k: v for k, v in body.items() if v is not None})
    if "max_completion_tokens" in payload:
        payload["max_tokens"] = payload.pop("max_completion_tokens")
    payload.pop("model", None)
    payload.setdefault("cache_prompt", not deterministic(payload))
    if "tool_choice" in payload:
        payload["tool_choice"], tools = tool_choice(payload["tool_choice"], payload.get("tools"))
        if tools is not None:
            payload["tools"] = tools
    return payload


def _payload(body: dict[str, Any], model: Model, facts: ModelFacts, ctx: AppContext) -> dict[str, Any]:
    """upstream_payload with Ollama's defaults under the model's, num_predict capped as Ollama does."""
    try:
        payload = upstream_payload(body, with_ollama_defaults(model.defaults.options))
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    num_ctx = request_context(facts, None, model.defaults, ctx.scheduler.plan_settings)
    return cap_predict(payload, num_ctx)


async def _forward(request: web.Request, ctx: AppContext, model: Model, name: str, path: str,
                   payload: dict[str, Any], facts: ModelFacts) -> web.StreamResponse:
    lease = await ctx.scheduler.acquire(model, facts=facts)
    record_of(request).dispatched(model.name, lease)
    async with lease:
        if payload.get("stream"):
            return await forward_pushed(request, ctx, lease, path, payload, name)
        body = msgspec.json.decode(await one_reply(ctx, lease, path, payload))
        body["model"] = name
        body["system_fingerprint"] = "fp_ollama"
        return reply(body)


def _check_costs(ctx: AppContext, body: dict[str, Any], texts: Iterable[str]) -> None:
    """Schemas and grammars in any of the places llama-server reads them, and the prompt's size."""
    check_schemas(ctx.settings, *(body.get(k) for k in ("response_format", "tools", "json_schema", "grammar")))
    check_prompt(ctx.settings, texts)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    body = await read_json(request)
    req: ChatCompletionRequest = validate(ChatCompletionRequest, body)
    _check_costs(ctx, body, openai_texts(req.messages))
    model, facts = model_facts(ctx, req.model)
    check_capable(req.model, facts, "chat" if facts.embedding else "completion")
    if req.tools:
        check_capable(req.model, facts, "tools")
    if any(isinstance(m.get("content"), list) and any(isinstance(p, dict) and p.get("type") == "image_url"
                                                      for p in m["content"]) for m in req.messages):
        check_capable(req.model, facts, "vision")
    payload = _payload(body, model, facts, ctx)
    if not facts.chat_template:  # Ollama's {{ .Prompt }}: the user turns only (plan.PROMPT_ONLY_TEMPLATE)
        payload["messages"] = [m for m in req.messages if m.get("role") != "system"]
    elif model.system and not any(m.get("role") == "system" for m in req.messages):
        payload["messages"] = [{"role": "system", "content": model.system}, *req.messages]
    return await _send(request, ctx, model, req.model, "/v1/chat/completions", payload, facts)


async def _send(request: web.Request, ctx: AppContext, model: Model, name: str, path: str,
                payload: dict[str, Any], facts: ModelFacts) -> web.StreamResponse:
    """_forward; a body llama-server refuses as longer than the context is cut as Ollama cuts it."""
    record_of(request).model = model.name
    try:
        return await _forward(request, ctx, model, name, path, payload, facts)
    except UpstreamError as e:
        if not too_long(e):
            raise
    return await _forward(request, ctx, model, name, path, await fit_openai(ctx, model, name, path, payload), facts)


async def completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    body = await read_json(request)
    req: CompletionRequest = validate(CompletionRequest, body)
    _check_costs(ctx, body, [req.prompt] if isinstance(req.prompt, str) else req.prompt)
    model, facts = model_facts(ctx, req.model)
    check_capable(req.model, facts, "generate" if facts.embedding else "completion")
    if req.suffix:
        check_capable(req.model, facts, "insert")
    payload = _payload(body, model, facts, ctx)
    return await _send(request, ctx, model, req.model, "/v1/completions", payload, facts)


def encode_base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: little-endian float32 (pure)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def embeddings(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    req: EmbeddingRequest = validate(EmbeddingRequest, await read_json(request))
    if req.encoding_format not in ("float", "base64"):
        raise ApiError(400, f"invalid encoding_format {req.encoding_format!r}: use float or base64")
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    if not texts or any(not t for t in texts):
        raise ApiError(400, "input must be a non-empty string or a list of non-empty strings")
    check_count(ctx, texts)
    model = resolve(ctx, req.model)

    def item(i: int, v: list[float]) -> bytes:
        v = shorten(v, req.dimensions)
        return dumps({"object": "embedding", "index": i,
                      "embedding": encode_base64(v) if req.encoding_format == "base64" else v})[:-1]

    def tail(tokens: int, _: float) -> bytes:
        return b"]," + dumps({"model": req.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})[1:]

    return await stream_embeddings(request, ctx, model, req.model, texts, truncate=True, options=Options(),
                                   keep_alive=None, head=b'{"object":"list","data":[', item=item, tail=tail)


def _model_entry(m: Model) -> dict[str, Any]:
    owner = m.name.split("/")[0] if "/" in m.name else "library"
    return {"id": m.name, "object": "model", "created": int(m.modified), "owned_by": owner}


async def list_models(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    models = sorted(ctx.catalog.list(), key=lambda m: -m.modified)
    return reply({"object": "list", "data": [_model_entry(m) for m in models]})


async def get_model(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    name = request.match_info["model"]
    try:
        model = resolve(ctx, name)
    except ApiError as e:
        if e.status == 404:
            raise ApiError(404, f'model "{name}" not found') from None
        raise
    return reply(_model_entry(model))


def register(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
