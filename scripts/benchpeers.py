"""The peer comparison: the same workload sent straight to llama-server, through ollamad, and
through llama.cpp's own multi-model proxy (router mode, ``--models-dir``, same binary)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from benchlib import Proc, Run, ask, bare_server, ollamad, pct, router, run_clients

REAL = Path(os.environ.get("OLLAMAD_MODELS_CACHE", Path.home() / ".cache" / "ollamad" / "models")) \
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
STORY = "Write a long story about a dragon who learns to bake bread."
# (route through ollamad, stream); straight to llama-server and the router the OpenAI routes go as
# they are, /api/chat as the /v1/chat/completions it becomes, /api/generate (raw) as /completion
ROWS = (("v1chat", True), ("v1chat", False), ("chat", True), ("chat", False), ("generate", True),
        ("generate", False))
UPSTREAM = {"v1chat": "v1chat", "chat": "v1chat", "generate": "completion"}
PATHS = ("direct", "ollamad", "router")


def folder(**models: Path) -> Path:
    d = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    for name, path in models.items():
        (d / f"{name}.gguf").symlink_to(path)
    return d


async def peers(binary: Path, mdir: Path, tmp: Path, quick: bool) -> dict[str, Any]:
    """Aggregate tokens/s per route family, streaming and not: 4 slots, 2048 context per slot,
    4 clients, 96 tokens; rounds interleave the three paths (rotating which goes first)."""
    out: dict[str, Any] = {}
    models = {"fast": mdir / "a.gguf"}
    if REAL.exists():
        models["smollm2"] = REAL
    else:
        print(f"[bench] peers: {REAL} missing (scripts/real_models.py fetches it); real-model rows skipped",
              flush=True)
    for label, path in models.items():
        out[label] = await _peers(binary, path, tmp, 1 if quick else 2)
        out[label]["model"] = path.name
    return out


THREADS = 1  # the same for all three: with 2 cores shared, llama-server's threads stall on each other


async def _peers(binary: Path, model: Path, tmp: Path, rounds: int) -> dict[str, Any]:
    np_, ctx, clients, per_client, n = 4, 2048, 4, 1, 96
    mfolder = folder(m=model)
    runs: dict[tuple[str, bool, str], Run] = {}
    async with (bare_server(binary, model, tmp, np_, ctx, THREADS) as srv,
                ollamad(binary, mfolder, tmp, OLLAMA_NUM_PARALLEL=str(np_), OLLAMA_CONTEXT_LENGTH=str(ctx),
                        OLLAMA_KEEP_ALIVE="1h", OLLAMAD_THREADS=str(THREADS)) as d,
                router(binary, mfolder, tmp, np_, ctx, threads=THREADS) as rt):
        urls = {"direct": srv.url, "ollamad": d.url, "router": rt.url}

        def call(path: str, route: str, stream: bool, rnd: int) -> Any:
            async def one(s: aiohttp.ClientSession, c: int, i: int) -> Any:
                r = route if path == "ollamad" else UPSTREAM[route]
                return await ask(s, urls[path], r, "m", STORY, n, 1000 * rnd + 10 * c + i, stream)
            return one

        for path in PATHS:  # warm-up: loads ollamad's runner and the router's child
            for route, stream in ROWS:
                await run_clients(1, 1, call(path, route, stream, 99))
        for rnd in range(rounds):
            for k, (route, stream) in enumerate(ROWS):
                shift = (rnd + k) % 3
                for path in PATHS[shift:] + PATHS[:shift]:
                    run = await run_clients(clients, per_client, call(path, route, stream, rnd))
                    runs.setdefault((route, stream, path), Run()).add(run)
    rows: dict[str, Any] = {}
    for route, stream in ROWS:
        row: dict[str, Any] = {"route": route, "stream": stream}
        for path in PATHS:
            run = runs[(route, stream, path)]
            row[path] = {"tokens_per_s": run.tokens_per_s(), "tokens": sum(r.tokens for r in run.ok),
                         "requests": len(run.results), "errors": run.errors()[:3]}
        row["ollamad_ratio"] = row["ollamad"]["tokens_per_s"] / row["direct"]["tokens_per_s"]
        row["router_ratio"] = row["router"]["tokens_per_s"] / row["direct"]["tokens_per_s"]
        rows[f"{route}_{'stream' if stream else 'whole'}"] = row
    return {"rows": rows, "rounds": rounds, "clients": clients, "slots": np_, "ctx_per_slot": ctx,
            "tokens_per_request": n, "threads": THREADS}


async def swap_router(binary: Path, mdir: Path, tmp: Path, quick: bool) -> dict[str, Any]:
    """Two small models, room for one, 8 closed-loop clients alternating between them, against
    the router (--models-max 1): same requests (/v1/chat/completions, streamed, 16 tokens)."""
    clients, per_client = 8, (3 if quick else 6)
    mfolder = folder(a=mdir / "a.gguf", b=mdir / "b.gguf")
    out: dict[str, Any] = {"clients": clients, "requests": clients * per_client}
    for path in ("ollamad", "router"):
        server: Any = (ollamad(binary, mfolder, tmp, OLLAMA_MAX_LOADED_MODELS="1", OLLAMA_NUM_PARALLEL="2",
                               OLLAMA_CONTEXT_LENGTH="1024") if path == "ollamad" else
                       router(binary, mfolder, tmp, 2, 1024))
        async with server as p:
            url = p.url

            async def one(s: aiohttp.ClientSession, c: int, i: int, url: str = url) -> Any:
                return await ask(s, url, "v1chat", "ab"[(c + i) % 2], STORY, 16, 10 * c + i, True)

            run = await run_clients(clients, per_client, one)
            out[path] = {"ok": len(run.ok), "errors": len(run.results) - len(run.ok), "error_samples": run.errors()[:3],
                         "loads": _loads(p, path), "total_s": run.wall,
                         "wait_p50_s": pct([r.ttft for r in run.ok], 50),
                         "wait_p99_s": pct([r.ttft for r in run.ok], 99)}
    return out


def _loads(p: Proc, path: str) -> int:
    text = p.log.read_text(errors="replace")
    return text.count('"loading model"') if path == "ollamad" else text.count("spawning server instance with name")


def render_peers(res: dict[str, Any]) -> list[str]:
    def f(x: float, d: int = 1) -> str:
        return f"{x:.{d}f}"

    lines: list[str] = []
    if "peers" in res:
        lines += ["## 7. Peers: llama-server alone, ollamad, llama.cpp's router mode", "",
                  "The same requests (same prompt, seeds and 96-token limit; 4 slots of 2048 context, 4 clients) "
                  "straight to llama-server, through ollamad and through llama-server's own multi-model proxy "
                  "(`--models-dir DIR --models-max 1`, same binary), each llama-server on one thread (on 2 "
                  "shared cores, llama-server's threads stall on each other when others run). Rounds interleave "
                  "the three paths. Straight and through the router, /api/chat goes as the "
                  "/v1/chat/completions request it becomes and /api/generate (raw) as /completion. "
                  "Targets: ollamad >= 0.98 x direct and >= the router's ratio.",
                  ""]
        for label, v in res["peers"].items():
            lines += [f"**{label}** (`{v['model']}`, {v['rounds']} rounds)", "",
                      "| route | stream | direct tok/s | ollamad tok/s | router tok/s | ollamad / direct | "
                      "router / direct | tokens d / o / r |", "|---|---|---|---|---|---|---|---|"]
            for row in v["rows"].values():
                errs = sum(len(row[p]["errors"]) for p in PATHS)
                lines.append(f"| {row['route']} | {row['stream']} | {f(row['direct']['tokens_per_s'])} | "
                             f"{f(row['ollamad']['tokens_per_s'])} | {f(row['router']['tokens_per_s'])} | "
                             f"**{f(row['ollamad_ratio'], 3)}** | {f(row['router_ratio'], 3)} | "
                             f"{row['direct']['tokens']} / {row['ollamad']['tokens']} / {row['router']['tokens']}"
                             + (f" ({errs} errors)" if errs else "") + " |")
            spread = [row["router_ratio"] for row in v["rows"].values()]
            lines += ["", f"The router's ratio ranges {f(min(spread), 2)} to {f(max(spread), 2)} over these rows, "
                      "though it adds the same small proxy cost to each: differences between paths smaller than "
                      "that spread are the machine's noise, not the path's cost.", ""]
    if "swap_router" in res:
        s = res["swap_router"]
        lines += ["## 8. Model swapping against the router (two 10 MB models, room for one, 8 closed-loop clients "
                  "alternating)", "",
                  f"{s['requests']} streamed /v1/chat/completions requests of 16 tokens; wait is the time to the "
                  "first token.", "",
                  "| path | ok | errors | loads | total s | wait p50 s | wait p99 s |", "|---|---|---|---|---|---|---|"]
        for p in ("ollamad", "router"):
            v = s[p]
            lines.append(f"| {p} | {v['ok']} | {v['errors']} | {v['loads']} | {f(v['total_s'], 2)} | "
                         f"{f(v['wait_p50_s'], 2)} | {f(v['wait_p99_s'], 2)} |")
        lines += ["", "Target: fewer loads than the router and total time no worse.", ""]
    return lines
