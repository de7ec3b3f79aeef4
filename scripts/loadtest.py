#!/usr/bin/env python3
"""Load test: waves of 1,000 concurrent clients against one model (4 slots, default queue 512).

Every request must either complete (done: true) or get the documented 503 ("server busy,
please try again.  maximum pending requests exceeded"); none may hang; the counts must add
up; the daemon's RSS after 10,000 requests must be within a few MB of where it settled
after the first 1,000. The model runs on the fake llama-server (tests/fake_llama_server.py,
a few fast tokens per request) so the run is bounded in time and measures the daemon, not
llama.cpp. Loopback only.

Usage: .venv/bin/python scripts/loadtest.py [--clients 1000] [--waves 10] [--out figures/loadtest.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ollamad.models.testmodels import write_all
from ollamad.sched.core import QUEUE_FULL
from tests.conftest import Daemon, fake_with

CLIENT_TIMEOUT = 120.0  # a request still unanswered after this counts as hung
MEMORY_SLACK_MB = 5.0


async def one(session: aiohttp.ClientSession, url: str, i: int) -> str:
    body = {"model": "tiny", "prompt": f"request {i}", "stream": i % 2 == 0, "options": {"num_predict": 4}}
    try:
        async with session.post(url, json=body) as r:
            text = await r.text()
            if r.status == 503:
                return "503 queue full" if json.loads(text).get("error") == QUEUE_FULL else f"503 other: {text}"
            if r.status != 200:
                return f"{r.status}: {text[:200]}"
            last = json.loads(text.strip().splitlines()[-1])
            return "completed" if last.get("done") is True else f"200 unfinished: {text[-200:]}"
    except TimeoutError:
        return "hung"
    except aiohttp.ClientError as e:
        return f"client error: {type(e).__name__}"


async def wave(url: str, clients: int, start: int) -> Counter[str]:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        results = await asyncio.gather(*(one(session, url, start + i) for i in range(clients)))
    return Counter(results)


def rss_mb(proc: psutil.Process) -> float:
    return round(proc.memory_info().rss / 2**20, 2)


def settled_rss(proc: psutil.Process) -> float:
    """RSS once the daemon has been idle a moment (keep-alive timers, buffers released)."""
    time.sleep(2)
    return rss_mb(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--waves", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "figures" / "loadtest.json")
    args = ap.parse_args()
    totals: Counter[str] = Counter()
    waves: list[dict[str, Any]] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_all(folder / "models", ("tiny",))
        d = Daemon(fake_with(folder, FAKE_TOKEN_DELAY="0.001"), folder / "models",
                   {"OLLAMA_NUM_PARALLEL": "4", "OLLAMA_KEEP_ALIVE": "1h"})
        d.start(folder / "daemon.log")
        assert d.proc is not None
        proc = psutil.Process(d.proc.pid)
        url = f"{d.url}/api/generate"
        try:
            for w in range(args.waves):
                w0 = time.monotonic()
                counts = asyncio.run(wave(url, args.clients, w * args.clients))
                gc.collect()
                totals.update(counts)
                waves.append({"wave": w + 1, "requests": sum(counts.values()), "outcomes": dict(counts),
                              "seconds": round(time.monotonic() - w0, 2), "daemon_rss_mb": settled_rss(proc)})
                print(json.dumps(waves[-1]), flush=True)
            _, ps = d.get("/api/ps")
            alive = d.proc.poll() is None
        finally:
            code = d.stop()
    requests = args.clients * args.waves
    first, last = waves[0]["daemon_rss_mb"], waves[-1]["daemon_rss_mb"]
    accounted = totals["completed"] + totals["503 queue full"]
    result = {
        "backend": "fake llama-server (fast tokens), one model, OLLAMA_NUM_PARALLEL=4, OLLAMA_MAX_QUEUE=512",
        "concurrent_clients": args.clients, "waves": args.waves, "requests": requests,
        "outcomes": dict(totals), "completed": totals["completed"], "refused_503": totals["503 queue full"],
        "other": requests - accounted, "hung": totals["hung"], "counts_add_up": sum(totals.values()) == requests,
        "daemon_rss_mb_after_first_wave": first, "daemon_rss_mb_after_last_wave": last,
        "rss_growth_mb": round(last - first, 2), "queue_after": ps.get("queue"), "daemon_alive_after": alive,
        "daemon_exit_code": code, "seconds": round(time.monotonic() - t0, 1), "per_wave": waves,
    }
    ok = (result["other"] == 0 and result["counts_add_up"] and alive and code == 0
          and result["rss_growth_mb"] <= MEMORY_SLACK_MB and ps.get("queue", {}).get("waiting") == 0)
    result["passed"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_wave"}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
