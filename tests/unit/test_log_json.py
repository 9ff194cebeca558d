"""``[log] format = "json"``: one JSON object per line, client text escaped by the JSON encoder."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgguard import config as config_mod
from pgguard.cli import setup_logging
from pgguard.errors import ConfigError
from pgguard.log import JSONFormatter, RateLimitedLog, log, log_event

# Quotes, a newline that would forge a line, control characters, a backslash, a byte that was
# not UTF-8 (wire decodes it to a lone surrogate), a character outside the BMP.
HOSTILE = 'a"b\nevent=forged level=ERROR\r\x00\x1b\\' + b"\xff\xfe".decode("utf-8", "surrogateescape") + "\U0001f600"


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The pgguard logger writing JSON into a buffer (restored afterwards)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JSONFormatter())
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        yield out
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate


def _records(out: io.StringIO) -> list[dict[str, object]]:
    lines = out.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_hostile_name_round_trips_through_json_loads(json_lines: io.StringIO) -> None:
    log_event(logging.WARNING, "reject", role=HOSTILE, database="db", count=3, seconds=1.5, clean=True)
    text = json_lines.getvalue()
    assert text.count("\n") == 1  # one record, one line, whatever the name holds
    text.encode("ascii")  # nothing raw: control characters and surrogates are \u escapes
    (record,) = _records(json_lines)
    assert record["role"] == HOSTILE
    assert record["level"] == "WARNING" and record["event"] == "reject"
    assert record["count"] == 3 and record["seconds"] == 1.5 and record["clean"] is True
    assert list(record)[:3] == ["ts", "level", "event"]
    assert str(record["ts"]).endswith("Z") and "T" in str(record["ts"])


@given(st.binary(max_size=100))
def test_any_client_bytes_come_back_exactly(raw: bytes) -> None:
    name = raw.decode("utf-8", "surrogateescape")
    record = logging.LogRecord("pgguard", logging.INFO, __file__, 1, "event=x", None, None)
    record.pgguard_event = "x"
    record.pgguard_fields = {"user": name}
    line = JSONFormatter().format(record)
    assert "\n" not in line
    assert json.loads(line)["user"] == name


def test_same_fields_as_the_text_line(json_lines: io.StringIO) -> None:
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    log.addHandler(handler)
    try:
        log_event(logging.INFO, "start", listen="127.0.0.1:6432", backend="127.0.0.1:5432", max_client_connections=10)
    finally:
        log.removeHandler(handler)
    (record,) = _records(json_lines)
    text = seen[-1].getMessage()
    assert text == "event=start listen=127.0.0.1:6432 backend=127.0.0.1:5432 max_client_connections=10"
    pairs = dict(part.split("=", 1) for part in text.split())
    assert {k: str(v) for k, v in record.items() if k not in ("ts", "level")} == pairs


def test_long_values_are_cut_and_reserved_names_kept_apart(json_lines: io.StringIO) -> None:
    log_event(logging.INFO, "x", user="u" * 1000, message="mine", ts="also mine")
    (record,) = _records(json_lines)
    assert record["user"] == "u" * 256 + "..."
    assert record["field_message"] == "mine" and record["field_ts"] == "also mine" and record["ts"] != "also mine"


@pytest.mark.log_errors("event=internal_error")
def test_plain_records_and_tracebacks_are_json_too(json_lines: io.StringIO) -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        log.exception("event=internal_error client=%r", HOSTILE)
    log.warning("free text %s", "here")
    first, second = _records(json_lines)
    assert first["event"] == "internal_error" and first["message"] == f"client={HOSTILE!r}"
    assert "RuntimeError: boom" in str(first["traceback"])
    assert second["event"] == "log" and second["message"] == "free text here"


def test_rate_limited_summaries_are_json(json_lines: io.StringIO) -> None:
    rl = RateLimitedLog("reject", 1.0)
    for _ in range(3):
        rl.event_now((HOSTILE, "limit"))
    rl.flush(("role", "reason"))
    (record,) = _records(json_lines)
    assert record == {**record, "event": "reject_summary", "role": HOSTILE, "reason": "limit", "count": 2}


def test_setup_logging_json_for_a_worker_adds_its_index(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("info", worker=3, format="json")
        log_event(logging.INFO, "hello", user=HOSTILE)
        line = capsys.readouterr().err.strip().splitlines()[-1]
        record = json.loads(line)
        assert record["worker"] == 3 and record["event"] == "hello" and record["user"] == HOSTILE
    finally:
        root.handlers[:], _ = saved[0], None
        root.setLevel(saved[1])


def test_log_format_key_default_env_and_validation() -> None:
    from pgguard.console import config_rows

    assert config_mod.loads("").log.format == "text"
    assert ("log.format", "json") in config_rows(config_mod.loads('[log]\nformat = "json"\n'))  # SHOW CONFIG
    assert config_mod.loads('[log]\nformat = "json"\n').log.format == "json"
    assert config_mod.loads("", env={"PGGUARD_LOG__FORMAT": "json"}).log.format == "json"
    with pytest.raises(ConfigError, match=r"log\.format.*must be one of text, json"):
        config_mod.loads('[log]\nformat = "xml"\n')
