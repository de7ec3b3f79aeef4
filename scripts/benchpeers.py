"""The peer comparison: the same workload sent straight to llama-server, through ollamad, and
through llama.cpp's own multi-model proxy (router mode, ``--models-dir``, same binary)."""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from benchlib import (
    OLLAMA_SAMPLING,
    Proc,
    Run,
    ask,
    bare_server,
    cpu_seconds,
    ollamad,
    pct,
    router,
    run_clients,
    runner_http_threads,
)

from ollamad.models.facts import facts_from_gguf
from ollamad.models.ggufmeta import read_gguf
from ollamad.models.plan import PROMPT_ONLY_TEMPLATE

REAL = Path(os.environ.get("OLLAMAD_MODELS_CACHE", Path.home() / ".cache" / "ollamad" / "models")) \
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
STORY = "Write a long story about a dragon who learns to bake bread."
# (route through ollamad, stream, seeded); straight to llama-server and the router the OpenAI routes
# go as they are, /api/chat as the /v1/chat/completions it becomes, /api/generate (raw) as /completion.
# Every request names the same sampling settings (Ollama's defaults), so all three paths sample alike.
# Seeded rows: every path generates the same tokens. ollamad evaluates a seeded request's prompt anew
# (same seed, same answer: llama-server's prompt cache changes the numerics), so there the direct and
# router requests ask for that too (cache_prompt false): the same work upstream on every path; the
# seeded chat row also measures llama-server with its cache ("direct_cached"): what the guarantee costs.
# The unseeded row is what chat apps send: every path keeps its prompt cache; token counts differ.
ROWS = (("v1chat", True, True), ("v1chat", False, True), ("chat", True, True), ("chat", False, True),
        ("generate", True, True), ("generate", False, True), ("chat", True, False))
UPSTREAM = {"v1chat": "v1chat", "chat": "v1chat", "generate": "completion"}
PATHS = ("direct", "ollamad", "router")


# Student's t at 97.5% by degrees of freedom (a 95% two-sided interval); 1.96 beyond the table
_T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 15: 2.13,
         20: 2.09, 30: 2.04, 40: 2.02, 60: 2.00}


def geomean_ci(ratios: list[float], blocks: int = 0) -> tuple[float, list[float]]:
    """The geometric mean of paired ratios and its 95% confidence interval (t over the logs).
    ``blocks``: the ratios come in that many equal blocks, each from its own processes; the
    interval is then over the blocks' means (what differs from one set of processes to the
    next is in it; the rounds within a block share it)."""
    logs = [math.log(r) for r in ratios]
    if blocks > 1:
        size = len(logs) // blocks
        logs = [statistics.fmean(logs[b * size:(b + 1) * size]) for b in range(blocks)]
    m = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(m), [math.nan, math.nan]
    df = len(logs) - 1
    t = _T975[max(k for k in _T975 if k <= df)] if df <= 60 else 1.96
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(m), [math.exp(m - half), math.exp(m + half)]


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
    # BENCH_PEERS_SCALE: more requests per client and run (a fast GPU makes each run short);
    # BENCH_PEERS_MODELS: a comma-separated subset of the labels (fast, smollm2)
    scale = int(os.environ.get("BENCH_PEERS_SCALE", "1"))
    pick = os.environ.get("BENCH_PEERS_MODELS")
    for label, path in models.items():
        if pick and label not in pick.split(","):
            continue
        # short runs, many rounds: this host's speed drifts by 5-10% over seconds (a pure CPU loop
        # too), so the paths are paired within a round of one request per client (about 0.2 s per
        # path on the fast model); an A/A test of two identical llama-servers gave a standard
        # deviation of 0.10 in the log of a round's ratio with 1 request per client, and 0.11 with 4
        blocks, rounds = (2, 1) if quick else BLOCKS[label]
        out[label] = await _peers(binary, path, tmp, blocks, rounds, scale)
        out[label]["model"] = path.name
    return out


