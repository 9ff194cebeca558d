"""The one structured logger: ``event=name key=value`` lines, client-supplied text escaped.

Every value is data, never format: a user or database name comes from whoever reached the
port, so it may hold newlines (which would forge log lines), quotes, control characters or
bytes that are not UTF-8 (``wire`` keeps them as surrogate escapes). ``display`` turns any
such text into one printable line that still tells distinct names apart; ``log_event`` quotes
it logfmt-style where needed. The same ``display`` is what SHOW CLIENTS and ``/metrics`` show.
"""

from __future__ import annotations

import logging
import re
from typing import Final

__all__ = ["log", "log_event", "display", "logfmt_value", "RateLimitedLog"]

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
    """One structured key=value log line per event that matters."""
    if log.isEnabledFor(level):
        parts = [f"event={event}"]
        parts += [f"{key}={logfmt_value(value)}" for key, value in fields.items()]
        log.log(level, " ".join(parts))


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
