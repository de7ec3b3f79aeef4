"""A fake llama-server: same flags and endpoints, with knobs for speed and fault injection.

Knobs (environment): FAKE_START_DELAY (s before /health is 200; only for models whose
path contains FAKE_START_DELAY_FOR, when set), FAKE_TOKEN_DELAY (s per
token), FAKE_TOKENS (n_predict when none is given, or the daemon's "no limit" of 10 x ctx),
FAKE_CRASH_AFTER_TOKENS (exit mid-stream),
FAKE_EXIT_AT_START (exit code at start-up), FAKE_HANG_AFTER_TOKENS (stop answering),
FAKE_FINAL_PAD (a "prompt" of that many bytes in the final /completion event),
FAKE_TOKEN_BYTES (each token that many bytes long),
FAKE_DROP_REUSED (close a kept-alive connection, unread, when a second completion comes on
it: what llama-server's unannounced closes look like to a client; counted as "dropped"),
FAKE_SCHEMA_DELAY (s before answering a request with a JSON schema: grammar compilation),
FAKE_SLOTS_DELAY (s before /slots answers, with the slots' state at that moment: llama-server
answers it from its own loop, late on a loaded machine).
Like llama-server it runs at most --parallel completions at once and queues the rest in arrival
order; a stream's headers go out once it has a slot. It counts completions sent (running or
queued) and running; GET /fake/stats reports both peaks ("peak_sent", "peak"), so tests can check
how many the supervisor sends at once, and the prompts (in the order they got a slot) and payloads.
/tokenize makes one token per character (its code point); a prompt of as many characters as a
slot's context is refused as llama-server refuses it (400, "exceeds the available context size").
"""

from __future__ import annotations

import sys

if "--version" in sys.argv[1:]:  # before the imports: ollamad runs this at start-up
    print("version: 0 (fake)\nbuilt with python for testing", file=sys.stderr)
    sys.exit(0)

import argparse
import asyncio
import json
import os
import signal
import time
import weakref
from typing import Any

from aiohttp import web

state: dict[str, Any] = {"ready": False, "in_flight": 0, "peak": 0, "sent": 0, "peak_sent": 0, "total": 0,
                         "hang": False, "prompts": [],
                         "dropped": 0, "streamed": [], "payloads": [], "abandoned": 0}
# connections (their transports) that carried a completion; weak, so that a closed one goes:
# a set of ids would take a new connection at a freed one's address for a reused one
served_on: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", "-m")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--parallel", "-np", type=int, default=1)
    p.add_argument("--ctx-size", "-c", type=int, default=4096)
    p.add_argument("--api-key")
    p.add_argument("--api-key-file")
    p.add_argument("--embeddings", action="store_true")
    # llama-server takes the word after a flag as its value even when it starts with "-"
    # (a random API key can); argparse would not, so glue values on with "=".
    argv, rest = [], sys.argv[1:]
    while rest:
        word = rest.pop(0)
        if word in ("--api-key", "--model") and rest:
            word = f"{word}={rest.pop(0)}"
        argv.append(word)
    args, _ = p.parse_known_args(argv)
    if args.api_key_file:  # one key per line, as llama-server reads it
        with open(args.api_key_file) as f:
            args.api_key = next(ln.strip() for ln in f if ln.strip() and not ln.startswith("#"))
    return args


ARGS = parse()
SLOTS = asyncio.Semaphore(ARGS.parallel)  # fair: waiters get a slot in arrival order


def check_key(request: web.Request) -> None:
    if ARGS.api_key and request.headers.get("Authorization") != f"Bearer {ARGS.api_key}":
        raise web.HTTPUnauthorized(text=json.dumps({"error": {"code": 401, "message": "Invalid API Key"}}),
                                   content_type="application/json")


async def health(request: web.Request) -> web.Response:
    if state["hang"]:
        await asyncio.sleep(3600)
    if not state["ready"]:
        return web.json_response({"error": {"code": 503, "message": "Loading model"}}, status=503)
    return web.json_response({"status": "ok"})


async def stats(request: web.Request) -> web.Response:
    return web.json_response(state)