# (blocks, rounds per block). Each block starts the three paths afresh: two identical llama-servers,
# paired over 48 rounds, differed by 4.6% (1.9 to 7.4%) in one of four runs (/work/exp/aa3.py), a
# difference that lasts a process's life; a run of one set of processes carries it into every round.
# The fast model's rounds are short (about 0.7 s for a row's paths): 12 blocks, as on 2026-11-25 the
# rounds' sd(log) was 0.13 to 0.19 (0.09 to 0.12 the day before) and 6 blocks gave intervals of +-7%.
# SmolLM2's rounds take about 5 s a path: with 4 blocks its intervals were +-4% (all six rows read
# together, +-4.5%); 8 blocks gave +-1.6% together on 2026-11-25 (12 minutes)
BLOCKS = {"fast": (12, 6), "smollm2": (8, 1)}


THREADS = 1  # the same for all three: with 2 cores shared, llama-server's threads stall on each other
SLOTS, CTX, CLIENTS, TOKENS = 4, 2048, 4, 96  # per path: slots, context per slot; clients; tokens per request


async def _peers(binary: Path, model: Path, tmp: Path, blocks: int, rounds: int, per_client: int) -> dict[str, Any]:
    mfolder = folder(m=model)
    runs: dict[tuple[str, bool, bool, str], Run] = {}
    per_round: dict[tuple[str, bool, bool, str], list[float]] = {}  # tokens/s of each round
    firsts: dict[int, Counter[str]] = {}  # per row: how often each path went first
    # a model without a chat template: ollamad renders chats as Ollama does ({{ .Prompt }}), llama-server
    # by itself with chatml; the same template on all three paths keeps the prompts alike
    extra = () if facts_from_gguf(read_gguf(model)).chat_template else ("--chat-template", PROMPT_ONLY_TEMPLATE)
    for block in range(blocks):
        await _peers_block(binary, model, mfolder, tmp, block, rounds, per_client, extra, runs, per_round, firsts)
    rows: dict[str, Any] = {}
    for route, stream, seeded in ROWS:
        row: dict[str, Any] = {"route": route, "stream": stream, "seeded": seeded}
        for path in _paths(route, stream, seeded):
            run = runs[(route, stream, seeded, path)]
            row[path] = {"tokens_per_s": run.tokens_per_s(), "tokens": sum(r.tokens for r in run.ok),
                         "requests": len(run.results), "errors": run.errors()[:3]}
        row["ollamad_ratio"] = row["ollamad"]["tokens_per_s"] / row["direct"]["tokens_per_s"]
        row["router_ratio"] = row["router"]["tokens_per_s"] / row["direct"]["tokens_per_s"]
        # each round runs the paths back to back: its ratio is paired, and the median of the rounds'
        # ratios is not moved by one round that other work on the machine slowed
        d = per_round[(route, stream, seeded, "direct")]
        for p in ("ollamad", "router"):
            row[f"{p}_ratio_rounds"] = [x / y for x, y in zip(per_round[(route, stream, seeded, p)], d, strict=True)]
            row[f"{p}_ratio_paired"] = statistics.median(row[f"{p}_ratio_rounds"])
            row[f"{p}_ratio_mean"], row[f"{p}_ratio_ci"] = geomean_ci(row[f"{p}_ratio_rounds"], blocks)
        # ollamad against the router, paired within each round: above 1, ollamad was the faster
        row["ollamad_vs_router"], row["ollamad_vs_router_ci"] = geomean_ci(
            [x / y for x, y in zip(per_round[(route, stream, seeded, "ollamad")],
                                   per_round[(route, stream, seeded, "router")], strict=True)], blocks)
        rows[f"{route}_{'stream' if stream else 'whole'}{'_seeded' if seeded else ''}"] = row
    return {"rows": rows, "rounds": blocks * rounds, "blocks": blocks, "clients": CLIENTS, "per_client": per_client,
            "slots": SLOTS, "ctx_per_slot": CTX, "tokens_per_request": TOKENS, "threads": THREADS}


