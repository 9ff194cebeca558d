"""Rejection logging under a flood: one full line per (role, database, reason) and window, then a count."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from pgguard import control as control_mod

pytestmark = pytest.mark.asyncio


async def test_reject_flood_logs_one_line_then_a_summary(guard, caplog, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A window longer than the test, however slow the machine: it ends only at close().
    monkeypatch.setattr(control_mod, "REJECT_LOG_WINDOW", 300.0)
    caplog.set_level(logging.INFO, logger="pgguard")
    g = await guard('[roles.app]\nmax_connections = 0\npolicy = "reject"')
    for _ in range(5):
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await asyncpg.connect(g.dsn("app"), timeout=30)
    rejects = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=reject ")]
    assert len(rejects) == 1, rejects
    assert "role=app" in rejects[0] and "reason=limit" in rejects[0]
    assert g.server.stats.rejections["limit"] == 5
    # The window is still open: closing the server ends it and logs what it counted.
    await g.server.close()
    summaries = [r.getMessage() for r in caplog.records if "event=reject_summary" in r.getMessage()]
    assert len(summaries) == 1, summaries
    assert "role=app" in summaries[0] and "count=4" in summaries[0]
    assert "seconds=300.0" in summaries[0]
