"""``[server] workers = 2`` without ``[cluster]``: the supervisor's one Gate (host.py) holds the
limits for both workers. A real ``python -m pgguard run`` supervisor and its worker processes
behind one port, a real PostgreSQL, asyncpg clients, the one console; no Redis anywhere."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import asyncpg
import pytest
from test_workers import (
    ROLE_LIMIT,
    WORKERS,
    _alive,
    _app_sessions,
    _client,
    _peak_app_sessions,
    supervisor,
)

from pgguard.testing.cluster import PostgresCluster
from pgguard.testing.wait import await_until

QUEUE = f"""
[roles.app]
max_connections = {ROLE_LIMIT}
queue_timeout = 60.0
"""


def _limits(rows: list[dict[str, str]], name: str = "app") -> dict[str, dict[str, str]]:
    return {r["worker"]: r for r in rows if r["kind"] == "role" and r["name"] == name}


async def _waiting(sup, name: str = "app") -> int:
    return sum(int(r["waiting"]) for r in _limits(await sup.show("LIMITS"), name).values())


async def _connect(sup, name: str | None = None, **kwargs) -> asyncpg.Connection:
    settings = {} if name is None else {"application_name": name}
    return await asyncpg.connect(sup.dsn(), ssl=False, server_settings=settings, **kwargs)


async def _worker_of(sup, name: str) -> str:
    rows = [r for r in await sup.show("CLIENTS") if r["application_name"] == name]
    assert len(rows) == 1, rows
    return rows[0]["worker"]


async def test_storm_through_one_port_holds_the_role_limit_without_redis(tmp_path, pg: PostgresCluster) -> None:
    async with supervisor(tmp_path, pg, None, QUEUE) as sup:
        stop = asyncio.Event()
        sampling = asyncio.create_task(_peak_app_sessions(pg, stop))
        results: list[str] = []
        started = time.monotonic()
        await asyncio.gather(*(_client(sup.dsn(), results) for _ in range(120)))
        elapsed = time.monotonic() - started
        stop.set()
        peak = await sampling
        print(f"storm: 120 clients over {WORKERS} workers, one Gate, in {elapsed:.1f}s, peak {peak}")
        assert results.count("served") == 120
        assert peak <= ROLE_LIMIT
        stats = await sup.show("STATS")
        admitted = {r["worker"]: int(r["value"]) for r in stats if r["stat"] == "admissions"}
        assert sum(admitted.values()) == 120 and all(admitted.values()), admitted  # both workers served

        # While the limit is full, each worker shows its share: together never above it.
        held = [await _connect(sup) for _ in range(ROLE_LIMIT)]
        queued = [asyncio.create_task(_connect_and_close(sup)) for _ in range(6)]
        await await_until(lambda: _waiting_is(sup, 6), timeout=30, what="6 clients to wait")
        limits = _limits(await sup.show("LIMITS"))
        assert sum(int(r["active"]) for r in limits.values()) == ROLE_LIMIT, limits
        assert {r["limit"] for r in limits.values()} == {str(ROLE_LIMIT)}
        assert await _app_sessions(pg) == ROLE_LIMIT
        for conn in held:
            await conn.close()
        await asyncio.gather(*queued)  # each admitted in turn, as a slot frees


async def _connect_and_close(sup, name: str | None = None) -> None:
    conn = await _connect(sup, name, timeout=60)
    await conn.close()


async def _waiting_is(sup, n: int) -> bool:
    return await _waiting(sup) == n


async def test_queued_clients_are_admitted_in_arrival_order_across_workers(tmp_path, pg: PostgresCluster) -> None:
    """Limit 1: clients queue one by one (each once the console shows it waiting) until both
    workers have some; they must then be served in exactly that order."""
    body = "[roles.app]\nmax_connections = 1\nqueue_timeout = 60.0\n"
    async with supervisor(tmp_path, pg, None, body) as sup:
        held = await _connect(sup, "held")
        order: list[int] = []

        async def client(i: int) -> None:
            conn = await _connect(sup, f"c{i}", timeout=60)
            order.append(i)
            await conn.close()

        tasks: list[asyncio.Task[None]] = []
        on: dict[str, int] = {}
        while len(tasks) < 16 and (len(tasks) < 6 or len(on) < WORKERS):
            i = len(tasks)
            tasks.append(asyncio.create_task(client(i)))
            await await_until(lambda n=i + 1: _waiting_is(sup, n), timeout=30, what=f"{i + 1} clients to wait")
            worker = await _worker_of(sup, f"c{i}")
            on[worker] = on.get(worker, 0) + 1
        assert len(on) == WORKERS, f"16 clients all landed on one worker: {on}"
        queues = await sup.show("QUEUES")
        assert sum(int(r["waiting"]) for r in queues) == len(tasks)
        await held.close()
        await asyncio.gather(*tasks)
        print(f"waiters per worker: {on}; served in order {order}")
        assert order == list(range(len(tasks)))


@pytest.mark.parametrize("watch", ["pidfd", "monitor_dsn"])
async def test_sigkilled_workers_slots_come_back_when_its_server_sessions_end(
    tmp_path, pg: PostgresCluster, watch: str
) -> None:
    """The victim's sessions run a query when it dies, so their server processes outlive it by
    a few seconds: nobody may take their slots before they end (pg_stat_activity never shows
    more than the limit), and the waiting client gets one right after (close_timeout is 30 s:
    only watching the server processes is that quick). The server is local, so without
    monitor_dsn the supervisor watches the processes (pidfd); with it, pg_stat_activity."""
    limit = 2
    body = f"[roles.app]\nmax_connections = {limit}\nqueue_timeout = 60.0\n"
    backend = f'monitor_dsn = "{pg.dsn()}"' if watch == "monitor_dsn" else ""
    async with supervisor(tmp_path, pg, None, body, close_timeout=30.0, backend=backend) as sup:
        conns = {name: await _connect(sup, name) for name in ("a", "b")}
        victim = await _worker_of(sup, "a")
        doomed = [n for n in conns if await _worker_of(sup, n) == victim]
        pids = [await conns[n].fetchval("SELECT pg_backend_pid()") for n in doomed]
        busy = [asyncio.create_task(conns[n].execute("SELECT pg_sleep(3)")) for n in doomed]

        async def running() -> bool:
            check = await asyncpg.connect(pg.dsn())
            try:
                n = await check.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1) AND query LIKE '%pg_sleep%'", pids
                )
            finally:
                await check.close()
            return n == len(pids)

        await await_until(running, timeout=20, what="the victim's queries to run")
        # Clients queue until one waits on the victim: it dies with it (its socket was the
        # victim's); those on the other worker keep their place.
        queued: list[asyncio.Task[None]] = []
        for i in range(12):
            queued.append(asyncio.create_task(_connect_and_close(sup, f"q{i}")))
            await await_until(lambda n=i + 1: _waiting_is(sup, n), timeout=30, what=f"{i + 1} clients to wait")
            if await _worker_of(sup, f"q{i}") == victim:
                break
        else:
            pytest.fail("12 clients in a row landed on the other worker")
        victim_pid = sup.worker_pids()[int(victim)]
        os.kill(victim_pid, signal.SIGKILL)
        await await_until(
            lambda: f"event=worker_exited worker={victim} code=-9" in sup.log_text, timeout=20,
            what="the death to be logged",
        )  # fmt: skip
        stop = asyncio.Event()
        sampling = asyncio.create_task(_peak_app_sessions(pg, stop))
        waiting = asyncio.create_task(_connect(sup, "c", timeout=60))  # the surviving worker's

        async def gone() -> bool:
            check = await asyncpg.connect(pg.dsn())
            try:
                return not await check.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", pids)
            finally:
                await check.close()

        await await_until(gone, timeout=30, what="the victim's server sessions to end")
        ended = time.monotonic()
        conn = await asyncio.wait_for(waiting, 30)
        delay = time.monotonic() - ended
        stop.set()
        peak = await sampling
        print(f"slots back {delay:.2f}s after the server sessions ended; peak {peak}")
        assert peak <= limit
        assert delay < 10.0  # the 30 s grace did not apply
        assert f"lost_waiters=1 held={len(pids)} watched={len(pids)} by={watch}" in sup.log_text
        _, text = await sup.http("/metrics")
        assert "pgguard_worker_lost_waiters_total 1.0" in text and "pgguard_worker_slots_held 0.0" in text
        outcomes = await asyncio.gather(*queued, return_exceptions=True)
        assert all(o is None for o in outcomes[:-1]), outcomes  # the other worker's: served
        assert isinstance(outcomes[-1], Exception), outcomes  # the victim's: its socket is gone
        for task in busy:
            with pytest.raises((ConnectionError, asyncpg.PostgresConnectionError, OSError, asyncpg.InterfaceError)):
                await task
        await conn.close()
        for c in conns.values():
            c.terminate()
        await sup.restarted(int(victim), victim_pid)
        # The restarted worker takes part in the one limit again.
        held = [await _connect(sup) for _ in range(limit)]
        assert await _app_sessions(pg) == limit
        for c in held:
            await c.close()


async def test_workers_of_a_sigkilled_supervisor_drain_and_exit_without_redis(tmp_path, pg: PostgresCluster) -> None:
    async with supervisor(tmp_path, pg, None, QUEUE) as sup:
        pids = sup.worker_pids()
        live = await _connect(sup)
        sup.proc.send_signal(signal.SIGKILL)
        await sup.proc.wait()
        await await_until(
            lambda: sup.log_text.count("event=stop_requested reason=supervisor_gone action=drain") == WORKERS,
            timeout=20, what="both workers to drain",
        )  # fmt: skip
        assert await live.fetchval("SELECT 1") == 1  # a live session is still served while draining
        await live.close()
        for pid in pids.values():
            await await_until(lambda pid=pid: not _alive(pid), timeout=20, what=f"worker {pid} to exit")


async def test_set_limit_and_reload_change_the_one_shared_limit(tmp_path, pg: PostgresCluster) -> None:
    body = '[roles.app]\nmax_connections = 2\npolicy = "reject"\n'
    async with supervisor(tmp_path, pg, None, body) as sup:

        async def fill(n: int, match: str = 'too many connections for role "app"') -> list[asyncpg.Connection]:
            """``n`` sessions, then six more attempts (they land on both workers) all rejected."""
            held = [await _connect(sup) for _ in range(n)]
            for _ in range(6):
                with pytest.raises(asyncpg.TooManyConnectionsError, match=match):
                    await _connect(sup)
            assert await _app_sessions(pg) == n
            return held

        for conn in await fill(2):
            await conn.close()
        console = await sup.console()
        try:
            await console.execute("SET LIMIT ROLE app = 3")
            for conn in await fill(3):
                await conn.close()
            await console.execute("RESET LIMIT ROLE app")
            for conn in await fill(2):
                await conn.close()
            await console.execute("SET LIMIT TOTAL = 1")
            for conn in await fill(1, "sorry, too many clients already"):
                await conn.close()
            await console.execute("RESET LIMIT TOTAL")
            sup.config.write_text(sup.config.read_text().replace("max_connections = 2", "max_connections = 4"))
            await console.execute("RELOAD")
            assert {r["limit"] for r in _limits(await sup.show("LIMITS")).values()} == {"4"}
            held = await fill(4)
            await console.execute("SET LIMIT ROLE app = 1")  # under the count: nobody new until 3 leave
            for conn in held[:3]:
                await conn.close()
            await held[3].close()
            for conn in await fill(1):
                await conn.close()
            await console.execute("PAUSE")
            await console.execute("SET POLICY ROLE app = queue")
            paused = asyncio.create_task(_connect(sup, timeout=60))
            await await_until(lambda: _waiting_is(sup, 1), timeout=20, what="a client to wait while paused")
            await console.execute("RESUME")
            conn = await asyncio.wait_for(paused, 30)
            await conn.close()
        finally:
            await console.close()


async def test_queue_timeout_and_max_queue_bound_the_one_queue(tmp_path, pg: PostgresCluster) -> None:
    body = "[roles.app]\nmax_connections = 1\nqueue_timeout = 2.0\nmax_queue = 2\n"
    async with supervisor(tmp_path, pg, None, body) as sup:
        held = await _connect(sup)

        async def waits() -> float:
            started = time.monotonic()
            with pytest.raises(asyncpg.TooManyConnectionsError, match='too many connections for role "app"'):
                await _connect(sup, timeout=60)
            return time.monotonic() - started

        waiters = [asyncio.create_task(waits()) for _ in range(2)]
        await await_until(lambda: _waiting_is(sup, 2), timeout=20, what="2 clients to wait")
        for _ in range(6):  # the queue is full, whichever worker a client lands on
            with pytest.raises(asyncpg.TooManyConnectionsError, match='too many connections for role "app"'):
                await _connect(sup)
        waited = await asyncio.gather(*waiters)
        assert all(w >= 1.5 for w in waited), waited  # timed out by queue_timeout, not turned away
        stats = await sup.show("STATS")
        total = {name: sum(int(r["value"]) for r in stats if r["stat"] == name) for name in
                 ("queue_timeouts", "rejections_max_queue")}  # fmt: skip
        assert total == {"queue_timeouts": 2, "rejections_max_queue": 6}, total
        assert await _app_sessions(pg) == 1
        await held.close()


async def test_reused_sessions_hold_their_slots_in_the_one_gate(tmp_path, pg: PostgresCluster) -> None:
    """[pool] without [cluster]: a warm session keeps its slot in the supervisor's Gate, so
    warm and live sessions together never exceed the limit, whichever worker holds them."""
    role, password = "whost_pool", "whost-pass"
    pg.create_role(role, password=password)
    pg.create_auth_lookup()
    body = f"[pool]\nreuse = true\n[roles.{role}]\nmax_connections = 2\nqueue_timeout = 60.0\n"
    async with supervisor(tmp_path, pg, None, body, backend=f'monitor_dsn = "{pg.dsn()}"') as sup:
        dsn = f"postgresql://{role}:{password}@127.0.0.1:{sup.port}/postgres"

        async def sessions() -> int:
            check = await asyncpg.connect(pg.dsn())
            try:
                return await check.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role)
            finally:
                await check.close()

        for _ in range(12):
            conn = await asyncpg.connect(dsn, ssl=False, timeout=30)
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()
            assert await sessions() <= 2
        pools = await sup.show("POOLS")
        assert sum(int(r["reused"]) for r in pools) >= 1, pools
        limits = _limits(await sup.show("LIMITS"), role)
        assert sum(int(r["active"]) for r in limits.values()) <= 2, limits


async def test_a_warm_session_on_one_worker_gives_its_slot_to_a_client_waiting_on_another(
    tmp_path, pg: PostgresCluster
) -> None:
    """Limit 2, a warm session on each worker. h1 holds one (on worker X); a client that then
    lands on X finds no warm session there and the last slot held by Y's idle warm session:
    Y must close it for the client (as one process does for its own waiters), else the client
    waits for its 60 s queue_timeout."""
    role, password = "whost_warm", "whost-pass"
    pg.create_role(role, password=password)
    pg.create_auth_lookup()
    body = f"[pool]\nreuse = true\n[roles.{role}]\nmax_connections = 2\nqueue_timeout = 60.0\n"
    async with supervisor(tmp_path, pg, None, body, backend=f'monitor_dsn = "{pg.dsn()}"') as sup:
        dsn = f"postgresql://{role}:{password}@127.0.0.1:{sup.port}/postgres"

        async def client(name: str) -> asyncpg.Connection:
            return await asyncpg.connect(dsn, ssl=False, timeout=30, server_settings={"application_name": name})

        async def warm_on_both() -> bool:
            pools = await sup.show("POOLS")
            if {r["worker"] for r in pools if int(r["warm"])} == {"0", "1"}:
                return True
            conn = await client("w")
            await conn.close()
            return False

        await await_until(warm_on_both, timeout=60, what="a warm session on each worker")
        h1 = await client("h1")
        x = await _worker_of(sup, "h1")
        for i in range(12):
            started = time.monotonic()
            conn = await client(f"h{i + 2}")  # on X: only through Y's warm slot
            took = time.monotonic() - started
            worker = await _worker_of(sup, f"h{i + 2}")
            await conn.close()
            if worker == x:
                print(f"a client on worker {x} got worker {1 - int(x)}'s warm slot in {took:.2f}s")
                break
        else:
            pytest.fail("12 clients in a row landed on the other worker")
        await h1.close()


async def test_a_warm_session_parked_after_a_client_queued_on_another_worker_gives_its_slot(
    tmp_path, pg: PostgresCluster
) -> None:
    """Limit 1: h1 holds the slot on worker X; a client queues on the other worker Y (its
    ``free`` finds no idle session anywhere); then h1 leaves and its session goes back to X's
    pool, keeping the slot. X hears from the supervisor (``parked``) and closes it, so the
    client on Y gets in at once, not at its 60 s queue_timeout."""
    role, password = "whost_park", "whost-pass"
    pg.create_role(role, password=password)
    pg.create_auth_lookup()
    body = f"[pool]\nreuse = true\n[roles.{role}]\nmax_connections = 1\nqueue_timeout = 60.0\n"
    async with supervisor(tmp_path, pg, None, body, backend=f'monitor_dsn = "{pg.dsn()}"') as sup:
        dsn = f"postgresql://{role}:{password}@127.0.0.1:{sup.port}/postgres"

        async def client(name: str) -> asyncpg.Connection:
            return await asyncpg.connect(dsn, ssl=False, timeout=30, server_settings={"application_name": name})

        async def queued(name: str) -> dict[str, str] | None:
            rows = [r for r in await sup.show("CLIENTS") if r["application_name"] == name]
            return rows[0] if rows and rows[0]["state"] == "queued" else None

        for attempt in range(12):
            h1 = await client(f"h{attempt}")
            x = await _worker_of(sup, f"h{attempt}")
            name = f"w{attempt}"
            waiting = asyncio.create_task(client(name))
            await await_until(lambda name=name: queued(name), timeout=30, what=f"{name} queued")
            row = await queued(name)
            if row is None or row["worker"] == x:
                await h1.close()  # same worker: the local hand-over; try again
                await (await waiting).close()
                continue
            started = time.monotonic()
            await h1.close()
            conn = await asyncio.wait_for(waiting, 30)
            took = time.monotonic() - started
            assert await conn.fetchval("select current_user") == role
            await conn.close()
            assert took < 15, f"the client on the other worker waited {took:.1f} s for the parked slot"
            return
        pytest.fail("12 waiting clients in a row landed on the holder's worker")