async def props(request: web.Request) -> web.Response:
    check_key(request)
    return web.json_response({"total_slots": ARGS.parallel,
                              "default_generation_settings": {"n_ctx": ARGS.ctx_size // ARGS.parallel}})


async def slots(request: web.Request) -> web.Response:
    check_key(request)
    await asyncio.sleep(env_float("FAKE_SLOTS_DELAY", 0.0))
    per = ARGS.ctx_size // ARGS.parallel
    busy = state["in_flight"]
    return web.json_response([{"id": i, "n_ctx": per, "is_processing": i < busy} for i in range(ARGS.parallel)])


async def apply_template(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response({"prompt": "".join(m.get("content", "") for m in body["messages"])})


async def tokenize(request: web.Request) -> web.Response:
    """One token per character (its code point): reversible, so a token prompt reads back as text."""
    check_key(request)
    body = await request.json()
    return web.json_response({"tokens": [ord(c) for c in body.get("content", "")]})


def prompt_text(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return "".join(chr(t) for t in prompt)
    if isinstance(prompt, str):
        return prompt
    return "".join(str(m.get("content") or "") for m in body.get("messages") or [])


def too_long(n: int) -> web.Response:
    """llama-server's answer to a prompt of n tokens (characters here) that does not fit a slot."""
    per = ARGS.ctx_size // ARGS.parallel
    msg = f"request ({n} tokens) exceeds the available context size ({per} tokens), try increasing it"
    return web.json_response({"error": {"code": 400, "message": msg, "type": "exceed_context_size_error",
                                        "n_prompt_tokens": n, "n_ctx": per}}, status=400)


async def stream_tokens(request: web.Request, chat: bool) -> web.StreamResponse:
    conn = request.transport
    if os.environ.get("FAKE_DROP_REUSED") and conn is not None and conn in served_on:
        served_on.discard(conn)
        state["dropped"] += 1
        conn.abort()
        return web.Response()
    if conn is not None:
        served_on.add(conn)
    check_key(request)
    body = await request.json()
    if body.get("json_schema") is not None or body.get("response_format"):
        await asyncio.sleep(env_float("FAKE_SCHEMA_DELAY", 0.0))  # llama-server: before the task is queued
    state["sent"] += 1
    state["peak_sent"] = max(state["peak_sent"], state["sent"])
    try:
        async with SLOTS:  # llama-server queues what its slots cannot take yet, first come first served
            return await run_slot(request, body, chat)
    finally:
        state["sent"] -= 1


async def run_slot(request: web.Request, body: dict[str, Any], chat: bool) -> web.StreamResponse:

    n = int(body.get("n_predict", body.get("max_tokens", os.environ.get("FAKE_TOKENS", 8))))
    if n < 0 or n >= 10 * (ARGS.ctx_size // ARGS.parallel):  # no limit (the daemon sends 10 x ctx)
        n = int(os.environ.get("FAKE_TOKENS", 8))
    n = min(n, ARGS.ctx_size // ARGS.parallel)  # as llama-server: a slot stops when its context is full
    if len(prompt_text(body)) >= ARGS.ctx_size // ARGS.parallel:
        return too_long(len(prompt_text(body)))
    delay = env_float("FAKE_TOKEN_DELAY", 0.0)
    crash_after = int(os.environ.get("FAKE_CRASH_AFTER_TOKENS", -1))
    hang_after = int(os.environ.get("FAKE_HANG_AFTER_TOKENS", -1))
    state["in_flight"] += 1
    state["total"] += 1
    state["peak"] = max(state["peak"], state["in_flight"])
    msgs = body.get("messages") or [{}]
    prompt = body.get("prompt", msgs[-1].get("content"))
    state["prompts"].append(prompt_text({"prompt": prompt}) if isinstance(prompt, list) else prompt)
    state["payloads"].append({k: v for k, v in body.items() if k not in ("prompt", "messages")})
    state["streamed"].append(bool(body.get("stream", False)))
    t0 = time.monotonic()
    # the fields llama-server puts in every chat chunk, in its order
    head = {"created": int(time.time()), "id": f"chatcmpl-{state['total']}", "model": ARGS.model,
            "system_fingerprint": "b1-fake", "object": "chat.completion.chunk"}
    try:
        stream = body.get("stream", False)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if stream:
            await resp.prepare(request)
        text = []
        for i in range(n):
            if i == crash_after:
                os._exit(137)
            if i == hang_after:
                state["hang"] = True
                await asyncio.sleep(3600)
            if delay:
                await asyncio.sleep(delay)
            tok = f"t{i} ".ljust(int(os.environ.get("FAKE_TOKEN_BYTES", 0)), "x")
            text.append(tok)
            if stream:
                ev = ({"choices": [{"finish_reason": None, "index": 0, "delta": {"content": tok}}], **head}
                      if chat else {"index": 0, "content": tok, "tokens": [ord(c) for c in tok], "stop": False,
                                    "id_slot": -1, "tokens_predicted": i + 1, "tokens_evaluated": 3})
                await resp.write(b"data: " + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n")
        ms = (time.monotonic() - t0) * 1000
        timings = {"prompt_n": 3, "prompt_ms": 1.0, "predicted_n": n, "predicted_ms": ms}
        usage = {"completion_tokens": n, "prompt_tokens": 3, "total_tokens": n + 3}
        if chat and not stream:  # one chat.completion object, as llama-server answers
            return web.json_response({
                "choices": [{"finish_reason": "length", "index": 0,
                             "message": {"role": "assistant", "content": "".join(text)}}],
                **{**head, "object": "chat.completion"}, "usage": usage, "timings": timings})
        if chat:
            final = {"choices": [{"finish_reason": "length", "index": 0, "delta": {}}], **head}
            events = [final, {"choices": [], **head, "usage": usage, "timings": timings}]
        else:
            events = [{"content": "" if stream else "".join(text), "stop": True, "stop_type": "limit",
                       "model": ARGS.model, "timings": timings, "tokens_evaluated": 3, "tokens_predicted": n}]
            if not stream and body.get("return_tokens"):  # the one answer carries every token
                events[0]["tokens"] = [ord(c) for c in "".join(text)]
            if os.environ.get("FAKE_FINAL_PAD"):  # llama-server's final event echoes the prompt
                events[0]["prompt"] = "p" * int(os.environ["FAKE_FINAL_PAD"])
        if not stream:
            return web.json_response(events[0])
        for ev in events:
            await resp.write(b"data: " + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n")
        if chat:
            await resp.write(b"data: [DONE]\n\n")
        return resp
    except asyncio.CancelledError:  # the connection closed (aiohttp cancels the handler)
        if not body.get("stream", False):
            state["abandoned"] += 1
        raise
    finally:
        state["in_flight"] -= 1


async def completion(request: web.Request) -> web.StreamResponse:
    return await stream_tokens(request, chat=False)


async def chat(request: web.Request) -> web.StreamResponse:
    return await stream_tokens(request, chat=True)


async def main() -> None:
    code = os.environ.get("FAKE_EXIT_AT_START")
    print(f"fake llama-server: model {ARGS.model} n_slots = {ARGS.parallel}, n_ctx = {ARGS.ctx_size}", flush=True)
    if code is not None:
        print("error: failed to load model (FAKE_EXIT_AT_START)", flush=True)
        sys.exit(int(code))
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/fake/stats", stats)
    app.router.add_get("/props", props)
    app.router.add_get("/slots", slots)
    app.router.add_post("/apply-template", apply_template)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/completion", completion)
    app.router.add_post("/v1/chat/completions", chat)
    # as llama-server, a request whose client goes away is stopped, streamed or not
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, ARGS.host, ARGS.port).start()
    only = os.environ.get("FAKE_START_DELAY_FOR")
    if not only or (ARGS.model and only in ARGS.model):
        await asyncio.sleep(env_float("FAKE_START_DELAY", 0.0))
    state["ready"] = True
    if os.environ.get("FAKE_STUCK_ON_TERM"):  # as llama-server when its shutdown hangs: the first
        terms: list[int] = []  # SIGTERM does nothing, a second ends it at once (exit code 1)

        def on_term() -> None:
            terms.append(1)
            if len(terms) > 1:
                print("Received second interrupt, terminating immediately.", flush=True)
                os._exit(1)

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_term)
    print(f"srv  llama_server: listening on http://{ARGS.host}:{ARGS.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
