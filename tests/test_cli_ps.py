"""``ollamad ps`` columns that follow ``ollama ps``: UNTIL wording."""

from __future__ import annotations

import pytest

from ollamad.cli import until

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


@pytest.mark.parametrize(("expires", "status", "text"), [
    ("2027-01-15T08:04:30.000000Z", "ready", "4 minutes from now"),
    ("2027-01-15T08:00:01.500000Z", "ready", "1 second from now"),
    ("2027-01-15T10:00:00.000000Z", "ready", "2 hours from now"),
    ("2027-01-15T08:00:00.200000Z", "ready", "Less than a second from now"),
    ("2318-08-07T02:09:33.437417Z", "ready", "Forever"),
    ("2027-01-15T08:04:30.000000Z", "stopping", "Stopping..."),
])
def test_until(expires: str, status: str, text: str) -> None:
    assert until(expires, status, now=NOW) == text