async def _peers_block(binary: Path, model: Path, mfolder: Path, tmp: Path, block: int, rounds: int, per_client: int,
                       extra: tuple[str, ...], runs: dict[tuple[str, bool, bool, str], Run],
                       per_round: dict[tuple[str, bool, bool, str], list[float]],
                       firsts: dict[int, Counter[str]]) -> None:
    """``rounds`` rounds on three paths started afresh (round numbers, so seeds, go on from the last block's)."""
    async with (bare_server(binary, model, tmp, SLOTS, CTX, THREADS, extra) as srv,
                ollamad(binary, mfolder, tmp, OLLAMA_NUM_PARALLEL=str(SLOTS), OLLAMA_CONTEXT_LENGTH=str(CTX),
                        OLLAMA_KEEP_ALIVE="1h", OLLAMAD_THREADS=str(THREADS)) as d,
                router(binary, mfolder, tmp, SLOTS, CTX, threads=THREADS, extra=extra) as rt):
        urls = {"direct": srv.url, "ollamad": d.url, "router": rt.url}

        def call(path: str, route: str, stream: bool, seeded: bool, rnd: int, tokens: int = TOKENS) -> Any:
            async def one(s: aiohttp.ClientSession, c: int, i: int) -> Any:
                r = route if path == "ollamad" else UPSTREAM[route]
                sampling = dict(OLLAMA_SAMPLING)
                if seeded and path in ("direct", "router"):  # not direct_cached
                    sampling["cache_prompt"] = False
                seed = 1000 * rnd + 10 * c + i if seeded else None
                return await ask(s, urls[_server(path)], r, "m", STORY, tokens, seed, stream, sampling)
            return one

        for path in PATHS:  # warm-up: loads ollamad's runner and the router's child, one token per row
            for route, stream, seeded in ROWS:
                await run_clients(1, 1, call(path, route, stream, seeded, 99_999, 1))
        for rnd, (route, stream, seeded), order in block_schedule(block, rounds, firsts):
            for path in order:
                run = await run_clients(CLIENTS, per_client, call(path, route, stream, seeded, rnd))
                runs.setdefault((route, stream, seeded, path), Run()).add(run)
                per_round.setdefault((route, stream, seeded, path), []).append(run.tokens_per_s())


def block_schedule(block: int, rounds: int, firsts: dict[int, Counter[str]],
                   ) -> Iterator[tuple[int, tuple[str, bool, bool], tuple[str, ...]]]:
    """A block's rounds: (round, row, the row's paths in order), after the warm-up, which ends on
    the router. ``firsts``: per row, how often each path went first (kept across blocks)."""
    last = PATHS[-1]
    for rnd in range(block * rounds, (block + 1) * rounds):
        for k, row in enumerate(ROWS):
            order = round_order(_paths(*row), rnd + k, last, firsts.setdefault(k, Counter()))
            last = order[-1]
            yield rnd, row, order


def _paths(route: str, stream: bool, seeded: bool) -> tuple[str, ...]:
    # direct_cached is direct's server: never beside it in any rotation
    return ("direct", "ollamad", "direct_cached", "router") if (route, stream, seeded) == ("chat", True, True) \
        else PATHS


def round_order(paths: tuple[str, ...], nominal: int, last: str, firsts: Counter[str]) -> tuple[str, ...]:
    """A row's paths in this round's order: a rotation of ``paths`` that does not start on the
    llama-server that ran last (``direct_cached`` is direct's), its caches still warm; of those, the
    one whose first path has gone first least often in this row (``firsts``, updated), then the
    nominal one, ``nominal`` rotations on. A server run right after itself was 1.1% (-1.3 to 3.6%)
    faster than one run after another (150 rounds, an experiment beside this benchmark); rotating
    by ``nominal`` alone, direct followed direct_cached, or itself, in 30 of the seeded chat stream
    row's 36 rounds."""
    n = len(paths)
    rotations = [paths[s:] + paths[:s] for s in range(n)]
    allowed = [r for r in rotations if _server(r[0]) != _server(last)]
    order = min(allowed, key=lambda r: (firsts[r[0]], (rotations.index(r) - nominal) % n))
    firsts[order[0]] += 1
    return order


def _server(path: str) -> str:
    return path.removesuffix("_cached")


