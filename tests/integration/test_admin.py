"""The admin console through real clients: psql (simple protocol), asyncpg and psycopg (extended)."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import sys

import asyncpg
import psycopg
import pytest
from console_client import (
    ADMIN_PASSWORD,
    ADMIN_TOML,
    admin_connect,
    by,
    fetch,
    file_server,
    psql,
    psql_rows,
    write_config,
)

from pgguard import scram
from pgguard.testing.wait import await_until


def _non_loopback_ipv4() -> str | None:
    """An address of this host that is not loopback (to reach pgguard from a non-loopback peer)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent; this only picks a source address
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


async def test_verifier_is_the_one_postgresql_stores(pg) -> None:
    stored = pg.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'scram_user'").strip()
    v = scram.parse_verifier(stored)
    assert str(scram.make_verifier("s3cret pass", iterations=v.iterations, salt=v.salt)) == stored


async def test_psql_logs_in_with_scram_and_prints_tables(guard) -> None:
    g = await guard(ADMIN_TOML + "[roles.app]\nmax_connections = 3\n")
    code, out, err = await psql(g.port, "SHOW LIMITS")
    assert code == 0, err
    header = out.splitlines()[0]
    assert [c.strip() for c in header.split("|")] == [
        "kind", "name", "limit", "active", "waiting", "policy", "source",
    ]  # fmt: skip
    assert "(2 rows)" in out
    code, out, err = await psql(g.port, "show limits;", args=("-x",))  # expanded display, \x
    assert code == 0, err
    assert "-[ RECORD 2 ]" in out and "source  | config" in out


async def test_show_help_lists_every_command(guard) -> None:
    g = await guard(ADMIN_TOML)
    rows = await psql_rows(g.port, "SHOW HELP")
    listed = {r["command"] for r in rows}
    for syntax in (
        "SHOW LIMITS", "SHOW CLIENTS", "SHOW QUEUES", "SHOW STATS", "SHOW CONFIG",
        "SET LIMIT ROLE name = n", "SET LIMIT DATABASE name = n", "SET LIMIT TOTAL = n",
        "SET POLICY ROLE name = queue|reject", "RELOAD", "PAUSE", "RESUME", "KILL CLIENT id",
        "RESET LIMIT ROLE name | DATABASE name | TOTAL",
    ):  # fmt: skip
        assert syntax in listed


async def test_wrong_password_gets_28p01(guard) -> None:
    g = await guard(ADMIN_TOML)
    with pytest.raises(asyncpg.InvalidPasswordError, match='password authentication failed for user "admin"'):
        await admin_connect(g.port, password="wrong")
    code, _, err = await psql(g.port, "SHOW STATS", password="wrong")
    assert code == 2 and 'password authentication failed for user "admin"' in err


async def test_non_admin_user_gets_the_same_28p01(guard) -> None:
    """An unknown user runs the same SCRAM exchange and fails at the same point."""
    g = await guard(ADMIN_TOML)
    for user in ("app", "nosuchuser"):
        with pytest.raises(asyncpg.InvalidPasswordError, match=f'failed for user "{user}"'):
            await admin_connect(g.port, user=user, password=ADMIN_PASSWORD)
    assert not g.server.control.consoles and not g.server.clients


async def test_plain_password_is_accepted_with_a_warning(guard, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="pgguard")
    g = await guard('[admin]\nusers = ["admin"]\npassword = "plain pw"\n')
    assert "event=admin_plain_password" in caplog.text
    conn = await admin_connect(g.port, password="plain pw")
    assert by(await fetch(conn, "SHOW CONFIG"), key="admin.password")["value"] == "(plain text)"
    await conn.close()


async def test_trust_admits_loopback_only(guard) -> None:
    g = await guard(
        '[server]\nlisten = ["127.0.0.1:0", "0.0.0.0:0"]\n[admin]\nusers = ["admin"]\nauth = "trust"\n'
    )
    code, out, err = await psql(g.port, "SHOW STATS", password="")
    assert code == 0, err
    with pytest.raises(asyncpg.InvalidPasswordError, match='failed for user "app"'):
        await admin_connect(g.port, user="app")
    other = _non_loopback_ipv4()
    if other is None:
        pytest.skip("no non-loopback address on this host")
    with pytest.raises(asyncpg.InvalidPasswordError, match='failed for user "admin"'):
        await admin_connect(g.server.addresses[1][1], host=other)


