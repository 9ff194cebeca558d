"""Signals on a real ``pgguard run`` process: SIGHUP reloads, SIGTERM drains, a second one stops."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psycopg
import pytest
from console_client import admin_connect, by, fetch, write_config

from pgguard.testing.cluster import PostgresCluster, free_port
from pgguard.testing.wait import await_until

TRUST_ADMIN = '[admin]\nusers = ["admin"]\nauth = "trust"\n'


@dataclass
class Process:
    proc: asyncio.subprocess.Process
    port: int
    path: Path
    log: list[str] = field(default_factory=list)

    @property
    def log_text(self) -> str:
        return "\n".join(self.log)

    def dsn(self, user: str = "app") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/postgres"

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def exit_code(self, timeout: float = 30.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def stats(self) -> dict[str, str]:
        console = await admin_connect(self.port)
        try:
            return {r["stat"]: r["value"] for r in await fetch(console, "SHOW STATS")}
        finally:
            await console.close()


@asynccontextmanager
async def pgguard_process(
    tmp_path: Path, pg: PostgresCluster, body: str, *, shutdown_timeout: float = 30.0
) -> AsyncIterator[Process]:
    port = free_port()
    path = write_config(
        tmp_path / "pgguard.toml",
        pg,
        TRUST_ADMIN + body,
        server=f"shutdown_timeout = {shutdown_timeout}",
    )
    path.write_text(path.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgguard", "run", "-c", str(path), "--log-level", "info",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    p = Process(proc, port, path)

    async def read_log() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            p.log.append(line.decode().rstrip())

    reader = asyncio.create_task(read_log())
    try:
        await await_until(
            lambda: "event=start" in p.log_text or proc.returncode is not None,
            timeout=30,
            what="pgguard run to log event=start",
        )
        assert proc.returncode is None, p.log_text
        yield p
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.wait_for(reader, 10)


async def test_sigterm_drains_queued_get_57p03_sessions_finish_exit_0(tmp_path, pg) -> None:
    async with pgguard_process(tmp_path, pg, "[roles.app]\nmax_connections = 1\n") as p:
        held = await asyncpg.connect(p.dsn())
        queued = asyncio.create_task(asyncpg.connect(p.dsn()))
        await await_until(
            lambda: _waiting(p), timeout=20, what="the second client to queue at pgguard"
        )
        p.signal(signal.SIGTERM)
        with pytest.raises(asyncpg.CannotConnectNowError, match="the database system is shutting down"):
            await asyncio.wait_for(queued, 20)
        with pytest.raises(OSError):  # no longer accepting
            await asyncpg.connect(p.dsn("other"), timeout=5)
        assert await held.fetchval("SELECT 42") == 42  # the session goes on during the drain
        await held.close()
        assert await p.exit_code() == 0
        assert "event=drain" in p.log_text and "event=stop clean=True" in p.log_text


async def _waiting(p: Process) -> bool:
    return (await p.stats())["clients_waiting"] == "1"


async def test_drain_closes_sessions_at_shutdown_timeout(tmp_path, pg) -> None:
    async with pgguard_process(tmp_path, pg, "", shutdown_timeout=0.5) as p:
        held = await psycopg.AsyncConnection.connect(p.dsn(), autocommit=True)
        p.signal(signal.SIGTERM)
        assert await p.exit_code() == 1  # not a clean drain: a session had to be closed
        assert "event=drain_timeout" in p.log_text
        with pytest.raises(psycopg.errors.AdminShutdown, match="due to administrator command"):
            await held.execute("SELECT 1")
        await held.close()


async def test_second_signal_stops_at_once(tmp_path, pg) -> None:
    async with pgguard_process(tmp_path, pg, "", shutdown_timeout=600) as p:
        held = await asyncpg.connect(p.dsn())
        p.signal(signal.SIGTERM)
        await await_until(lambda: "event=drain" in p.log_text, timeout=20, what="the drain to start")
        p.signal(signal.SIGINT)
        assert await p.exit_code(timeout=20) == 1
        assert "action=stop" in p.log_text
        held.terminate()


async def test_sighup_reloads_and_a_bad_file_keeps_the_old_config(tmp_path, pg) -> None:
    async with pgguard_process(tmp_path, pg, "[roles.app]\nmax_connections = 0\n") as p:
        queued = asyncio.create_task(asyncpg.connect(p.dsn()))
        await await_until(lambda: _waiting(p), timeout=20, what="the client to queue")
        text = p.path.read_text()
        p.path.write_text(text.replace("max_connections = 0", 'max_connections = "x"'))
        p.signal(signal.SIGHUP)
        await await_until(
            lambda: "event=reload_failed" in p.log_text, timeout=20, what="the failed reload's log"
        )
        assert f"file={p.path}" in p.log_text and "key=roles.app.max_connections" in p.log_text
        assert "event=reload_needs_restart" not in p.log_text
        assert (await p.stats())["clients_waiting"] == "1"  # old config still in force
        p.path.write_text(text.replace("max_connections = 0", "max_connections = 1"))
        p.signal(signal.SIGHUP)
        conn = await asyncio.wait_for(queued, 20)  # raising the limit admits the waiter at once
        console = await admin_connect(p.port)
        assert by(await fetch(console, "SHOW LIMITS"), kind="role", name="app")["limit"] == "1"
        await asyncio.gather(conn.close(), console.close())
        p.signal(signal.SIGTERM)
        assert await p.exit_code() == 0
