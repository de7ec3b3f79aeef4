"""scripts/benchlib.py: pairing the first-token times of two paths by rank within a wave."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from benchlib import Result, paired_median_ms, rank_paired_median_ms


def _results(ttfts: dict[int, float]) -> list[Result]:
    return [Result(ttft=t, total=1.0, tokens=1, status=200, seed=seed) for seed, t in ttfts.items()]


WAVES = {1: "a", 2: "a", 3: "a", 4: "a", 5: "b", 6: "b", 7: "b", 8: "b"}
DIRECT = {1: 0.012, 2: 0.044, 3: 0.044, 4: 0.045, 5: 0.013, 6: 0.043, 7: 0.044, 8: 0.046}


def test_a_race_won_by_another_request_adds_nothing_by_rank() -> None:
    # the same waves, but another request of each wins llama-server's race, and one more is late
    swapped = {1: 0.044, 2: 0.012, 3: 0.044, 4: 0.046, 5: 0.043, 6: 0.013, 7: 0.044, 8: 0.046}
    assert abs(rank_paired_median_ms(_results(DIRECT), _results(swapped), WAVES)) < 1e-9  # 7 of 8 pairs: 0
    by_seed = [1000 * (swapped[k] - DIRECT[k]) for k in DIRECT]
    assert max(by_seed) > 30 and min(by_seed) < -30  # what pairing the same requests counts


def test_a_delay_on_every_request_reads_as_itself() -> None:
    later = {seed: t + 0.002 for seed, t in DIRECT.items()}
    assert abs(rank_paired_median_ms(_results(DIRECT), _results(later), WAVES) - 2.0) < 1e-9
    assert abs(paired_median_ms(_results(DIRECT), _results(later)) - 2.0) < 1e-9


def test_a_wave_with_a_missing_request_is_left_out() -> None:
    later = {seed: t + 0.002 for seed, t in DIRECT.items() if seed != 5}
    later[6] = 0.5  # wave b: left out, one of its requests failed
    assert abs(rank_paired_median_ms(_results(DIRECT), _results(later), WAVES) - 2.0) < 1e-9
