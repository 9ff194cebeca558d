"""``[server] workers = 2``: a real ``python -m pgguard run`` supervisor and its two worker
processes behind one port (SO_REUSEPORT), sharing limits through a real redis-server, in
front of a real PostgreSQL, driven by asyncpg and the one console / one ``/metrics``."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from procs import PgguardProcess

from pgguard.testing.cluster import PostgresCluster, free_port
from pgguard.testing.notify import notify_socket
from pgguard.testing.wait import await_until
from pgguard.workers import WORKER_METRIC_NAMES, merge_exposition

ROLE_LIMIT = 4
WORKERS = 2


@dataclass
class Supervisor(PgguardProcess):
    """The supervisor of a workers-mode pgguard (its console is the workers')."""

    metrics_port: int
    config: Path

    def worker_pids(self) -> dict[int, int]:
        """The pid of each worker, as the supervisor last logged it started."""
        pids = {}
        for m in re.finditer(r"event=worker_started worker=(\d+) pid=(\d+)", self.log_text):
            pids[int(m[1])] = int(m[2])
        return pids

    async def restarted(self, index: int, dead_pid: int) -> None:
        """Wait until worker ``index`` (pid ``dead_pid`` before) runs again and every worker serves."""
        await await_until(
            lambda: self.worker_pids().get(index, dead_pid) != dead_pid, timeout=30,
            what=f"worker {index} to be restarted",
        )
        await await_until(
            lambda: asyncio.to_thread(lambda: _get(f"http://127.0.0.1:{self.metrics_port}/healthz")[0] == 200),
            timeout=30,
            what="every worker to serve again",
        )

    async def http(self, path: str) -> tuple[int, str]:
        return await asyncio.to_thread(_get, f"http://127.0.0.1:{self.metrics_port}{path}")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _get_openmetrics(url: str) -> str:
    accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
    with urllib.request.urlopen(urllib.request.Request(url, headers=accept), timeout=20) as response:
        return response.read().decode()


def _write_config(
    path: Path, pg: PostgresCluster, redis_url: str | None, port: int, metrics_port: int, body: str, backend: str = "",
    close_timeout: float = 5.0,
) -> None:
    """``redis_url`` None: no [cluster] (the supervisor's Gate holds the limits)."""
    cluster = "" if redis_url is None else f"""
[cluster]
redis = "{redis_url}"
instance = "w"
prefix = "t{uuid.uuid4().hex[:8]}"
lease_ttl = 2.0
timeout = 3.0
"""
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
workers = {WORKERS}
shutdown_timeout = 10.0

[backend]
host = "127.0.0.1"
port = {pg.port}
close_timeout = {close_timeout}
{backend}

[admin]
users = ["admin"]
auth = "trust"

[metrics]
listen = "127.0.0.1:{metrics_port}"
{cluster}
{body}
"""
    )


@asynccontextmanager
async def supervisor(
    tmp_path: Path, pg: PostgresCluster, redis_url: str | None, body: str, *, port: int | None = None,
    backend: str = "", env: dict[str, str] | None = None, close_timeout: float = 5.0,
) -> AsyncIterator[Supervisor]:
    """The supervisor of WORKERS workers, once it logged that all serve; ``port`` 0 lets
    the supervisor pick it (then ``Supervisor.port`` is read from its log)."""
    port, metrics_port = free_port() if port is None else port, free_port()
    path = tmp_path / "workers.toml"
    _write_config(path, pg, redis_url, port, metrics_port, body, backend, close_timeout)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgguard", "run", "-c", str(path), "--log-level", os.environ.get("PGGUARD_TEST_LOG", "info"),
        stderr=asyncio.subprocess.PIPE, env=None if env is None else {**os.environ, **env},
    )  # fmt: skip
    sup = Supervisor(proc, port, metrics_port, path)

    async def read_log() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            sup.log.append(line.decode().rstrip())

    reader = asyncio.create_task(read_log())
    try:
        await await_until(
            lambda: "event=workers_started" in sup.log_text or proc.returncode is not None,
            timeout=40,
            what="the supervisor to start its workers",
        )
        assert proc.returncode is None, sup.log_text
        if port == 0:
            m = re.search(r"event=workers_started workers=\d+ listen=127.0.0.1:(\d+)", sup.log_text)
            assert m is not None, sup.log_text
            sup.port = int(m[1])
        yield sup
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await asyncio.wait_for(reader, 10)
        for pid in sup.worker_pids().values():  # no worker outlives its supervisor
            await await_until(lambda pid=pid: not _alive(pid), timeout=10, what=f"worker {pid} to exit")
        print(sup.log_text)
        for bad in ("Traceback", "Task was destroyed", "never awaited"):
            assert bad not in sup.log_text, sup.log_text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _app_sessions(pg: PostgresCluster) -> int:
    conn = await asyncpg.connect(pg.dsn())
    try:
        n: int = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'")
        return n
    finally:
        await conn.close()


async def _peak_app_sessions(pg: PostgresCluster, stop: asyncio.Event) -> int:
    peak = 0
    conn = await asyncpg.connect(pg.dsn())
    try:
        while not stop.is_set():
            n = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'")
            peak = max(peak, n)
    finally:
        await conn.close()
    return peak


async def _connect_and_close(dsn: str) -> None:
    conn = await asyncpg.connect(dsn, ssl=False, timeout=60)
    await conn.close()


async def _client(dsn: str, results: list[str]) -> None:
    try:
        conn = await asyncpg.connect(dsn, timeout=60, ssl=False)
    except asyncpg.TooManyConnectionsError:
        results.append("53300")
        return
    try:
        await conn.execute("SELECT pg_sleep(0.02)")
        results.append("served")
    finally:
        await conn.close()


QUEUE_BODY = f"""
[roles.app]
max_connections = {ROLE_LIMIT}
queue_timeout = 60.0
"""


async def test_two_workers_behind_one_port_hold_the_role_limit(tmp_path, pg, redis_server) -> None:
    async with supervisor(tmp_path, pg, redis_server.url, QUEUE_BODY) as sup:
        # Clients land on both workers: 16 connections (4 live, 12 queued) all on one worker
        # would happen once in 2**15 runs.
        held = [await asyncpg.connect(sup.dsn(), ssl=False) for _ in range(ROLE_LIMIT)]
        queued = [asyncio.create_task(_connect_and_close(sup.dsn())) for _ in range(12)]

        async def listed() -> bool:
            rows = await sup.show("CLIENTS")
            return sum(1 for r in rows if r["role"] == "app") == 16

        await await_until(listed, timeout=30, what="SHOW CLIENTS to list the 16 clients")
        rows = await sup.show("CLIENTS")
        assert {r["worker"] for r in rows if r["role"] == "app"} == {"0", "1"}, rows
        assert len({r["id"] for r in rows}) == len(rows)  # client ids are unique across workers
        limits = [r for r in await sup.show("LIMITS") if r["name"] == "app"]
        assert sorted(r["worker"] for r in limits) == ["0", "1"]
        # (a client waiting for the store keeps its local slot, so "active" sums may exceed it)
        assert await _app_sessions(pg) == ROLE_LIMIT

        # Each worker's clients of app are in its samples, as active sessions or as waiting (a
        # worker may hold none of the 4 slots: its clients then all wait for the store), and the
        # active ones add up to the 4 slots (once every admission in flight has its answer).
        async def scraped() -> bool:
            status, text = await sup.http("/metrics")
            assert status == 200
            active = re.findall(r'pgguard_sessions_active\{database="postgres",role="app",worker="[01]"\} (\S+)', text)
            seen = [
                re.search(rf'pgguard_(sessions_active|clients_waiting)\{{database="postgres",role="app",worker="{w}"\}}', text)
                for w in ("0", "1")
            ]
            return all(seen) and sum(float(n) for n in active) == ROLE_LIMIT

        await await_until(scraped, timeout=30, what="/metrics to show both workers' clients and the 4 slots")
        status, text = await sup.http("/metrics")
        assert text.count("# TYPE pgguard_sessions_active gauge") == 1
        assert "pgguard_workers 2.0" in text and "pgguard_workers_alive 2.0" in text
        for name in WORKER_METRIC_NAMES:
            assert f"# TYPE {name} " in text, name
        openmetrics = await asyncio.to_thread(_get_openmetrics, f"http://127.0.0.1:{sup.metrics_port}/metrics")
        assert openmetrics.rstrip().endswith("# EOF") and 'worker="1"' in openmetrics
        assert await sup.http("/healthz") == (200, "ok\n")
        assert await sup.http("/readyz") == (200, "ready\n")

        for conn in held:
            await conn.close()
        await asyncio.gather(*queued)  # each admitted in turn, as a slot frees

        # A CancelRequest lands on either worker, whichever holds the session: both forward it.
        # (asyncpg answers a timeout with a CancelRequest; the 60 s sleep ends only by it, and
        # asyncpg reports either the timeout or the cancellation, depending on which it sees first)
        conn = await asyncpg.connect(sup.dsn(), ssl=False)
        for _ in range(6):
            with pytest.raises((TimeoutError, asyncpg.QueryCanceledError)):
                await conn.fetchval("SELECT pg_sleep(60)", timeout=0.2)
            assert await conn.fetchval("SELECT 1") == 1
        await conn.close()

        # A storm over the one port: the server never sees more than the limit.
        stop = asyncio.Event()
        sampling = asyncio.create_task(_peak_app_sessions(pg, stop))
        results: list[str] = []
        started = time.monotonic()
        await asyncio.gather(*(_client(sup.dsn(), results) for _ in range(120)))
        elapsed = time.monotonic() - started
        stop.set()
        peak = await sampling
        print(f"storm: 120 clients over {WORKERS} workers in {elapsed:.1f}s, peak {peak}")
        assert results.count("served") == 120
        assert peak <= ROLE_LIMIT
        stats = await sup.show("STATS")
        admitted = {r["worker"]: int(r["value"]) for r in stats if r["stat"] == "admissions"}
        print(f"admissions per worker: {admitted}")
        assert sum(admitted.values()) == 16 + 1 + 120, admitted


async def test_console_set_limit_reload_and_kill_reach_every_worker(tmp_path, pg, redis_server) -> None:
    body = f'[roles.app]\nmax_connections = {ROLE_LIMIT}\npolicy = "reject"\n'
    async with supervisor(tmp_path, pg, redis_server.url, body) as sup:
        console = await sup.console()
        try:
            await console.execute("SET LIMIT ROLE app = 2")
            rows = [dict(r) for r in await console.fetch("SHOW LIMITS")]
            app = {r["worker"]: r["limit"] for r in rows if r["name"] == "app"}
            assert app == {"0": "2", "1": "2"}
            held = [await asyncpg.connect(sup.dsn(), ssl=False) for _ in range(2)]
            with pytest.raises(asyncpg.TooManyConnectionsError):
                await asyncpg.connect(sup.dsn(), ssl=False)

            # KILL CLIENT finds the worker holding the id, whichever the console is on.
            clients = [dict(r) for r in await console.fetch("SHOW CLIENTS") if r["role"] == "app"]
            for row in clients:
                await console.execute(f"KILL CLIENT {row['id']}")
            with pytest.raises(asyncpg.PostgresError, match="no client with id"):
                await console.execute(f"KILL CLIENT {clients[0]['id']}")
            await await_until(
                lambda: all(conn.is_closed() for conn in held), timeout=20, what="the killed sessions to end"
            )

            # SIGHUP: every worker reloads the file (a reload drops SET values too).
            sup.config.write_text(sup.config.read_text().replace(f"max_connections = {ROLE_LIMIT}", "max_connections = 3"))
            sup.proc.send_signal(signal.SIGHUP)

            async def reloaded() -> bool:
                rows = [dict(r) for r in await console.fetch("SHOW LIMITS")]
                return {r["worker"]: r["limit"] for r in rows if r["name"] == "app"} == {"0": "3", "1": "3"}

            await await_until(reloaded, timeout=20, what="both workers to reload the file")
            # The log is read by a thread: the lines may trail the SHOW LIMITS answer.
            await await_until(
                lambda: sup.log_text.count("event=reload ") >= WORKERS, timeout=20, what="both reloads to be logged"
            )
            help_rows = await console.fetch("SHOW HELP")  # answered once, not per worker
            assert len(help_rows) == len({r["command"] for r in help_rows})
        finally:
            await console.close()


async def test_sigkilled_worker_is_restarted_and_sigterm_drains_all(tmp_path, pg, redis_server) -> None:
    async with supervisor(tmp_path, pg, redis_server.url, QUEUE_BODY) as sup:
        victim = sup.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        await await_until(
            lambda: "event=worker_exited worker=0 code=-9" in sup.log_text, timeout=20, what="the death to be logged"
        )
        for _ in range(10):  # the other worker serves the port meanwhile
            conn = await asyncpg.connect(sup.dsn(), ssl=False, timeout=20)
            await conn.close()
        await sup.restarted(0, victim)
        _, text = await sup.http("/metrics")
        assert 'pgguard_worker_restarts_total{worker="0"} 1.0' in text

        # SIGTERM drains every worker: a live session may finish, then everyone exits 0.
        live = await asyncpg.connect(sup.dsn(), ssl=False)
        sup.proc.send_signal(signal.SIGTERM)
        await await_until(
            lambda: sup.log_text.count("event=drain ") >= WORKERS, timeout=20, what="both workers to drain"
        )
        assert await live.fetchval("SELECT 1") == 1  # still served while draining
        await live.close()
        assert await asyncio.wait_for(sup.proc.wait(), 30) == 0
        await await_until(lambda: sup.proc.stderr.at_eof(), timeout=10, what="the log to end")
        assert sup.log_text.count("event=stop clean=True") == WORKERS + 1  # each worker, then the supervisor
        assert "level=INFO event=stop clean=True" in sup.log_text


async def test_restarted_worker_copies_pause_policies_and_faults_from_a_live_one(tmp_path, pg, redis_server) -> None:
    body = f"[roles.app]\nmax_connections = {ROLE_LIMIT}\n[faults]\nrules = [\"DELAY 0.01 ROLE nobody\"]\n"
    async with supervisor(tmp_path, pg, redis_server.url, body) as sup:
        console = await sup.console()
        try:
            for statement in (
                "PAUSE",
                "SET POLICY ROLE app = reject",
                "INJECT REJECT NEXT 5 ROLE other SQLSTATE 08004",
                "INJECT DROP ROLE gone",
                "CLEAR FAULT 3",  # ids go on from 4 on every worker, restarted or not
                "INJECT TERMINATE ROLE app AFTER 600",  # an action on the sessions of the moment: not copied
            ):
                await console.execute(statement)
        finally:
            await console.close()

        async def state() -> dict[str, object]:
            stats = await sup.show("STATS")
            limits = await sup.show("LIMITS")
            faults = await sup.show("FAULTS")
            return {
                w: (
                    [r["value"] for r in stats if r["stat"] == "paused" and r["worker"] == w],
                    [r["policy"] for r in limits if r["name"] == "app" and r["worker"] == w],
                    sorted((r["id"], r["rule"], r["source"]) for r in faults if r["worker"] == w and r["kind"] != "terminate"),
                )
                for w in ("0", "1")
            }

        before = await state()
        assert before["0"] == before["1"]
        assert before["0"][:2] == (["yes"], ["reject"])
        assert [rule[0] for rule in before["0"][2]] == ["1", "2"]  # the config rule, the REJECT

        victim = sup.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        await sup.restarted(0, victim)
        assert await state() == before
        assert "event=runtime_state_restored paused=True policies=1 faults=2" in sup.log_text

        # The copy goes on from the same ids: a rule injected now has one id everywhere.
        console = await sup.console()
        try:
            rows = [dict(r) for r in await console.fetch("INJECT DELAY 0.01 ROLE late")]
            assert {r["worker"]: r["id"] for r in rows} == {"0": "5", "1": "5"}
        finally:
            await console.close()


async def test_second_signal_stops_every_worker_at_once(tmp_path, pg, redis_server) -> None:
    async with supervisor(tmp_path, pg, redis_server.url, QUEUE_BODY) as sup:
        live = await asyncpg.connect(sup.dsn(), ssl=False)
        sup.proc.send_signal(signal.SIGTERM)
        await await_until(
            lambda: sup.log_text.count("event=drain ") >= WORKERS, timeout=20, what="both workers to drain"
        )
        sup.proc.send_signal(signal.SIGTERM)  # the session is still live: stop without waiting
        assert await asyncio.wait_for(sup.proc.wait(), 30) == 1
        await await_until(live.is_closed, timeout=20, what="the live session to be closed")
        await await_until(lambda: sup.proc.stderr.at_eof(), timeout=10, what="the log to end")
        assert "level=INFO event=signal name=SIGTERM action=stop" in sup.log_text  # the supervisor's
        assert "level=INFO event=stop clean=False" in sup.log_text


async def test_workers_of_a_sigkilled_supervisor_drain_and_exit(tmp_path, pg, redis_server) -> None:
    async with supervisor(tmp_path, pg, redis_server.url, QUEUE_BODY) as sup:
        pids = sup.worker_pids()
        sup.proc.send_signal(signal.SIGKILL)
        await sup.proc.wait()
        for pid in pids.values():
            await await_until(lambda pid=pid: not _alive(pid), timeout=20, what=f"worker {pid} to exit")
        await await_until(lambda: sup.proc.stderr.at_eof(), timeout=10, what="the log to end")
        assert sup.log_text.count("event=stop_requested reason=supervisor_gone action=drain") == WORKERS


async def test_port_0_is_picked_once_and_shared_by_every_worker(tmp_path, pg, redis_server) -> None:
    async with supervisor(tmp_path, pg, redis_server.url, QUEUE_BODY, port=0) as sup:
        assert sup.port != 0
        listens = re.findall(r"worker=\d+ event=start listen=(\S+)", sup.log_text)
        assert listens == [f"127.0.0.1:{sup.port}"] * WORKERS
        conns = [await asyncpg.connect(sup.dsn(), ssl=False) for _ in range(3)]
        for conn in conns:
            await conn.close()


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgguard", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_workers_count_is_validated(tmp_path) -> None:
    path = tmp_path / "w.toml"
    path.write_text("[server]\nworkers = 2\n")  # no [cluster]: the supervisor's Gate (host.py)
    done = _run_cli("check-config", str(path))
    assert done.returncode == 0 and "2 workers" in done.stdout, done.stderr
    path.write_text('[server]\nworkers = 65\n[cluster]\nredis = "redis://127.0.0.1:1/0"\n')
    done = _run_cli("check-config", str(path))
    assert done.returncode == 2 and "server.workers" in done.stderr


def test_taken_port_is_a_clean_error_before_any_worker_starts(tmp_path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        path = tmp_path / "w.toml"
        port = taken.getsockname()[1]
        path.write_text(
            f'[server]\nlisten = "127.0.0.1:{port}"\nworkers = 2\n[cluster]\nredis = "redis://127.0.0.1:1/0"\n'
        )
        done = _run_cli("run", "-c", str(path))
        assert done.returncode == 1
        assert "cannot start" in done.stderr and "Traceback" not in done.stderr
        assert "worker_started" not in done.stderr
    finally:
        taken.close()


def test_merged_exposition_labels_every_sample_with_its_worker() -> None:
    text = (
        "# HELP pgguard_admissions_total Clients admitted.\n"
        "# TYPE pgguard_admissions_total counter\n"
        "pgguard_admissions_total 3.0\n"
        "# HELP pgguard_clients_waiting Clients queued.\n"
        "# TYPE pgguard_clients_waiting gauge\n"
        'pgguard_clients_waiting{database="db",role="app"} 2.0\n'
    )
    families = merge_exposition([(0, text), (1, text.replace("3.0", "5.0"))])
    assert [f.name for f in families] == ["pgguard_admissions", "pgguard_clients_waiting"]
    admissions = families[0].samples
    assert [(s.labels, s.value) for s in admissions] == [({"worker": "0"}, 3.0), ({"worker": "1"}, 5.0)]
    assert families[1].samples[1].labels == {"database": "db", "role": "app", "worker": "1"}


POOL_ROLE = "wpool_user"
POOL_PASSWORD = "wpool-pass"
async def test_cancel_of_a_reused_session_reaches_it_through_either_worker(tmp_path, pg, redis_server) -> None:
    """[pool] gives a reused session's client the server's process id with a secret pgguard
    minted, which no server knows: a CancelRequest that lands on the other worker goes through
    the supervisor to the worker holding the session (routed by the whole key). Each cancel comes on a new connection, so the kernel spreads them
    over both workers (6 of 6 must work; without the routing about half fail)."""
    pg.create_role(POOL_ROLE, password=POOL_PASSWORD)
    pg.create_auth_lookup()
    body = "[pool]\nreuse = true\n"
    async with supervisor(tmp_path, pg, redis_server.url, body, backend=f'monitor_dsn = "{pg.dsn()}"') as sup:
        dsn = f"postgresql://{POOL_ROLE}:{POOL_PASSWORD}@127.0.0.1:{sup.port}/postgres"
        # Connect until a client gets a server process an earlier client had (the kernel picks
        # the worker, and each worker has its own warm sessions).
        seen: set[int] = set()
        for _ in range(30):
            conn = await asyncpg.connect(dsn, ssl=False, timeout=20)
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            if pid in seen:
                break
            seen.add(pid)
            await conn.close()
        else:
            pytest.fail("no client got a reused server session in 30 tries")
        try:
            for _ in range(6):
                with pytest.raises((TimeoutError, asyncpg.QueryCanceledError)):
                    await conn.fetchval("SELECT pg_sleep(60)", timeout=0.2)
                assert await conn.fetchval("SELECT 1", timeout=15) == 1  # the sleep was cancelled, not waited out
        finally:
            await conn.close()
        pools = await sup.show("POOLS")
        assert sum(int(r["reused"]) for r in pools) >= 1, pools


async def test_supervisor_notifies_systemd_once_every_worker_serves(tmp_path, pg, redis_server) -> None:
    """Type=notify with workers: READY=1 from the supervisor once both workers serve (never
    from a worker), RELOADING/READY around SIGHUP once every worker reloaded, STATUS summed
    over the workers, STOPPING on SIGTERM; a real datagram socket plays systemd."""
    body = f'[roles.app]\nmax_connections = {ROLE_LIMIT}\n'
    async with notify_socket() as manager:
        async with supervisor(tmp_path, pg, redis_server.url, body, env={"NOTIFY_SOCKET": manager.address}) as sup:
            ready = await manager.wait_for("READY", "1")
            held = [await asyncpg.connect(sup.dsn(), ssl=False) for _ in range(2)]
            await manager.wait_for("STATUS", f"sessions=2 waiting=0 workers={WORKERS}/{WORKERS}")
            sup.config.write_text(sup.config.read_text().replace(f"max_connections = {ROLE_LIMIT}", "max_connections = 3"))
            sup.proc.send_signal(signal.SIGHUP)
            reloading = await manager.wait_for("RELOADING", "1", after=ready)
            assert "MONOTONIC_USEC" in manager.messages[reloading]
            await manager.wait_for("READY", "1", after=reloading)
            # READY after the reload means every worker has the new file already.
            app = {r["worker"]: r["limit"] for r in await sup.show("LIMITS") if r["name"] == "app"}
            assert app == {"0": "3", "1": "3"}
            for conn in held:
                await conn.close()
            sup.proc.send_signal(signal.SIGTERM)
            await manager.wait_for("STOPPING", "1", after=reloading)
            assert await asyncio.wait_for(sup.proc.wait(), 30) == 0
        # only the supervisor spoke: exactly one READY per (start, reload)
        assert sum(1 for m in manager.messages if m.get("READY") == "1") == 2, manager.messages
