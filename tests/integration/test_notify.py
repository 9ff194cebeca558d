"""systemd ``Type=notify`` from a real ``python -m pgguard run``: the datagrams it sends to a real
AF_UNIX datagram socket named by ``$NOTIFY_SOCKET`` (the service manager's side is played by
the test, since no systemd runs here), around start, SIGHUP, the watchdog and SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
from console_client import write_config

from pgguard import notify
from pgguard.testing.cluster import PostgresCluster, free_port
from pgguard.testing.notify import NotifySocket, notify_socket


@pytest.fixture(params=["path", "abstract"])
async def manager(request: pytest.FixtureRequest) -> AsyncIterator[NotifySocket]:
    """systemd's end: a filesystem path, or a name in the abstract namespace (``@``)."""
    async with notify_socket(abstract=request.param == "abstract") as ns:
        yield ns


@asynccontextmanager
async def notified_pgguard(
    tmp_path: Path, pg: PostgresCluster, address: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, Path, list[str]]]:
    port = free_port()
    path = write_config(tmp_path / "pgguard.toml", pg, "[roles.app]\nmax_connections = 1\n")
    path.write_text(path.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgguard", "run", "-c", str(path),
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "NOTIFY_SOCKET": address, **(env or {})},
    )  # fmt: skip
    log: list[str] = []

    async def read_log() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            log.append(line.decode().rstrip())

    reader = asyncio.create_task(read_log())
    try:
        yield proc, port, path, log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.wait_for(reader, 10)
        assert "Traceback" not in "\n".join(log), "\n".join(log)


async def test_ready_reloading_status_stopping_from_pgguard_run(tmp_path, pg, manager) -> None:
    address = manager.address
    if True:
        async with notified_pgguard(tmp_path, pg, address) as (proc, port, path, log):
            ready = await manager.wait_for("READY", "1")
            # READY=1 comes once pgguard listens: a client gets through right away.
            held = await asyncpg.connect(f"postgresql://app@127.0.0.1:{port}/postgres", timeout=20)
            queued = asyncio.create_task(asyncpg.connect(f"postgresql://app@127.0.0.1:{port}/postgres"))
            await manager.wait_for("STATUS", "sessions=1 waiting=1")

            before = notify.monotonic_usec()
            proc.send_signal(signal.SIGHUP)
            reloading = await manager.wait_for("RELOADING", "1", after=ready)
            assert int(manager.messages[reloading]["MONOTONIC_USEC"]) >= before
            assert int(manager.messages[reloading]["MONOTONIC_USEC"]) <= notify.monotonic_usec()
            await manager.wait_for("READY", "1", after=reloading)

            proc.send_signal(signal.SIGTERM)
            await manager.wait_for("STOPPING", "1", after=reloading)
            with pytest.raises(asyncpg.CannotConnectNowError):
                await asyncio.wait_for(queued, 20)
            await held.close()
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            # Nothing but these keys, and no watchdog without WATCHDOG_USEC.
            keys = {k for m in manager.messages for k in m}
            assert keys <= {"READY", "RELOADING", "MONOTONIC_USEC", "STOPPING", "STATUS"}, manager.messages


async def test_watchdog_pings_at_half_watchdog_usec(tmp_path, pg, manager) -> None:
    address = manager.address
    if True:
        env = {"WATCHDOG_USEC": "400000"}  # pings every 0.2 s
        async with notified_pgguard(tmp_path, pg, address, env) as (proc, _, _, _):
            await manager.wait_for("READY", "1")
            first = await manager.wait_for("WATCHDOG", "1")
            started = time.monotonic()
            await manager.wait_for("WATCHDOG", "1", after=first)
            await manager.wait_for("WATCHDOG", "1", after=manager.index("WATCHDOG", "1", after=first))
            assert time.monotonic() - started < 20  # periodic, not once
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_watchdog_pid_of_another_process_means_no_pings(tmp_path, pg, manager) -> None:
    address = manager.address
    if True:
        env = {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}  # meant for another process
        async with notified_pgguard(tmp_path, pg, address, env) as (proc, port, _, _):
            await manager.wait_for("READY", "1")
            # a round trip through pgguard's loop (which would have pinged by now: 0.1 s)
            for _ in range(3):
                conn = await asyncpg.connect(f"postgresql://app@127.0.0.1:{port}/postgres", timeout=20)
                await conn.close()
            proc.send_signal(signal.SIGTERM)
            await manager.wait_for("STOPPING", "1")
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            assert manager.index("WATCHDOG") == -1, manager.messages


def test_notifier_without_socket_is_a_no_op() -> None:
    n = notify.from_env({})
    assert not n.enabled and n.watchdog is None
    assert n.send("READY=1")
    assert notify.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000"}).watchdog == 0.5
    assert notify.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, pid=2).watchdog is None


def test_notifier_to_a_vanished_socket_logs_once_and_goes_on(caplog) -> None:
    n = notify.from_env({"NOTIFY_SOCKET": f"/tmp/pgguard-none-{uuid.uuid4().hex}"})
    assert not n.send("READY=1") and not n.send("READY=1")
    assert len(re.findall("event=notify_failed", caplog.text)) == 1
