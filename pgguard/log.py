"""The one structured logger: ``event=name key=value`` lines (or JSON objects), client-supplied text escaped.

Every value is data, never format: a user or database name comes from whoever reached the
port, so it may hold newlines (which would forge log lines), quotes, control characters or
bytes that are not UTF-8 (``wire`` keeps them as surrogate escapes). ``display`` turns any
such text into one printable line that still tells distinct names apart; ``log_event`` quotes
it logfmt-style where needed. The same ``display`` is what SHOW CLIENTS and ``/metrics`` show.

With ``[log] format = "json"``, ``JSONFormatter`` writes each record as one JSON object
(``ts``, ``level``, ``event``, then the event's fields), the escaping left to the JSON encoder:
a name comes back from ``json.loads`` exactly as the client sent it (bytes that were not UTF-8
as the lone surrogates ``wire`` decoded them to, ``\\udcXX``), cut at ``MAX_DISPLAY``.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import re
from collections.abc import Mapping
from typing import Final

__all__ = ["log", "log_event", "display", "logfmt_value", "RateLimitedLog", "JSONFormatter", "TEXT_FORMAT"]

log = logging.getLogger("pgguard")

# How an unprintable character is written (anything else: \xNN or \uNNNN). A backslash is
# escaped too, so an escaped name never reads the same as another name.
_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# A value that needs quotes in a logfmt line (besides an empty one).
_QUOTE: Final = re.compile(r'[\s"=]')
# Longest client-supplied value written into one log field or label; the rest is cut
# (PostgreSQL itself truncates names to NAMEDATALEN-1 = 63 bytes).
MAX_DISPLAY: Final = 256


def _escape_char(c: str) -> str:
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the raw byte it stands for
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def display(text: str, limit: int = MAX_DISPLAY) -> str:
    """``text`` as one printable, valid-UTF-8 line: controls and undecodable bytes escaped.

    Every character Python does not call printable (controls, line and paragraph separators,
    format characters, the surrogates that stand for bytes that were not UTF-8) and the
    backslash are escaped. Longer than ``limit`` characters, it is cut and ends with ``...``.
    """
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else _escape_char(c) for c in text)


def logfmt_value(value: object) -> str:
    """One value of a ``key=value`` line: escaped, and quoted when it is empty or has spaces."""
    text = display(str(value))
    if not text or _QUOTE.search(text):
        return '"' + text.replace('"', '\\"') + '"'
    return text


def log_event(level: int, event: str, **fields: object) -> None:
    """One structured key=value log line per event that matters (the fields ride along on the
    record for ``JSONFormatter``)."""
    if log.isEnabledFor(level):
        parts = [f"event={event}"]
        parts += [f"{key}={logfmt_value(value)}" for key, value in fields.items()]
        log.log(level, " ".join(parts), extra={_EVENT: event, _FIELDS: fields})


# The LogRecord attributes log_event sets (a record without them came from a plain log call).
_EVENT: Final = "pgguard_event"
_FIELDS: Final = "pgguard_fields"
# The text format's prefix (a worker of [server] workers adds worker=i after the level).
TEXT_FORMAT: Final = "%(asctime)s level=%(levelname)s %(message)s"
# Keys every JSON line starts with; an event field of the same name is written as field_<name>.
_RESERVED: Final = frozenset({"ts", "level", "event", "message", "logger", "traceback"})


def _json_value(value: object) -> object:
    """A field as JSON: numbers, booleans and null as themselves, anything else as (cut) text."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    text = str(value)
    return text if len(text) <= MAX_DISPLAY else text[:MAX_DISPLAY] + "..."


class JSONFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (RFC 3339, UTC), ``level``, ``event``, the fields.

    A record from ``log_event`` carries its fields; any other (a traceback, a library's line)
    has ``event`` taken from a leading ``event=NAME`` (else ``"log"``) and its text under
    ``message``; a traceback goes under ``traceback``. ``static`` fields (``worker``) follow
    ``level``. The encoder escapes quotes, newlines, control characters and undecodable bytes
    (``ensure_ascii``), so one record is always one line.
    """

    def __init__(self, static: Mapping[str, object] | None = None) -> None:
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, object] = {"ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                                  "level": record.levelname}  # fmt: skip
        out.update(self.static)
        event = getattr(record, _EVENT, None)
        if isinstance(event, str):
            out["event"] = event
            fields: Mapping[str, object] = getattr(record, _FIELDS, {})
            for key, value in fields.items():
                out[f"field_{key}" if key in _RESERVED or key in self.static else key] = _json_value(value)
        else:
            message = record.getMessage()
            name, sep, rest = message.partition(" ")
            if name.startswith("event=") and len(name) > 6:
                out["event"], message = name[6:], rest
            else:
                out["event"] = "log"
            out["message"] = message
            if record.name != log.name:
                out["logger"] = record.name
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["traceback"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=True, separators=(",", ":"), default=str)


class RateLimitedLog:
    """At most one line per key per ``window`` seconds; the rest are counted and summed up.

    The first event of a key in a window is logged in full; later ones only add to a count,
    written as one ``<event>_summary`` line when the window ends. Memory is bounded by the
    keys seen in one window, and dropped when it ends. The shell drives the clock: it calls
    ``event`` and, ``window`` seconds after the first call returned True, ``flush``.
    """

    def __init__(
        self, event: str, window: float, *, max_keys: int = 1000, overflow: tuple[object, ...] = ()
    ) -> None:
        self.event = event
        self.window = window
        # Keys hold client-supplied names: past max_keys distinct keys in one window, further
        # new keys are all counted under ``overflow`` (logged once, like any key).
        self.max_keys = max_keys
        self.overflow = overflow
        self._counts: dict[tuple[object, ...], int] = {}

    def event_now(self, key: tuple[object, ...]) -> bool:
        """Count one event of ``key``; True when it is the first of its window (log it)."""
        counts = self._counts
        if key not in counts and len(counts) >= self.max_keys:
            key = self.overflow
        unlogged = counts.get(key)
        if unlogged is None:
            counts[key] = 0
            return True
        counts[key] = unlogged + 1
        return False

    @property
    def pending(self) -> bool:
        return bool(self._counts)

    def flush(self, names: tuple[str, ...]) -> None:
        """End the window: one summary line per key with unlogged events (``names`` label the key)."""
        counts, self._counts = self._counts, {}
        for key, unlogged in counts.items():
            if unlogged:
                fields = dict(zip(names, key, strict=True))
                log_event(
                    logging.INFO,
                    f"{self.event}_summary",
                    **fields,
                    count=unlogged,
                    seconds=self.window,
                )