async def test_database_pgguard_is_forwarded_when_the_console_is_off(guard) -> None:
    g = await guard()
    with pytest.raises(asyncpg.InvalidCatalogNameError, match='database "pgguard" does not exist'):
        await asyncpg.connect(g.dsn("app", "pgguard"))


async def test_set_limit_admits_waiter_at_once_and_reload_goes_back_to_file(tmp_path, pg) -> None:
    path = write_config(tmp_path / "pgguard.toml", pg, ADMIN_TOML + "[roles.app]\nmax_connections = 1\n")
    async with file_server(path) as server:
        dsn = f"postgresql://app@127.0.0.1:{server.port}/postgres"
        first = await asyncpg.connect(dsn)
        second = asyncio.create_task(asyncpg.connect(dsn))
        await await_until(lambda: server.control.counts().clients_waiting == 1, what="the second client to queue")
        console = await admin_connect(server.port)
        assert await console.execute("SET LIMIT ROLE app = 2") == "SET"
        second_conn = await asyncio.wait_for(second, 20)  # admitted at once, not at a release
        row = by(await fetch(console, "SHOW LIMITS"), kind="role", name="app")
        assert (row["limit"], row["active"], row["source"]) == ("2", "2", "runtime")

        assert await console.execute("RELOAD") == "RELOAD"
        row = by(await fetch(console, "SHOW LIMITS"), kind="role", name="app")
        assert (row["limit"], row["active"], row["source"]) == ("1", "2", "config")
        # Lowering the limit killed nobody.
        assert await first.fetchval("SELECT 1") == 1 and await second_conn.fetchval("SELECT 2") == 2
        await asyncio.gather(first.close(), second_conn.close(), console.close())


async def test_reset_limit_removes_one_runtime_limit(tmp_path, pg) -> None:
    path = write_config(tmp_path / "pgguard.toml", pg, ADMIN_TOML + "[roles.app]\nmax_connections = 0\n")
    async with file_server(path) as server:
        console = await admin_connect(server.port)
        await console.execute("SET LIMIT ROLE app = 5")
        await console.execute("SET LIMIT TOTAL = 9")
        conn = await asyncpg.connect(f"postgresql://app@127.0.0.1:{server.port}/postgres")
        assert await console.execute("RESET LIMIT ROLE app") == "RESET"
        row = by(await fetch(console, "SHOW LIMITS"), kind="role", name="app")
        assert (row["limit"], row["active"], row["source"]) == ("0", "1", "config")  # kills nobody
        assert by(await fetch(console, "SHOW LIMITS"), kind="total")["limit"] == "9"
        assert await console.execute("reset limit total") == "RESET"
        assert by(await fetch(console, "SHOW LIMITS"), kind="total")["source"] == "config"
        assert await conn.fetchval("SELECT 1") == 1
        await asyncio.gather(conn.close(), console.close())


@pytest.mark.log_errors("event=reload_failed")
async def test_bad_file_on_reload_keeps_old_config_and_says_why(tmp_path, pg) -> None:
    path = write_config(tmp_path / "pgguard.toml", pg, ADMIN_TOML + "[roles.app]\nmax_connections = 0\n")
    async with file_server(path) as server:
        console = await admin_connect(server.port)
        waiter = asyncio.create_task(asyncpg.connect(f"postgresql://app@127.0.0.1:{server.port}/postgres"))
        await await_until(lambda: server.control.counts().clients_waiting == 1, what="the client to queue")
        path.write_text(path.read_text().replace("max_connections = 0", "max_connections = \"many\""))
        with pytest.raises(asyncpg.PostgresError, match="roles.app.max_connections") as info:
            await console.execute("RELOAD")
        assert info.value.sqlstate == "F0000" and str(path) in str(info.value)
        assert by(await fetch(console, "SHOW LIMITS"), kind="role", name="app")["limit"] == "0"
        assert by(await fetch(console, "SHOW STATS"), stat="reload_failures")["value"] == "1"
        # A good file raising the limit admits the waiter at once.
        path.write_text(path.read_text().replace("max_connections = \"many\"", "max_connections = 1"))
        await console.execute("RELOAD")
        conn = await asyncio.wait_for(waiter, 20)
        await asyncio.gather(conn.close(), console.close())


