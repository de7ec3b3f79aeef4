"""scripts/benchpeers.py: the order of the paths within a round of the peer comparison."""

from __future__ import annotations

import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import benchpeers


def _schedule(blocks: int, rounds: int) -> list[list[tuple[str, ...]]]:
    """Every block's sequence of row orders, as _peers_block runs them."""
    firsts: dict[int, Counter[str]] = {}
    return [[order for _, _, order in benchpeers.block_schedule(block, rounds, firsts)] for block in range(blocks)]


def test_no_path_runs_right_after_its_own_llama_server() -> None:
    for seq in _schedule(6, 6):
        paths = [benchpeers.PATHS[-1]] + [p for order in seq for p in order]  # the warm-up ends on the router
        servers = [benchpeers._server(p) for p in paths]
        assert all(a != b for a, b in pairwise(servers))


def test_each_path_goes_first_about_equally_often_in_every_row() -> None:
    rows = len(benchpeers.ROWS)
    seqs = _schedule(6, 6)
    for k in range(rows):
        orders = [seq[i] for seq in seqs for i in range(k, len(seq), rows)]
        assert sorted(set(orders[0])) == sorted(benchpeers._paths(*benchpeers.ROWS[k]))
        for position in range(len(orders[0])):
            counts = Counter(order[position] for order in orders)
            assert max(counts.values()) - min(counts.values()) <= 2, (k, position, counts)


def test_the_nominal_rotation_unless_its_first_path_ran_last_or_went_first_more_often() -> None:
    paths = ("direct", "ollamad", "router")
    assert benchpeers.round_order(paths, 1, "direct", Counter()) == ("ollamad", "router", "direct")
    assert benchpeers.round_order(paths, 0, "direct_cached", Counter()) == ("ollamad", "router", "direct")
    assert benchpeers.round_order(paths, 1, "router", Counter({"ollamad": 1})) == ("direct", "ollamad", "router")
    firsts: Counter[str] = Counter()
    benchpeers.round_order(paths, 2, "ollamad", firsts)
    assert firsts == Counter({"router": 1})
