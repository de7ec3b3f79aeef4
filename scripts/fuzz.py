#!/usr/bin/env python3
"""Fuzz every route of a daemon running over the fake llama-server; write the figures.

Usage: .venv/bin/python scripts/fuzz.py [--examples N] [--out figures/fuzz.json]
Loopback only; bounded by N cases per route group, each with a 30 s limit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ollamad.models.testmodels import write_all
from tests.conftest import Daemon, fake_with
from tests.fuzzing import Figures, run_all


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", type=int, default=400, help="cases per route group")
    ap.add_argument("--out", type=Path, default=ROOT / "figures" / "fuzz.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_all(folder / "models", ("tiny", "small"))
        d = Daemon(fake_with(folder), folder / "models", {"OLLAMAD_MAX_BODY": "64KiB"})
        d.start(folder / "daemon.log")
        figures = Figures()
        t0 = time.monotonic()
        try:
            run_all(d.port, args.examples, figures)
            alive = d.proc is not None and d.proc.poll() is None and d.request("GET", "/")[0] == 200
        finally:
            code = d.stop()
    result = {"tool": "hypothesis (tests/fuzzing.py)", "backend": "fake llama-server (tests/fake_llama_server.py)",
              "examples_per_group": args.examples, "seconds": round(time.monotonic() - t0, 1),
              **figures.as_dict(), "daemon_alive_after": alive, "daemon_exit_code": code}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["status_5xx"] == 0 and result["hangs"] == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
