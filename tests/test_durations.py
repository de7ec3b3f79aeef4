from __future__ import annotations

import pytest

from ollamad.durations import FOREVER, format_duration, keep_alive_from_env, keep_alive_from_request, parse_go_duration


@pytest.mark.parametrize(("text", "seconds"), [
    ("0", 0), ("5m", 300), ("1h30m", 5400), ("1.5s", 1.5), ("300ms", 0.3), ("-1s", -1), ("2h45m10s", 9910),
    ("10us", 1e-5), ("+3m", 180),
])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "300", "5 m", "m", "1x", "--1s", "1.2.3s"])
def test_bad_go_durations(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(bad)


@pytest.mark.parametrize(("text", "seconds"), [("5m", 300), ("300", 300), ("-1", FOREVER), ("0", 0),
                                               ("'10m'", 600), ('"-5m"', FOREVER)])
def test_env_keep_alive(text: str, seconds: float) -> None:
    assert keep_alive_from_env(text) == seconds


@pytest.mark.parametrize(("value", "seconds"), [(30, 30), (0, 0), (-1, FOREVER), (1.5, 1.5), ("10m", 600),
                                                ("0", 0), ("-1m", FOREVER)])
def test_request_keep_alive(value: object, seconds: float) -> None:
    assert keep_alive_from_request(value) == seconds


@pytest.mark.parametrize("bad", ["300", "abc", True, [1], {"a": 1}, None, float("nan")])
def test_bad_request_keep_alive(bad: object) -> None:
    with pytest.raises(ValueError):
        keep_alive_from_request(bad)


def test_format() -> None:
    assert format_duration(300) == "5m0s"
    assert format_duration(5400) == "1h30m0s"
    assert format_duration(FOREVER) == "forever"
