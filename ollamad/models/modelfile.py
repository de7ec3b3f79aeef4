"""Ollama's Modelfile text -> the fields of a /api/create body (pure).

Older clients send ``{"modelfile": "FROM ...\\nPARAMETER ..."}``; newer ones send the fields.
"""

from __future__ import annotations

import json
import re
from typing import Any

_COMMAND = re.compile(r"^\s*(FROM|PARAMETER|TEMPLATE|SYSTEM|LICENSE|ADAPTER|MESSAGE)\s+(.*)$",
                      re.IGNORECASE | re.DOTALL)


class ModelfileError(ValueError):
    pass


def _value(text: str) -> Any:
    """A PARAMETER value: a number or true/false where it reads as one, else the (unquoted) text."""
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] == '"':
        return json.loads(t) if t.count('"') == 2 else t[1:-1]
    if t in ("true", "false"):
        return t == "true"
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def _statements(text: str) -> list[tuple[str, str]]:
    """Split into (command, argument); a triple-quoted argument may span lines."""
    out: list[tuple[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _COMMAND.match(line)
        if not m:
            raise ModelfileError(f"modelfile line {i}: unknown command {line.split()[0]!r}")
        cmd, arg = m.group(1).upper(), m.group(2)
        if arg.lstrip().startswith('"""'):
            body = arg.lstrip()[3:]
            while '"""' not in body:
                if i >= len(lines):
                    raise ModelfileError(f"modelfile: unterminated \"\"\" after {cmd}")
                body += "\n" + lines[i]
                i += 1
            arg = body[: body.index('"""')]
        out.append((cmd, arg.strip() if cmd in ("FROM", "PARAMETER", "ADAPTER") else arg))
    return out


def parse_modelfile(text: str) -> dict[str, Any]:
    """Modelfile -> ``from``, ``parameters``, ``template``, ``system``, ``license``, ``adapters``."""
    body: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for cmd, arg in _statements(text):
        if cmd == "FROM":
            body["from"] = arg
        elif cmd == "PARAMETER":
            key, _, raw = arg.partition(" ")
            if not raw.strip():
                raise ModelfileError(f"modelfile: PARAMETER {key} needs a value")
            value = _value(raw)
            if key == "stop":
                params.setdefault("stop", []).append(str(value))
            else:
                params[key] = value
        elif cmd == "ADAPTER":
            body.setdefault("adapters", {})[arg] = ""
        elif cmd == "MESSAGE":
            role, _, content = arg.partition(" ")
            body.setdefault("messages", []).append({"role": role, "content": content.strip()})
        else:
            body[cmd.lower()] = arg.strip("\n")
    if "from" not in body:
        raise ModelfileError("modelfile: no FROM line")
    if params:
        body["parameters"] = params
    return body