async def swap_router(binary: Path, mdir: Path, tmp: Path, quick: bool) -> dict[str, Any]:
    """Two small models, room for one, 8 closed-loop clients alternating between them, against
    the router (--models-max 1): the same requests (/v1/chat/completions, streamed, 16 tokens,
    end of sequence ignored so both paths generate alike); rounds alternate which goes first."""
    clients, per_client, rounds = 8, (3 if quick else 6), (2 if quick else 16)
    mfolder = folder(a=mdir / "a.gguf", b=mdir / "b.gguf")
    out: dict[str, Any] = {"clients": clients, "requests": clients * per_client, "rounds": rounds}
    # as in the peers rows: the same sampling and template for both; no seed, so both keep the prompt cache.
    # The router gets the HTTP threads ollamad gives its runners: its default pool, max(parallel + 2,
    # cores - 1) = 4 threads, is fewer than the 8 clients, and each connection holds a thread for its life
    extra = ("--chat-template", PROMPT_ONLY_TEMPLATE, "--threads-http", str(runner_http_threads(2)))
    sampling = {**OLLAMA_SAMPLING, "ignore_eos": True}
    runs: dict[str, list[dict[str, Any]]] = {"ollamad": [], "router": []}
    for rnd in range(rounds):
        for path in (("ollamad", "router") if rnd % 2 == 0 else ("router", "ollamad")):
            server: Any = (ollamad(binary, mfolder, tmp, OLLAMA_MAX_LOADED_MODELS="1", OLLAMA_NUM_PARALLEL="2",
                                   OLLAMA_CONTEXT_LENGTH="1024") if path == "ollamad" else
                           router(binary, mfolder, tmp, 2, 1024, extra=extra))
            async with server as p:
                url = p.url
                events: list[tuple[str, float, float]] = []  # (model, first token, end), monotonic

                async def one(s: aiohttp.ClientSession, c: int, i: int, url: str = url,
                              events: list[tuple[str, float, float]] = events) -> Any:
                    model, t0 = "ab"[(c + i) % 2], time.monotonic()
                    r = await ask(s, url, "v1chat", model, STORY, 16, None, True, sampling)
                    events.append((model, t0 + r.ttft, t0 + r.total))
                    return r

                cpu0 = cpu_seconds(p.pid)
                run = await run_clients(clients, per_client, one)
                runs[path].append({"run": run, "loads": _loads(p, path), "cpu_s": cpu_seconds(p.pid) - cpu0,
                                   **phases(events)})
    for path, done in runs.items():
        ok = [r for d in done for r in d["run"].ok]
        out[path] = {"ok": len(ok), "errors": sum(len(d["run"].results) - len(d["run"].ok) for d in done),
                     "error_samples": [e for d in done for e in d["run"].errors()][:3],
                     "loads": sum(d["loads"] for d in done) / rounds,
                     "total_s": sum(d["run"].wall for d in done) / rounds,
                     "total_s_each": [d["run"].wall for d in done], "tokens": sum(r.tokens for r in ok),
                     "wait_p50_s": pct([r.ttft for r in ok], 50), "wait_p99_s": pct([r.ttft for r in ok], 99),
                     "switch_ms": sum(d["switch_ms"] for d in done) / rounds,
                     "serve_ms": sum(d["serve_ms"] for d in done) / rounds,
                     "handoff_ms": pct([h for d in done for h in d["handoffs_ms"]], 50),
                     "proxy_cpu_s": sum(d["cpu_s"] for d in done) / rounds}
    # each round runs both paths back to back: the ratio of their totals is paired
    out["total_ratio"], out["total_ratio_ci"] = geomean_ci(
        [o["run"].wall / r["run"].wall for o, r in zip(runs["ollamad"], runs["router"], strict=True)])
    return out


def phases(events: list[tuple[str, float, float]], slots: int = 2) -> dict[str, Any]:
    """Mean switch gap (one model's last reply done to the next model's first token), mean serve
    time (a model's first token to its last reply done), and the handoffs: within one serve, the
    k-th first token after the (k - slots)-th reply end (a slot freed, the next request's first
    token), from the clients' clocks."""
    spans: list[list[Any]] = []  # [model, first token, last end, firsts, ends]
    for model, first, end in sorted(events, key=lambda e: e[1]):
        if spans and spans[-1][0] == model:
            spans[-1][2] = max(spans[-1][2], end)
        else:
            spans.append([model, first, end, [], []])
        spans[-1][3].append(first)
        spans[-1][4].append(end)
    gaps = [spans[k][1] - spans[k - 1][2] for k in range(1, len(spans))]
    handoffs = [1000 * (sorted(sp[3])[k] - sorted(sp[4])[k - slots]) for sp in spans for k in range(slots, len(sp[3]))]
    return {"switch_ms": 1000 * sum(gaps) / max(len(gaps), 1),
            "serve_ms": 1000 * sum(sp[2] - sp[1] for sp in spans) / max(len(spans), 1), "handoffs_ms": handoffs}


