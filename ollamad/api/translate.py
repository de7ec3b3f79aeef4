"""Ollama request/response shapes <-> llama-server's, as pure functions."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, ValidationError

from ollamad.models.options import PREDICT_PER_CTX, Options, deterministic


class _Function(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class _Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: _Function


class _CallFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class _ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    function: _CallFunction


def _each(shape: type[BaseModel], value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    for i, item in enumerate(value or []):
        try:
            shape.model_validate(item)
        except ValidationError as e:
            first = e.errors()[0]
            raise ValueError(f"item {i}: {'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None
    return value


def check_tools(value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Tools as Ollama and OpenAI define them; a malformed one is a 400 here, not a 500 upstream."""
    return _each(_Tool, value)


def _check_calls(value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    return _each(_ToolCall, value)


def _check_format(value: Any) -> Any:
    if value not in (None, "", "json") and not isinstance(value, dict):
        raise ValueError(f'invalid format {value!r}: use "json" or a JSON schema')
    return value


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: Annotated[list[dict[str, Any]] | None, AfterValidator(_check_calls)] = None
    tool_name: str | None = None
    thinking: str | None = None


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    stream: StrictBool = True
    format: Annotated[str | dict[str, Any] | None, AfterValidator(_check_format)] = None
    options: Options = Field(default_factory=lambda: Options())
    keep_alive: float | str | None = None
    truncate: StrictBool = True  # Ollama's: False answers 400 instead of dropping what does not fit


class GenerateRequest(_Base):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: StrictBool = False
    images: list[str] | None = None
    context: list[int] | None = None


class ChatRequest(_Base):
    messages: list[Message] = Field(default_factory=list)
    tools: Annotated[list[dict[str, Any]] | None, AfterValidator(check_tools)] = None


def describe_validation(err: ValidationError) -> str:
    parts = []
    for item in err.errors()[:5]:
        loc = ".".join(str(x) for x in item["loc"]) or "body"
        parts.append(f"{loc}: {item['msg']}")
    return "invalid request: " + "; ".join(parts)


_second: list[Any] = [-1, ""]


def now_iso() -> str:
    """UTC now as Ollama writes created_at; the date-time part is formatted once a second.

    Called once per streamed chunk: full datetime formatting was 8% of the relay's CPU.
    """
    t = time.time()
    sec = int(t)
    if sec != _second[0]:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{int((t - sec) * 1e6):06d}Z"


def format_param(fmt: str | dict[str, Any] | None) -> dict[str, Any]:
    """Ollama ``format`` ("json" or a JSON schema) -> llama-server's json_schema."""
    if fmt is None or fmt == "":
        return {}
    if fmt == "json":
        return {"json_schema": {}}
    if isinstance(fmt, dict):
        return {"json_schema": fmt}
    raise ValueError(f"invalid format {fmt!r}: use \"json\" or a JSON schema")


def done_reason(stop_type: str | None, finish_reason: str | None = None) -> str:
    if stop_type == "limit" or finish_reason == "length":
        return "length"
    return "stop"


def durations(timings: dict[str, Any] | None, total_ns: int, load_ns: int,
              prompt_tokens: int | None = None) -> dict[str, Any]:
    """Ollama's final-chunk counters from llama-server's ``timings`` (ns)."""
    t = timings or {}
    return {
        "total_duration": total_ns,
        "load_duration": load_ns,
        "prompt_eval_count": int(prompt_tokens if prompt_tokens is not None else t.get("prompt_n", 0)),
        "prompt_eval_duration": int(float(t.get("prompt_ms", 0)) * 1e6),
        "eval_count": int(t.get("predicted_n", 0)),
        "eval_duration": int(float(t.get("predicted_ms", 0)) * 1e6),
    }


def completion_payload(req: GenerateRequest, prompt: str | list[int] | dict[str, Any],
                       stream: bool = True) -> dict[str, Any]:
    payload: dict[str, Any] = {"prompt": prompt, "stream": stream}
    payload.update(req.options.sampling())
    payload["cache_prompt"] = not deterministic(payload)
    payload.update(format_param(req.format))
    if stream:
        payload["timings_per_token"] = False
    return payload


MEDIA_MARKER = "<__media__>"  # llama-server's default multimodal marker


def image_data(images: list[str]) -> list[str]:
    """Ollama's base64 images, checked; ValueError naming the bad one."""
    import base64
    import binascii

    out = []
    for i, img in enumerate(images):
        data = img.split(",", 1)[1] if img.startswith("data:") else img
        try:
            base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"images.{i}: invalid base64 image data") from None
        out.append(data)
    return out


