"""Property-based fuzzing of every route (hypothesis), shared by tests/test_fuzz.py and scripts/fuzz.py.

Each case is one HTTP request to a running daemon: wrong types, missing fields, huge and
negative numbers, invalid UTF-8, bodies over the size limit, deeply nested JSON. A client
mistake must never get a 5xx, and no request may hang (each has a time limit).
"""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

GET_ROUTES = ("/", "/api/version", "/api/tags", "/api/ps")
POST_ROUTES = ("/api/generate", "/api/chat")
MAX_BODY = 64 * 1024  # the daemon under fuzz runs with OLLAMAD_MAX_BODY=64KiB
CASE_TIMEOUT = 30.0

ints = st.one_of(st.integers(-10, 10), st.integers(), st.sampled_from([-(1 << 63), (1 << 64), 1 << 24, 1 << 31]))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=20))
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                    max_leaves=8)
model = st.one_of(st.sampled_from(["tiny", "tiny:latest", "small", "nope", "../tiny", "tiny/../../etc/passwd",
                                   "", "a" * 300, "TINY", "library/tiny", "tiny:", ":latest"]), junk)
numbers = st.one_of(ints, st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6), st.none())
options = st.one_of(junk, st.fixed_dictionaries({}, optional={
    k: numbers for k in ("num_ctx", "num_predict", "temperature", "seed", "top_k", "top_p", "num_batch",
                         "num_gpu", "num_thread", "repeat_last_n", "num_keep", "mirostat")
} | {"stop": junk}))
keep_alive = st.one_of(ints, st.floats(), st.sampled_from(["5m", "-1", "0", "1h", "abc", "-5m", "9999999h",
                                                           "1e400s", ""]), junk)
message = st.one_of(junk, st.fixed_dictionaries({"role": st.one_of(st.sampled_from(
    ["user", "system", "assistant", "tool", "x"]), junk)}, optional={
    "content": st.one_of(st.text(max_size=40), junk), "images": junk, "tool_calls": junk}))
common: dict[str, Any] = {"stream": st.one_of(st.booleans(), junk), "keep_alive": keep_alive, "options": options,
                          "format": junk, "think": junk}
generate_body = st.fixed_dictionaries({"model": model}, optional={
    "prompt": st.one_of(st.text(max_size=40), junk), "system": junk, "raw": junk, "images": junk,
    "suffix": junk, "template": junk, "context": junk, **common})
tool = st.fixed_dictionaries({}, optional={"type": st.one_of(st.just("function"), junk), "function": st.one_of(
    junk, st.fixed_dictionaries({}, optional={"name": st.one_of(st.text(max_size=8), junk), "parameters": junk}))})
chat_body = st.fixed_dictionaries({"model": model}, optional={
    "messages": st.one_of(st.lists(message, max_size=3), junk), "tools": st.one_of(junk, st.lists(tool, max_size=2)),
    **common})


def _nested(depth: int) -> bytes:
    return b'{"model": "tiny", "options": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


raw_bodies = st.one_of(
    st.binary(max_size=200),  # mostly invalid UTF-8 / not JSON
    st.builds(lambda b: b'{"model": "tiny", "prompt": "' + b + b'"}', st.binary(max_size=50)),
    st.builds(_nested, st.sampled_from([50, 1000, 100_000])),
    st.builds(lambda cp: b'{"model": "tiny", "prompt": "\\u%04x"}' % cp, st.integers(0xD800, 0xDFFF)),  # lone
    st.builds(lambda n: b"[" * n + b"]" * n, st.sampled_from([10, 5000, 200_000])),
    st.builds(lambda n: b'{"model": "tiny", "prompt": "' + b"x" * n + b'"}',
              st.sampled_from([MAX_BODY - 100, MAX_BODY + 1, 4 * MAX_BODY])),
    st.just(b""), st.just(b"null"), st.just(b'"tiny"'), st.just(b"1e999999"),
)


@dataclass
class Figures:
    cases: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    slowest: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"cases": self.cases, "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                "status_5xx": sum(v for k, v in self.by_status.items() if k >= 500),
                "hangs": len(self.hangs), "slowest_case_s": round(self.slowest, 3),
                "examples_5xx": self.server_errors[:10], "examples_hang": self.hangs[:10]}


def send(port: int, method: str, path: str, body: bytes | None, figures: Figures) -> None:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CASE_TIMEOUT)
    what = f"{method} {path} {body[:200]!r}" if body is not None else f"{method} {path}"
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        text = resp.read()
        status = resp.status
        lines = text.strip().splitlines()
        if status == 200 and lines and lines[-1].startswith(b'{"error"'):
            status = 599  # a stream that began well but ended in an error line
    except TimeoutError:
        figures.hangs.append(what)
        return
    except (ConnectionError, http.client.HTTPException) as e:
        if body is not None and len(body) > MAX_BODY:
            status, text = 413, b"connection closed on an oversize body"  # allowed: refused early
        else:
            status, text = 598, f"connection failed: {e!r}".encode()
    finally:
        conn.close()
        figures.slowest = max(figures.slowest, time.monotonic() - t0)
    figures.cases += 1
    figures.by_status[status] += 1
    if status >= 500:
        figures.server_errors.append(f"{what} -> {status} {text[:200]!r}")


def run_all(port: int, examples: int, figures: Figures) -> None:
    """Fuzz every route with about ``examples`` cases each; results go into ``figures``."""
    opts = settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck))

    @opts
    @given(st.sampled_from(GET_ROUTES), st.one_of(st.none(), st.binary(max_size=50)),
           st.sampled_from(["GET", "HEAD", "POST", "DELETE", "OPTIONS"]))
    def simple(path: str, body: bytes | None, method: str) -> None:
        send(port, method, path, body if method != "GET" else None, figures)

    @opts
    @given(generate_body)
    def generate(body: dict[str, Any]) -> None:
        send(port, "POST", "/api/generate", json.dumps(body, allow_nan=True).encode(), figures)

    @opts
    @given(chat_body)
    def chat(body: dict[str, Any]) -> None:
        send(port, "POST", "/api/chat", json.dumps(body, allow_nan=True).encode(), figures)

    @opts
    @given(st.sampled_from(POST_ROUTES), raw_bodies)
    def raw(path: str, body: bytes) -> None:
        send(port, "POST", path, body, figures)

    @opts
    @given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="?#"), max_size=30))
    def unknown(path: str) -> None:
        send(port, "GET", "/api/" + path, None, figures)

    for case in (simple, generate, chat, raw, unknown):
        case()