async def test_reload_of_listen_addresses_says_a_restart_is_needed(tmp_path, pg, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="pgguard")
    path = write_config(tmp_path / "pgguard.toml", pg, ADMIN_TOML)
    async with file_server(path) as server:
        path.write_text(path.read_text().replace('"127.0.0.1:0"', '"127.0.0.1:1"') + METRICS_ON)
        console = await admin_connect(server.port)
        await console.execute("RELOAD")  # still reached on the old port
        assert "event=reload_needs_restart key=server.listen" in caplog.text
        assert "event=reload_needs_restart key=metrics.listen" in caplog.text
        assert server.metrics is None
        await console.close()


METRICS_ON = '[metrics]\nlisten = "127.0.0.1:0"\n'


async def test_set_commands_change_limits_and_policy(guard) -> None:
    g = await guard(ADMIN_TOML + '[limits]\npolicy = "reject"\n')
    console = await admin_connect(g.port)
    await console.execute("SET LIMIT ROLE app = 0")
    with pytest.raises(asyncpg.TooManyConnectionsError, match='too many connections for role "app"'):
        await asyncpg.connect(g.dsn("app"))
    await console.execute("set limit database LIMDB = 0;")  # case-insensitive, folded name
    with pytest.raises(asyncpg.TooManyConnectionsError, match='for database "limdb"'):
        await asyncpg.connect(g.dsn("other", "limdb"))
    await console.execute("SET LIMIT TOTAL = 0")
    with pytest.raises(asyncpg.TooManyConnectionsError, match="sorry, too many clients already"):
        await asyncpg.connect(g.dsn("other"))
    await console.execute("SET LIMIT TOTAL = -1")
    await console.execute("SET POLICY ROLE app = queue")
    waiter = asyncio.create_task(asyncpg.connect(g.dsn("app")))
    await await_until(lambda: g.server.control.counts().clients_waiting == 1, what="app to queue under policy queue")
    await console.execute('SET LIMIT ROLE "app" = 1')
    conn = await asyncio.wait_for(waiter, 20)
    await console.execute('SET LIMIT ROLE "Mixed Case" = 7')
    assert by(await fetch(console, "SHOW LIMITS"), name="Mixed Case")["limit"] == "7"
    for bad, state in (("SET LIMIT ROLE app = -2", "22023"), ("SET POLICY ROLE app = maybe", "22023")):
        with pytest.raises(asyncpg.PostgresError) as info:
            await console.execute(bad)
        assert info.value.sqlstate == state
    await asyncio.gather(conn.close(), console.close())


async def test_pause_queues_everyone_and_resume_admits_them(guard) -> None:
    g = await guard(ADMIN_TOML + '[roles.app]\npolicy = "reject"\n')
    console = await admin_connect(g.port)
    assert await console.execute("PAUSE") == "PAUSE"
    waiters = [asyncio.create_task(asyncpg.connect(g.dsn(role))) for role in ("app", "app", "other")]
    await await_until(lambda: g.server.control.counts().clients_waiting == 3, what="three clients queued by PAUSE")
    queues = await fetch(console, "SHOW QUEUES")
    assert by(queues, role="app")["waiting"] == "2" and by(queues, role="other")["waiting"] == "1"
    states = [r["state"] for r in await fetch(console, "SHOW CLIENTS") if r["role"] != "admin"]
    assert states == ["queued"] * 3
    assert by(await fetch(console, "SHOW STATS"), stat="paused")["value"] == "yes"
    assert await console.execute("RESUME") == "RESUME"
    conns = await asyncio.wait_for(asyncio.gather(*waiters), 20)
    assert await fetch(console, "SHOW QUEUES") == []
    await asyncio.gather(*(c.close() for c in conns), console.close())


