"""scripts/benchpeers.py: all rows of a peers run read together, blocks as the unit."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from benchpeers import pooled


def _row(ollamad: list[float], router: list[float]) -> dict[str, list[float]]:
    return {"ollamad_ratio_rounds": ollamad, "router_ratio_rounds": router}


def test_a_constant_ratio_reads_as_itself_with_no_spread() -> None:
    rows = [_row([0.98] * 6, [1.0] * 6), _row([0.98] * 6, [0.99] * 6)]
    m, ci = pooled(rows, 3, "ollamad")
    assert math.isclose(m, 0.98) and math.isclose(ci[0], 0.98) and math.isclose(ci[1], 0.98)
    m, _ = pooled(rows, 3, "ollamad", "router")
    assert math.isclose(m, math.sqrt(0.98 / 1.0 * 0.98 / 0.99))  # the geometric mean over rows


def test_the_interval_is_over_blocks_not_rounds() -> None:
    # two blocks of 3 rounds: the rounds agree within a block, the blocks differ. Taken over the 6
    # rounds the interval would be narrower; over the 2 blocks it is wide (t with 1 degree of freedom)
    rows = [_row([0.95, 0.95, 0.95, 1.05, 1.05, 1.05], [1.0] * 6)]
    m, (lo, hi) = pooled(rows, 2, "ollamad")
    assert math.isclose(m, math.sqrt(0.95 * 1.05))
    assert lo < 0.7 and hi > 1.4
