"""Fuzz every route against a daemon over the fake llama-server: no 5xx, no hang, no crash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.fuzzing import Figures, run_all


def test_fuzz_routes(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir, OLLAMAD_MAX_BODY="64KiB")
    figures = Figures()
    run_all(d.port, examples=40, figures=figures)
    result = figures.as_dict()
    assert result["cases"] >= 150
    assert result["status_5xx"] == 0, result["examples_5xx"]
    assert result["hangs"] == 0, result["examples_hang"]
    assert d.proc is not None and d.proc.poll() is None
    assert d.request("GET", "/")[0] == 200