async def test_kill_client_closes_the_session_with_57p01_and_frees_its_slot(guard, pg) -> None:
    g = await guard(ADMIN_TOML + "[roles.app]\nmax_connections = 1\n")
    victim = await psycopg.AsyncConnection.connect(g.conninfo("app"), autocommit=True)
    console = await admin_connect(g.port)
    row = by(await fetch(console, "SHOW CLIENTS"), role="app")
    assert await console.execute(f"KILL CLIENT {row['id']}") == "KILL"
    with pytest.raises(psycopg.OperationalError, match="terminating connection due to administrator command"):
        await victim.execute("SELECT 1")
    await g.wait_idle()
    await await_until(lambda: pg.connection_count(users=["app"]) == 0, what="the server session to end")
    again = await asyncpg.connect(g.dsn("app"))  # the slot is free again
    with pytest.raises(asyncpg.PostgresError, match="no client with id 999999") as info:
        await console.execute("KILL CLIENT 999999")
    assert info.value.sqlstate == "42704"
    assert by(await fetch(console, "SHOW STATS"), stat="kills")["value"] == "1"
    await asyncio.gather(again.close(), console.close(), victim.close())


async def test_show_clients_sorts_by_idle_time_and_shows_activity(guard) -> None:
    g = await guard(ADMIN_TOML)
    leaky = await asyncpg.connect(g.dsn("app"), server_settings={"application_name": "leaky"})
    busy = await asyncpg.connect(g.dsn("app2", "limdb"), server_settings={"application_name": "busy"})
    await leaky.fetchval("SELECT 1")
    tx = busy.transaction()
    await tx.start()
    await busy.fetchval("SELECT 2")  # busy's last bytes are newer: leaky has been idle longer
    rows = await psql_rows(g.port, "SHOW CLIENTS")
    assert [r["application_name"] for r in rows] == ["leaky", "busy", "psql"]
    first, second, me = rows
    assert (first["role"], first["database"], first["state"], first["activity"]) == (
        "app", "postgres", "active", "idle",
    )  # fmt: skip
    assert second["activity"] == "idle in transaction" and me["state"] == "admin"
    assert int(first["bytes_in"]) > 0 and int(first["bytes_out"]) > 0
    assert float(first["idle_for"]) >= float(second["idle_for"])
    await tx.rollback()
    await asyncio.gather(leaky.close(), busy.close())


async def test_show_stats_counts_rejections_by_reason(guard) -> None:
    g = await guard(
        ADMIN_TOML
        + "[roles.app]\nmax_connections = 0\npolicy = \"reject\"\n"
        + "[roles.app2]\nmax_connections = 0\nqueue_timeout = 0.2\n"
    )
    with pytest.raises(asyncpg.TooManyConnectionsError):
        await asyncpg.connect(g.dsn("app"))
    with pytest.raises(asyncpg.TooManyConnectionsError):
        await asyncpg.connect(g.dsn("app2"))
    held = await asyncpg.connect(g.dsn("other"))
    stats = {r["stat"]: r["value"] for r in await psql_rows(g.port, "SHOW STATS")}
    assert stats["rejections_limit"] == "1" and stats["rejections_queue_timeout"] == "1"
    assert stats["queue_timeouts"] == "1" and stats["rejections"] == "2"
    assert stats["admissions"] == "1" and stats["sessions_active"] == "1"
    assert float(stats["wait_p99_seconds"]) >= 0.0 and int(stats["bytes_out"]) > 0
    await held.close()


async def test_show_config_masks_secrets(guard) -> None:
    g = await guard(
        ADMIN_TOML + '[backend]\nmonitor_dsn = "postgresql://mon:topsecret@127.0.0.1:5432/postgres"\n'
    )
    rows = {r["key"]: r["value"] for r in await psql_rows(g.port, "SHOW CONFIG")}
    assert rows["admin.password"] == "(SCRAM-SHA-256 verifier)"
    assert rows["backend.monitor_dsn"] == "postgresql://mon:********@127.0.0.1:5432/postgres"
    assert rows["limits.policy"] == "queue" and rows["admin.users"] == "admin"
    assert "topsecret" not in str(rows)