def _loads(p: Proc, path: str) -> int:
    text = p.log.read_text(errors="replace")
    return text.count('"loading model"') if path == "ollamad" else text.count("spawning server instance with name")


def ci_text(m: float, ci: list[float]) -> str:
    """A geometric mean and its interval, as the tables write them."""
    return f"{m:.3f} ({ci[0]:.3f} to {ci[1]:.3f})"


def pooled(rows: list[dict[str, Any]], blocks: int, num: str, den: str = "direct") -> tuple[float, list[float]]:
    """``num`` over ``den`` over all ``rows`` together: each block's mean log ratio over the rows and
    their rounds, then the geometric mean of the blocks' and its 95% interval (over the blocks, whose
    processes differ; the rows of a block share them, so are not counted as independent)."""
    def logs(row: dict[str, Any]) -> list[float]:
        a = row[f"{num}_ratio_rounds"]
        b = row[f"{den}_ratio_rounds"] if den != "direct" else [1.0] * len(a)
        return [math.log(x / y) for x, y in zip(a, b, strict=True)]
    # each round's mean over the rows; geomean_ci then takes each block's mean of those
    rounds = [math.exp(statistics.fmean(r)) for r in zip(*(logs(row) for row in rows), strict=True)]
    return geomean_ci(rounds, blocks)


def _verdict(rows: list[dict[str, Any]], blocks: int = 0) -> str:
    """What the seeded rows tell, read against the targets with the rounds' spread."""
    name = [f"{r['route']} {'stream' if r['stream'] else 'stream:false'}" for r in rows]
    o = [r["ollamad_ratio_mean"] for r in rows]
    below = [n for n, r in zip(name, rows, strict=True) if r["ollamad_ratio_ci"][1] < 0.98]
    behind = [n for n, r in zip(name, rows, strict=True) if r["ollamad_vs_router_ci"][1] < 1]
    return (f"Seeded rows: ollamad / direct from {min(o):.3f} to {max(o):.3f}, router / direct from "
            f"{min(r['router_ratio_mean'] for r in rows):.3f} to {max(r['router_ratio_mean'] for r in rows):.3f}, "
            f"ollamad / router from {min(r['ollamad_vs_router'] for r in rows):.3f} to "
            f"{max(r['ollamad_vs_router'] for r in rows):.3f}. Each figure is the geometric mean of the rounds' "
            "ratios (a round runs the three paths back to back, so its ratios are paired) with its 95% confidence "
            "interval (Student's t over the logs"
            + (f", taken over the means of the {blocks} blocks: each block runs on processes of its own, and two "
               "identical llama-servers, paired over a run of 48 rounds, once differed by 4.6% (1.9 to 7.4%), "
               "for as long as the processes lived" if blocks > 1 else "")
            + "); the targets are read from it. Rows whose whole interval of "
            f"ollamad / direct is below 0.98: {', '.join(below) or 'none'}. Rows whose whole interval of "
            f"ollamad / router is below 1: {', '.join(behind) or 'none'}. "
            + (f"All {len(rows)} rows together (each block's mean over its rows and rounds; the interval over the "
               f"blocks): ollamad / direct {ci_text(*pooled(rows, blocks, 'ollamad'))}, router / direct "
               f"{ci_text(*pooled(rows, blocks, 'router'))}, ollamad / router "
               f"{ci_text(*pooled(rows, blocks, 'ollamad', 'router'))}. With {len(rows)} rows, each a 95% interval, "
               f"a path exactly at parity would show at least one row wholly below it in about "
               f"{100 * (1 - 0.975 ** len(rows)):.0f}% of runs if the rows were independent."
               if blocks > 1 else ""))


PEERS_HEADING = "## 7. Peers: llama-server alone, ollamad, llama.cpp's router mode"


