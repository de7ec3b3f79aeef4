"""Bounds on what one request may ask of a runner, checked before a runner is acquired.

A JSON schema (``format``, ``response_format``, tool parameters) becomes a grammar that
llama-server compiles before the first token: 400 optional properties took 1 s, 800 took 3 s,
2,000 took 16 s and 5,000 left the runner unresponsive. Prompts are capped below the body
limit: text longer than any context only costs tokenizing time on a shared slot.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ollamad.api.common import ApiError
from ollamad.settings import Settings


def schema_cost(*schemas: Any) -> tuple[int, int]:
    """(property count, JSON size in bytes) of ``schemas`` together (pure, no recursion)."""
    properties, stack = 0, list(schemas)
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                properties += len(props)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    size = sum(len(s) if isinstance(s, str) else len(json.dumps(s)) for s in schemas if s is not None)
    return properties, size


def check_schemas(settings: Settings, *schemas: Any) -> None:
    """400 when the grammar these schemas make would be too costly to compile."""
    properties, size = schema_cost(*schemas)
    if properties > settings.format_max_properties:
        raise ApiError(400, f"format: the JSON schema has {properties} properties "
                            f"(at most {settings.format_max_properties}, OLLAMAD_FORMAT_MAX_PROPERTIES)")
    if size > settings.format_max_bytes:
        raise ApiError(400, f"format: the JSON schema is {size} bytes "
                            f"(at most {settings.format_max_bytes}, OLLAMAD_FORMAT_MAX_BYTES)")


def check_prompt(settings: Settings, texts: Iterable[str | None]) -> None:
    """400 when the request's text (prompt, system, messages) is over OLLAMAD_MAX_PROMPT."""
    size = sum(len(t) for t in texts if isinstance(t, str))
    if size > settings.max_prompt:
        raise ApiError(400, f"prompt too long: {size} characters (at most {settings.max_prompt}, OLLAMAD_MAX_PROMPT)")


def openai_texts(messages: Iterable[Any]) -> Iterable[str]:
    """The text parts of OpenAI chat messages (content as a string or a list of parts)."""
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            yield from (p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
