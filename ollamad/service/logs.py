"""structlog, configured once: JSON under journald (no terminal), console on a terminal.

Under journald (stderr is the stream $JOURNAL_STREAM names) each line starts with the
syslog priority in angle brackets, "<4>" for a warning, which journald strips and stores
as the entry's PRIORITY: `journalctl -u ollamad -p warning` then shows warnings and errors.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

# syslog priorities (sd-daemon.h's SD_ERR, SD_WARNING, ...) by structlog level name
PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}


def under_journald(stream: TextIO) -> bool:
    """True when ``stream`` is connected to journald (systemd sets JOURNAL_STREAM=device:inode)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not a real file (pytest's capture)
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def priority_prefix(level: str, stream: TextIO | None = None) -> str:
    """"<N>" for a line at ``level`` when ``stream`` goes to journald, else ""."""
    return f"<{PRIORITY.get(level, 6)}>" if under_journald(stream or sys.stderr) else ""


class _WithPriority:
    """Wraps the renderer: "<N>" before each rendered line."""

    def __init__(self, renderer: structlog.typing.Processor) -> None:
        self.renderer = renderer

    def __call__(self, logger: Any, name: str, event: structlog.typing.EventDict) -> str:
        prefix = f"<{PRIORITY.get(str(event.get('level', name)), 6)}>"
        rendered = self.renderer(logger, name, event)
        assert isinstance(rendered, str)
        return prefix + rendered.replace("\n", "\n" + prefix)


def configure(debug: bool = False, stream: TextIO | None = None, json: bool | None = None) -> None:
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    level = logging.DEBUG if debug else logging.INFO
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    if under_journald(stream):
        renderer = _WithPriority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
