"""The package's log events, routed to whichever logging the app configured.

One event per aborted request (``request_aborted``), and a few about the middleware's own
troubles. The library never configures logging. A level set on the ``asgi_disconnect``
logger (or ``logging.disable()``) silences what it filters, whatever else is set. Then:
an app that configured structlog gets the events through its processors; one that
configured only the standard library's ``logging`` (a handler on our logger or an
ancestor) gets records of the ``asgi_disconnect`` logger; one that configured neither
gets structlog's default output, as structlog prints any library's events.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import structlog

#: The name of the logger of every event, structlog's and the standard library's.
LOGGER_NAME = "asgi_disconnect"

_structlog = structlog.get_logger(LOGGER_NAME)
_stdlib = logging.getLogger(LOGGER_NAME)
# What ``extra=`` may not set: ``logging`` raises for a name a record already has.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


#: The levels an event may have, and structlog's method for each (any wrapper class has them).
LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}


def emit(level: int, event: str, fields: Mapping[str, Any], *, exc_info: bool = False) -> None:
    """Log ``event`` with ``fields`` at ``level`` (one of ``LEVELS``); never raise."""
    try:
        _emit(level, event, fields, exc_info)
    except Exception:
        # The app's logging failed (a structlog processor that raises): say so where the
        # standard library always prints, and go on; a departure is no server error.
        _stdlib.error("asgi_disconnect could not log %r", event, exc_info=True)


def _emit(level: int, event: str, fields: Mapping[str, Any], exc_info: bool) -> None:
    if (_stdlib.level != logging.NOTSET or logging.root.manager.disable) and not _stdlib.isEnabledFor(level):
        return  # the app silenced it: a level set on our logger, or logging.disable()
    if not structlog.is_configured() and _stdlib.hasHandlers():
        # Only the standard library is configured (a handler on our logger or an ancestor,
        # as basicConfig() and dictConfig() put on the root): a record of our logger, its
        # fields as attributes for structured handlers and as key=value in the message.
        if _stdlib.isEnabledFor(level):
            extra = {key: value for key, value in fields.items() if key not in _RESERVED}
            extra["event"] = event
            _stdlib.log(level, "%s %s", event, _logfmt(fields), extra=extra, exc_info=exc_info)
        return
    # structlog, configured by the app or with its defaults (which print). The logger key
    # is the one structlog's add_logger_name would add: our events can be told from others
    # whatever the app's processors (the pytest plugin's capture filters on it).
    log = getattr(_structlog, LEVELS[level])
    if exc_info:
        log(event, logger=LOGGER_NAME, exc_info=True, **fields)
    else:
        log(event, logger=LOGGER_NAME, **fields)


def _logfmt(fields: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={_value(value)}" for key, value in fields.items())


def _value(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "='):
        return text
    # Quoted, with every control and non-ASCII character escaped: a path or a header
    # cannot forge a second line, or a terminal escape, in the app's log.
    return json.dumps(text)


def level_number(level: int | str, option: str = "log_level") -> int:
    """A level of ``LEVELS`` from its number or its name (``"info"``, ``"WARNING"``)."""
    if isinstance(level, bool) or not isinstance(level, int | str):
        raise TypeError(f"{option} takes a logging level name or number, got {level!r}")
    number = logging.getLevelNamesMapping().get(level.upper()) if isinstance(level, str) else level
    if number not in LEVELS:
        names = ", ".join(LEVELS.values())
        raise ValueError(f"{option} takes one of {names} (or its logging number), got {level!r}")
    return number