async def test_unknown_command_is_42601_and_the_session_goes_on(guard) -> None:
    g = await guard(ADMIN_TOML)
    console = await admin_connect(g.port)
    with pytest.raises(asyncpg.PostgresSyntaxError, match='syntax error at or near "DROP"') as info:
        await console.fetch("DROP TABLE everything")
    assert info.value.sqlstate == "42601"
    with pytest.raises(asyncpg.PostgresSyntaxError):
        await console.execute("SHOW NONSENSE")
    assert by(await fetch(console, "SHOW STATS"), stat="paused")["value"] == "no"
    await console.close()
    code, out, err = await psql(g.port, "bogus", "SHOW STATS")
    assert 'ERROR:  syntax error at or near "bogus"' in err and "admissions" in out


async def test_psycopg_cursors_work_without_autocommit(guard) -> None:
    g = await guard(ADMIN_TOML)
    async with await psycopg.AsyncConnection.connect(
        g.conninfo("admin", "pgguard"), password=ADMIN_PASSWORD
    ) as conn:
        for _ in range(6):  # past prepare_threshold: named prepared statements too
            cur = await conn.execute("SHOW LIMITS")
            assert (await cur.fetchall())[0][:2] == ("total", "")
            assert [d.name for d in cur.description][:3] == ["kind", "name", "limit"]


async def test_asyncpg_with_its_statement_cache_uses_named_statements(guard) -> None:
    g = await guard(ADMIN_TOML)
    conn = await asyncpg.connect(
        host="127.0.0.1", port=g.port, user="admin", database="pgguard", password=ADMIN_PASSWORD
    )
    for _ in range(3):  # prepared once as __asyncpg_stmt_N__, then re-bound
        rows = await conn.fetch("SHOW STATS")
        assert rows[0]["stat"] == "uptime_seconds"
    assert await conn.fetchval("SHOW LIMITS") == "total"
    await conn.close()


# --- raw protocol: what no driver sends -----------------------------------------------------