def render_peers(res: dict[str, Any], heading: str = PEERS_HEADING, intro: str | None = None) -> list[str]:
    def f(x: float, d: int = 1) -> str:
        return f"{x:.{d}f}"

    lines: list[str] = []
    if "peers" in res:
        lines += [heading, ""] + ([intro, ""] if intro else [])
        lines += ["The same requests (same prompt, 96-token limit, the same sampling settings named in every "
                  "request: Ollama's defaults; 4 slots of 2048 context, 4 closed-loop clients) straight to "
                  "llama-server, through ollamad and through llama-server's own multi-model proxy "
                  "(`--models-dir DIR --models-max 1`, same binary), each llama-server on one thread (on 2 "
                  "shared cores, llama-server's threads stall on each other when others run). Rounds interleave "
                  "the paths, rotating which goes first, and no path runs right after one on the same llama-server "
                  "(whose caches would still be warm: such a server was 1.1% faster, -1.3 to 3.6%, in an experiment "
                  "beside this benchmark; the measurement with llama-server's prompt cache uses the direct path's "
                  "server). Straight and through the router, /api/chat goes as the "
                  "/v1/chat/completions request it becomes and /api/generate (raw) as /completion. "
                  "Requests carry seeds (all paths generate the same tokens) except in the row marked no seed. "
                  "Targets: ollamad >= 0.98 x direct and >= the router's ratio.",
                  ""]
        for label, v in res["peers"].items():
            fine = all("ollamad_ratio_mean" in row for row in v["rows"].values())
            blocks = v.get("blocks", 0)
            lines += [f"**{label}** (`{v['model']}`, {v['rounds']} rounds of {v['clients']} clients x "
                      f"{v.get('per_client', 1)} requests per path and row"
                      + (f", in {blocks} blocks, each on the three paths started afresh" if blocks > 1 else "")
                      + ")", ""]
            if fine:
                lines += ["| route | stream | direct tok/s | ollamad tok/s | router tok/s | ollamad / direct "
                          "(95% CI) | router / direct (95% CI) | ollamad / router (95% CI) | tokens d / o / r |",
                          "|---|---|---|---|---|---|---|---|---|"]
            else:
                lines += ["| route | stream | direct tok/s | ollamad tok/s | router tok/s | ollamad / direct, "
                          "median of rounds | router / direct, median of rounds | ollamad / direct, all rounds | "
                          "router / direct, all rounds | tokens d / o / r |",
                          "|---|---|---|---|---|---|---|---|---|---|"]
            for row in v["rows"].values():
                errs = sum(len(row[p]["errors"]) for p in PATHS)
                route = row["route"] + ("" if row.get("seeded", True) else " (no seed)")
                head = (f"| {route} | {row['stream']} | {f(row['direct']['tokens_per_s'])} | "
                        f"{f(row['ollamad']['tokens_per_s'])} | {f(row['router']['tokens_per_s'])} | ")
                tail = (f"{row['direct']['tokens']} / {row['ollamad']['tokens']} / {row['router']['tokens']}"
                        + (f" ({errs} errors)" if errs else "") + " |")
                if fine:
                    lines.append(head + f"**{ci_text(row['ollamad_ratio_mean'], row['ollamad_ratio_ci'])}** | "
                                 f"{ci_text(row['router_ratio_mean'], row['router_ratio_ci'])} | "
                                 f"{ci_text(row['ollamad_vs_router'], row['ollamad_vs_router_ci'])} | " + tail)
                else:
                    lines.append(head + f"**{f(row.get('ollamad_ratio_paired', row['ollamad_ratio']), 3)}** | "
                                 f"{f(row.get('router_ratio_paired', row['router_ratio']), 3)} | "
                                 f"{f(row['ollamad_ratio'], 3)} | {f(row['router_ratio'], 3)} | " + tail)
            plain = [row for row in v["rows"].values() if row.get("seeded", True)]
            if fine:
                lines += ["", _verdict(plain, blocks)]
            else:
                o = [r.get("ollamad_ratio_paired", r["ollamad_ratio"]) for r in plain]
                rr = [r.get("router_ratio_paired", r["router_ratio"]) for r in plain]
                lines += ["", f"Seeded rows, median of rounds: ollamad / direct from {f(min(o), 3)} to {f(max(o), 3)}, "
                          f"router / direct from {f(min(rr), 3)} to {f(max(rr), 3)}. Each round runs the three paths "
                          "back to back, so its ratios are paired; the median over rounds is what a round that other "
                          "work on the machine slowed does not move, and the targets are read from it. The ratio of "
                          "the totals over all rounds is beside it."]
            for row in v["rows"].values():
                if "direct_cached" in row:
                    cached = row["direct_cached"]["tokens_per_s"]
                    lines += ["", "Seeded rows: every path generates the same tokens, and ollamad evaluates a "
                              "seeded request's prompt anew (`cache_prompt` false: with llama-server's prompt "
                              "cache the same seed can give another answer), so the direct and router requests "
                              "ask for the same: the same work upstream. Straight to llama-server with its prompt "
                              f"cache, the seeded streamed chats ran at {f(cached)} tok/s: the guarantee costs "
                              f"{f(100 * (1 - row['direct']['tokens_per_s'] / cached), 0)}% on this short prompt. "
                              "The unseeded row is what chat apps send: every path keeps its prompt cache, and "
                              "the answers, so the token counts, differ."]
            lines.append("")
    if "swap_router" in res:
        s = res["swap_router"]
        rounds = s.get("rounds", 1)
        lines += ["## 8. Model swapping against the router (two 10 MB models, room for one, 8 closed-loop clients "
                  "alternating)", "",
                  f"{s['requests']} streamed /v1/chat/completions requests of 16 tokens (end of sequence ignored, "
                  f"the same sampling on both) per run, {rounds} runs per path, alternating which goes first; "
                  "loads and total time are per run (mean; each run's total beside it), wait is the time to the "
                  "first token over all runs.", "",
                  "| path | ok | errors | loads | total s | each run s | wait p50 s | wait p99 s | switch ms | "
                  "serve ms | handoff ms | proxy CPU s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in ("ollamad", "router"):
            v = s[p]
            each = ", ".join(f(x, 2) for x in v.get("total_s_each", [v["total_s"]]))
            lines.append(f"| {p} | {v['ok']} | {v['errors']} | {f(v['loads'], 1)} | {f(v['total_s'], 2)} | {each} | "
                         f"{f(v['wait_p50_s'], 2)} | {f(v['wait_p99_s'], 2)} | {f(v.get('switch_ms', 0))} | "
                         f"{f(v.get('serve_ms', 0))} | {f(v['handoff_ms']) if 'handoff_ms' in v else '-'} | "
                         f"{f(v['proxy_cpu_s'], 3) if 'proxy_cpu_s' in v else '-'} |")
        if "total_ratio" in s:
            lines += ["", "Total time, ollamad / router, paired by run: "
                      f"{ci_text(s['total_ratio'], s['total_ratio_ci'])} "
                      "(geometric mean of the runs' ratios, 95% confidence interval)."]
        lines += ["", "Switch: from one model's last reply to the next model's first token (stop, load, first "
                  "token), mean per switch. Serve: from a model's first token to its last reply (8 requests on 2 "
                  "slots), mean per load. Handoff: within a serve, from a reply's end (a slot freed) to the first "
                  "token of the request that took the slot, median over all runs. All from the clients' clocks. "
                  "The router runs with the --threads-http that ollamad gives its runners (its default pool has "
                  "4 threads here, fewer than the 8 clients, and a kept-alive connection holds a thread). "
                  "The router forwards every queued request to its child at once, so llama-server starts the next "
                  "one the moment a slot frees. ollamad keeps its queue (FIFO, OLLAMA_MAX_QUEUE) and sends a busy "
                  "runner one request per slot beyond its slots (OLLAMAD_SEND_AHEAD=1), which waits in "
                  "llama-server's own queue, so that it too starts the moment a slot frees; past its accept "
                  "timeout it waits on while every slot is busy, and one whose runner goes before it started is "
                  "sent again to a new runner. Sending each request only once a slot had freed, the handoff was "
                  "6.4 ms (median of 4 runs of the same workload, an experiment beside this benchmark) against "
                  "4.0 ms with it and 4.1 for the router; the serve 56.9 against 53.6 and 49.9 ms. Proxy CPU: "
                  "what the daemon, or "
                  "the router's own process, used per run (user + system), not counting its llama-servers: on two "
                  "cores it is taken from them and from the clients."]
        lines += ["", "Target: fewer loads than the router and total time no worse. Neither can load less than "
                  "7 times here: the clients start split 4 and 4 over the two models, so whichever loads first, "
                  "the other half needs its model second, and each of those clients then needs 5 more "
                  "alternations: 7 loads, each serving every client waiting for it. Both reach that floor; "
                  "llama.cpp's router also queues requests per model and never evicts a busy one.", ""]
    return lines