def with_media_markers(text: str, count: int) -> str:
    """Put one marker per image before the text, where llama-server places the images."""
    return (MEDIA_MARKER + "\n") * count + text


def multimodal_prompt(prompt: str, images: list[str]) -> str | dict[str, Any]:
    """llama-server's /completion prompt: a string, or the text with its images' data."""
    if not images:
        return prompt
    if prompt.count(MEDIA_MARKER) != len(images):
        prompt = with_media_markers(prompt.replace(MEDIA_MARKER, ""), len(images))
    return {"prompt_string": prompt, "multimodal_data": images}


def chat_messages(req: ChatRequest) -> list[dict[str, Any]]:
    """Ollama chat messages -> OpenAI-style messages for llama-server's chat endpoint."""
    out: list[dict[str, Any]] = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": m.role}
        if m.images:
            parts: list[dict[str, Any]] = [{"type": "text", "text": m.content}] if m.content else []
            for img in m.images:
                parts.append({"type": "image_url", "image_url": {"url": _data_url(img)}})
            msg["content"] = parts
        else:
            msg["content"] = m.content
        if m.tool_calls:
            msg["tool_calls"] = [_to_openai_tool_call(i, tc) for i, tc in enumerate(m.tool_calls)]
        if m.role == "tool" and m.tool_name:
            msg["name"] = m.tool_name
        out.append(msg)
    return out


def _data_url(img: str) -> str:
    if img.startswith("data:"):
        return img
    return f"data:image/png;base64,{img}"


def _to_openai_tool_call(i: int, tc: dict[str, Any]) -> dict[str, Any]:
    import json

    fn = tc.get("function", {})
    args = fn.get("arguments", {})
    return {"id": tc.get("id", f"call_{i}"), "type": "function",
            "function": {"name": fn.get("name", ""),
                         "arguments": args if isinstance(args, str) else json.dumps(args)}}


def chat_payload(req: ChatRequest, stream: bool = True) -> dict[str, Any]:
    payload: dict[str, Any] = {"messages": chat_messages(req), "stream": stream}
    if stream:
        payload["stream_options"] = {"include_usage": True}
    payload.update(req.options.sampling())
    payload["cache_prompt"] = not deterministic(payload)
    if "n_predict" in payload:
        payload["max_tokens"] = payload.pop("n_predict")
    fmt = format_param(req.format)
    if fmt:
        schema = fmt["json_schema"]
        payload["response_format"] = (
            {"type": "json_object"} if not schema
            else {"type": "json_schema", "json_schema": {"name": "format", "schema": schema}})
    if req.tools:
        payload["tools"] = req.tools
    return payload


def ollama_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool calls (arguments as a JSON string) -> Ollama's (arguments as an object)."""
    import json

    out = []
    for c in calls:
        fn = c.get("function", {})
        args = fn.get("arguments") or "{}"
        try:
            parsed = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            parsed = {"_raw": args}
        out.append({"function": {"name": fn.get("name", ""), "arguments": parsed}})
    return out


def cap_predict(payload: dict[str, Any], ctx: int) -> dict[str, Any]:
    """As Ollama: no limit (-1), or one above 10 x the context, becomes 10 x the context, so a
    generation that shifts its context still ends (pure; ``payload`` is changed and returned)."""
    key = "max_tokens" if "max_tokens" in payload or "messages" in payload else "n_predict"
    cap = PREDICT_PER_CTX * ctx
    n = payload.get(key)
    if not isinstance(n, int) or n < 0 or n > cap:
        payload[key] = cap
    return payload


def tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> tuple[Any, list[dict[str, Any]] | None]:
    """OpenAI ``tool_choice`` as llama-server takes it: (choice, tools); ValueError says what is wrong.

    llama-server knows only "auto", "none" and "required"; a named function becomes "required"
    with only that function offered, which is what naming it means.
    """
    if value is None or value in ("auto", "none", "required"):
        return value, tools
    if isinstance(value, str):
        raise ValueError(f"invalid tool_choice {value!r}: use \"auto\", \"none\", \"required\" or "
                         '{"type": "function", "function": {"name": ...}}')
    fn = value.get("function") if isinstance(value, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str) or not name:
        raise ValueError('invalid tool_choice: an object must be {"type": "function", "function": {"name": ...}}')
    named = [t for t in tools or [] if (t.get("function") or {}).get("name") == name]
    if not named:
        raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")
    return "required", named
