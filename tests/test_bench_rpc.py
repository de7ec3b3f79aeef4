"""scripts/bench_rpc.py owns one marked section of BENCHMARKS.md; scripts/bench.py keeps it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench
import bench_rpc


def test_section_is_replaced_in_place_and_survives_a_bench_rewrite(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## 1. Proxy overhead\n")
    meta = {"date": "2026-11-24", "machine": "x86_64", "cpus": 2, "tokens": 8, "rounds": 1, "seconds": 3.0,
            "load_before": 1.0, "load_after": 2.0}
    row = {"load_s": 1.0, "tok_s": 10.0, "cpu_ms_per_token": 20.0, "processor": "100% CPU", "workers": []}
    split = {"load_s": 2.0, "tok_s": 5.0, "cpu_ms_per_token": 30.0, "processor": "5% CPU / 95% RPC",
             "workers": ["a:1", "b:1"]}
    bench_rpc.write_section(md, bench_rpc.render({"local": row, "split": split}, meta))
    bench_rpc.write_section(md, bench_rpc.render({"local": row, "split": split}, meta))
    text = md.read_text()
    assert text.count(bench_rpc.BEGIN) == 1
    assert "| split | 5% CPU / 95% RPC | 2 | 2.00 | 5.0 | 0.50 | 30.0 | 1.50 |" in text
    kept = bench.kept(tmp_path)  # what bench.py appends when it rewrites the file
    assert kept.count(bench_rpc.BEGIN) == 1 and kept.strip().endswith(bench_rpc.END)
