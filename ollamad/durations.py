"""Go-style durations and Ollama's keep_alive rules, as pure functions.

A keep-alive is a number of seconds as a float; ``FOREVER`` (infinity) means never unload.
"""

from __future__ import annotations

import math
import re

FOREVER = math.inf

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Parse a Go ``time.ParseDuration`` string ("1h30m", "-2.5s", "0") into seconds."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise ValueError(f"time: invalid duration {text.strip()!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ValueError(f"time: invalid duration {text.strip()!r}")
    return sign * total


def keep_alive_from_env(text: str) -> float:
    """OLLAMA_KEEP_ALIVE: a Go duration or whole seconds; negative means forever."""
    s = text.strip().strip("\"'")
    try:
        seconds = parse_go_duration(s)
    except ValueError:
        try:
            seconds = float(int(s))
        except ValueError:
            raise ValueError(f"invalid duration {s!r} (use e.g. 5m, 1h30m, 300 or -1)") from None
    return FOREVER if seconds < 0 else seconds


def keep_alive_from_request(value: object) -> float:
    """keep_alive in a request body: a JSON number is seconds, a string a Go duration.

    As in Ollama, a numeric string such as "300" is rejected; negative means forever.
    """
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a number of seconds or a duration string")
    if isinstance(value, int | float):
        if math.isnan(value):
            raise ValueError("keep_alive must not be NaN")
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_go_duration(value)
    else:
        raise ValueError("keep_alive must be a number of seconds or a duration string")
    return FOREVER if seconds < 0 else seconds


def format_duration(seconds: float) -> str:
    """Render seconds the way Go prints a time.Duration ("5m0s", "1h0m0s", "1.5s")."""
    if seconds == FOREVER:
        return "forever"
    if seconds < 1:
        return f"{seconds * 1000:g}ms" if seconds else "0s"
    whole = int(seconds)
    frac = seconds - whole
    h, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    sec = f"{s + frac:g}s"
    if h:
        return f"{h}h{m}m{sec}"
    if m:
        return f"{m}m{sec}"
    return sec
