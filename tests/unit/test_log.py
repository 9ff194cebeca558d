"""The structured logger: client text is data (escaped, one line, valid UTF-8), floods summed up."""

from __future__ import annotations

import logging

from hypothesis import given
from hypothesis import strategies as st

from pgguard.log import RateLimitedLog, display, log_event, logfmt_value


def test_display_escapes_controls_backslashes_and_undecodable_bytes() -> None:
    raw = b"a\nb\\c\x00\x1b\xff".decode("utf-8", "surrogateescape")
    assert display(raw) == "a\\nb\\\\c\\x00\\x1b\\xff"
    assert display("plain name") == "plain name"
    assert display("x" * 300).endswith("...") and len(display("x" * 300)) == 259


@given(st.binary(max_size=200))
def test_any_name_is_one_printable_utf8_line(raw: bytes) -> None:
    text = logfmt_value(raw.decode("utf-8", "surrogateescape"))
    text.encode("utf-8")  # no surrogates left
    assert "\n" not in text and "\r" not in text
    assert all(c == " " or c.isprintable() for c in text)


@given(st.binary(max_size=50), st.binary(max_size=50))
def test_distinct_names_stay_distinct(a: bytes, b: bytes) -> None:
    da = display(a.decode("utf-8", "surrogateescape"))
    db = display(b.decode("utf-8", "surrogateescape"))
    assert (da == db) == (a == b)


def test_log_event_quotes_values_logfmt_style(caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="pgguard")
    log_event(logging.INFO, "reject", role='a b"c', database="", client="1.2.3.4:5")
    assert caplog.records[-1].getMessage() == (
        'event=reject role="a b\\"c" database="" client=1.2.3.4:5'
    )


def test_rate_limited_log_counts_a_flood_and_bounds_its_keys(caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="pgguard")
    limiter = RateLimitedLog("reject", 1.0, max_keys=3, overflow=("other",))
    firsts = [limiter.event_now((f"k{i % 5}",)) for i in range(50)]
    assert firsts.count(True) == 4  # k0, k1, k2, then every other key under "other"
    limiter.flush(("role",))
    summaries = [r.getMessage() for r in caplog.records]
    assert "event=reject_summary role=other count=19 seconds=1.0" in summaries
    assert not limiter.pending