async def _raw_login(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    params = b"user\x00admin\x00database\x00pgguard\x00\x00"
    writer.write(struct.pack("!ii", len(params) + 8, 196608) + params)
    assert (await _read_until_ready(reader))[0][0] == b"R"
    return reader, writer


async def _read_until_ready(reader: asyncio.StreamReader) -> list[tuple[bytes, bytes]]:
    messages = []
    while True:
        head = await asyncio.wait_for(reader.readexactly(5), 20)
        body = await reader.readexactly(struct.unpack("!i", head[1:])[0] - 4)
        messages.append((head[:1], body))
        if head[:1] == b"Z":
            return messages


def _msg(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!i", len(body) + 4) + body


async def test_other_messages_get_0a000_and_several_statements_run_in_order(guard) -> None:
    g = await guard('[admin]\nusers = ["admin"]\nauth = "trust"\n')
    reader, writer = await _raw_login(g.port)
    writer.write(_msg(b"F", struct.pack("!ihhh", 1234, 0, 0, 0)))  # FunctionCall
    replies = await _read_until_ready(reader)
    assert [t for t, _ in replies] == [b"E", b"Z"] and b"C0A000\x00" in replies[0][1]
    writer.write(_msg(b"Q", b"SHOW QUEUES; pause ;RESUME;\x00"))
    replies = await _read_until_ready(reader)
    assert [t for t, _ in replies] == [b"T", b"C", b"C", b"C", b"Z"]
    assert [b for t, b in replies if t == b"C"] == [b"SHOW\x00", b"PAUSE\x00", b"RESUME\x00"]
    writer.write(_msg(b"Q", b"\x00"))  # an empty query
    assert [t for t, _ in await _read_until_ready(reader)] == [b"I", b"Z"]
    writer.write(_msg(b"X", b""))
    assert await asyncio.wait_for(reader.read(), 20) == b""
    writer.close()


async def test_hash_password_cli_prints_a_verifier_that_logs_in(guard) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgguard", "hash-password",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(b"from the cli\n"), 60)
    verifier = out.decode().strip()
    assert proc.returncode == 0 and scram.is_verifier(verifier)
    g = await guard(f'[admin]\nusers = ["ops"]\npassword = "{verifier}"\n')
    conn = await admin_connect(g.port, user="ops", password="from the cli")
    assert (await conn.execute("SHOW STATS")).startswith("SHOW ")
    await conn.close()


# ---------------------------------------- [admin] reserved_connections (issue 23)

TOO_MANY = "sorry, too many clients already"


async def test_console_gets_in_when_max_client_connections_is_full(guard) -> None:  # type: ignore[no-untyped-def]
    """The cap full of live sessions and sockets that never speak, three more silent sockets
    in the reserve: the console still logs in (a reserved socket silent for a second makes
    room) and runs SHOW, while application clients keep getting 53300 at once and /metrics,
    /healthz and /readyz keep answering."""
    from console_client import http_get, sample, scrape
    from test_bad_input import Raw

    from pgguard import wire

    g = await guard(ADMIN_TOML + '[metrics]\nlisten = "127.0.0.1:0"\n[server]\nmax_client_connections = 4\n')
    apps = [await asyncpg.connect(g.dsn("app"), timeout=30) for _ in range(2)]
    silent = [await Raw.open(g) for _ in range(2)]
    await await_until(lambda: len(g.api.clients()) == 4, what="the cap to fill")
    reserved = [await Raw.open(g) for _ in range(3)]  # past the cap: the whole reserve
    await await_until(lambda: len(g.api.clients()) == 7, what="three sockets in the reserve")

    async def console_logs_in() -> bool:
        try:
            conn = await admin_connect(g.port)
        except asyncpg.TooManyConnectionsError as exc:
            assert str(exc) == TOO_MANY  # the reserve is full of sockets younger than a second
            return False
        consoles.append(conn)
        return True

    consoles: list[asyncpg.Connection] = []
    await await_until(console_logs_in, timeout=20, interval=0.1, what="a console login")
    # The oldest silent socket of the reserve made room, answered as PostgreSQL would.
    tag, body = await reserved[0].read_message()
    fields = wire.parse_error_fields(body)
    assert (tag, fields["S"], fields["C"], fields["M"]) == (b"E", "FATAL", "53300", TOO_MANY)
    rows = await fetch(consoles[0], "SHOW CLIENTS")
    assert len(rows) == 7  # 2 sessions, 4 silent sockets, this console
    # Application clients past the cap: 53300 at once, before any authentication.
    for _ in range(3):
        with pytest.raises(asyncpg.TooManyConnectionsError, match=f"^{TOO_MANY}$"):
            await asyncpg.connect(g.dsn("app"), timeout=30)
    # A second console (psql) takes the place of another silent socket (older than a second).
    code, out, err = await psql(g.port, "SHOW STATS")
    assert code == 0 and "rejections" in out, err
    address = g.server.metrics.address
    samples = await scrape(address)
    assert sample(samples, "pgguard_rejections_total", reason="max_client_connections") >= 4
    assert await http_get(address, "/healthz") == "ok\n"
    assert await http_get(address, "/readyz") == "ready\n"
    for conn in [*consoles, *apps]:
        await conn.close()
    for raw in [*silent, *reserved]:
        await raw.close()
    await g.wait_idle()
    await await_until(lambda: not g.api.clients(), what="every socket to close")


@pytest.mark.parametrize("console", ["", ADMIN_TOML + "reserved_connections = 0\n"], ids=["no_console", "no_reserve"])
async def test_reserve_is_for_the_console_only(guard, console: str) -> None:  # type: ignore[no-untyped-def]
    """Without [admin] users there is no reserve: past the cap every socket gets 53300 at
    accept, as before; with reserved_connections = 0 too."""
    from test_bad_input import Raw

    from pgguard import wire

    g = await guard(console + "[server]\nmax_client_connections = 1\n")
    held = await Raw.open(g)
    await await_until(lambda: len(g.api.clients()) == 1, what="the cap to fill")
    over = await Raw.open(g)  # sends nothing: the answer comes at accept
    tag, body = await over.read_message()
    assert (tag, wire.parse_error_fields(body)["M"]) == (b"E", TOO_MANY)
    if console:
        with pytest.raises(asyncpg.TooManyConnectionsError, match=f"^{TOO_MANY}$"):
            await admin_connect(g.port)
    for raw in (held, over):
        await raw.close()
    await await_until(lambda: not g.api.clients(), what="the sockets to close")
