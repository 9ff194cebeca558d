"""Hostile and broken peers (issue 10): each case once found growing, blinding or lying pgguard.

Every test here also runs under conftest's log scan, which fails it on any error or traceback
pgguard logs. Raw sockets are used where no real client can send the bytes (invalid UTF-8
names, resets at chosen moments, malformed console messages).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from pathlib import Path

import asyncpg
import psycopg
import pytest
from console_client import ADMIN_TOML, admin_connect, by, fetch, sample, scrape, write_config
from test_bad_input import Raw, _startup

from pgguard import wire
from pgguard.testing.wait import await_until

pytestmark = pytest.mark.asyncio

METRICS_TOML = '[metrics]\nlisten = "127.0.0.1:0"\n'


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed client or a middlebox would."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _raw_startup(user: bytes, database: bytes = b"postgres", **extra: bytes) -> bytes:
    """A StartupMessage with arbitrary bytes as names (no real client sends invalid UTF-8)."""
    params = [(b"user", user), (b"database", database), *((k.encode(), v) for k, v in extra.items())]
    body = b"".join(k + b"\0" + v + b"\0" for k, v in params) + b"\0"
    return struct.pack("!ii", 8 + len(body), wire.PROTOCOL_3_0) + body


def _pgguard_tasks() -> list[asyncio.Task[object]]:
    return [
        t
        for t in asyncio.all_tasks()
        if "pgguard" in getattr(getattr(t.get_coro(), "cr_code", None), "co_filename", "")
    ]


# ------------------------------------------------------------------ memory


async def test_tls_request_then_reset_leaves_no_handshake_task(guard, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """SSLRequest then RST: the handshake task ends with the connection (it used to stay forever)."""
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(tmp_path / "c.pem")
    issued.private_key_pem.write_to_path(tmp_path / "k.pem")
    g = await guard(f'[tls]\ncert_file = "{tmp_path / "c.pem"}"\nkey_file = "{tmp_path / "k.pem"}"\n')

    def ssl_request_then_reset(read_answer: bool) -> None:
        # A blocking socket in a thread: the SSLRequest and the reset reach pgguard in one
        # read batch, so the client is gone before the handshake task takes its first step.
        with socket.create_connection((g.host, g.port), timeout=15) as s:
            s.sendall(struct.pack("!ii", 8, wire.SSL_REQUEST_CODE))
            if read_answer:
                assert s.recv(1) == b"S"
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    for i in range(200):
        await asyncio.to_thread(ssl_request_then_reset, i % 4 == 0)
    await await_until(
        lambda: not g.server.clients and not _pgguard_tasks(),
        timeout=15,
        what="every TLS handshake task to end with its connection",
    )


async def test_distinct_refused_names_leave_no_state(guard) -> None:  # type: ignore[no-untyped-def]
    """Thousands of refused, distinct 1,000-byte role names: nothing per name outlives its client."""
    g = await guard("[limits]\nrole_max_connections = 0\npolicy = \"reject\"\n")
    n = 2000
    for i in range(n):
        raw = await Raw.open(g)
        raw.send(_raw_startup(b"r%05d" % i + b"x" * 1000))
        tag, body = await raw.read_message()
        assert tag == b"E" and b"53300" in body
        await raw.close()
    await g.wait_idle()
    # The public view keeps no name that only a client ever presented.
    assert [r for r in g.server.control.limit_rows() if r.kind == "role"] == []
    assert g.server.stats.rejections["limit"] == n


async def test_over_long_refused_names_hold_no_more_than_63_bytes_each(guard) -> None:  # type: ignore[no-untyped-def]
    """2,000 refused, distinct 4,000-byte role names: pgguard cuts each to the 63 bytes the
    server would log in as before anything keeps it (the role memo kept the whole name: 8 MB
    here, until it reached ROLE_CACHE_MAX)."""
    import gc
    import tracemalloc

    g = await guard("[limits]\nrole_max_connections = 0\npolicy = \"reject\"\n")
    n = 2000
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            raw = await Raw.open(g)
            name = b"r%05d" % i + b"x" * 4000
            raw.send(_raw_startup(name))
            tag, body = await raw.read_message()
            assert (tag, wire.parse_error_fields(body)["M"]) == (
                b"E", f'too many connections for role "{name[:63].decode()}"'
            )
            await raw.close()
        await g.wait_idle()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < n * 1000, f"{grown} bytes kept after {n} refused names"


async def test_waiters_across_roles_are_capped_by_max_queue_total(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard("[limits]\nrole_max_connections = 0\nmax_queue_total = 3\nqueue_timeout = 60\n")
    raws = []
    for i in range(3):
        raw = await Raw.open(g)
        raw.send(_raw_startup(b"queued%d" % i))
        raws.append(raw)
    await await_until(lambda: g.server.control.counts().clients_waiting == 3, what="three waiters")
    over = await Raw.open(g)
    over.send(_raw_startup(b"yet_another_role"))
    tag, body = await over.read_message()
    fields = wire.parse_error_fields(body)
    assert (tag, fields["C"], fields["M"]) == (
        b"E", "53300", 'too many connections for role "yet_another_role"'
    )
    assert g.server.stats.rejections["max_queue_total"] == 1
    for raw in [*raws, over]:
        await raw.close()


# ----------------------------------------------------- client sockets cap


async def test_client_sockets_past_max_client_connections_get_53300(guard, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level("INFO", logger="pgguard")
    g = await guard("[server]\nmax_client_connections = 3\n")
    held = [await Raw.open(g) for _ in range(3)]
    await await_until(lambda: len(g.server.clients) == 3, what="three client sockets")
    refused = []
    for _ in range(5):
        raw = await Raw.open(g)
        tag, body = await raw.read_message()
        fields = wire.parse_error_fields(body)
        assert (tag, fields["S"], fields["C"], fields["M"]) == (
            b"E", "FATAL", "53300", "sorry, too many clients already"
        )
        assert await raw.read_to_eof() == b""
        refused.append(raw)
    assert g.server.stats.rejections["max_client_connections"] == 5
    lines = [r.getMessage() for r in caplog.records if "event=refuse " in r.getMessage()]
    assert len(lines) == 1 and "reason=max_client_connections" in lines[0]  # rate-limited
    for raw in [*held, *refused]:
        await raw.close()
    # Room again once the held sockets are gone: a real client is served.
    await await_until(lambda: not g.server.clients, what="the held sockets to close")
    conn = await asyncpg.connect(g.dsn("app"), timeout=30)
    assert await conn.fetchval("select 1") == 1
    await conn.close()


async def test_fd_limit_derives_the_cap_and_refusals_are_logged(pg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`pgguard run` under a low RLIMIT_NOFILE: the derived cap answers 53300 before EMFILE."""
    import resource
    import subprocess

    config = write_config(tmp_path / "pgguard.toml", pg, METRICS_TOML)

    def limit_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    log_path = tmp_path / "pgguard.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgguard", "run", "-c", str(config), "--log-level", "info"],
            stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=limit_fds,
        )  # fmt: skip
    try:
        await await_until(
            lambda: "event=start" in log_path.read_text(), timeout=30, what="pgguard to start"
        )
        text = log_path.read_text()
        assert "max_client_connections=32" in text  # (128 - 64) / 2
        port = int(text.split("listen=127.0.0.1:")[1].split()[0])
        held = []
        for _ in range(32):
            held.append(socket.create_connection(("127.0.0.1", port)))
        answers = []
        for _ in range(40):  # far past the cap, and past what 128 fds would take
            s = socket.create_connection(("127.0.0.1", port))
            s.settimeout(15)
            answers.append(s.recv(1024))
            s.close()
        assert all(a.startswith(b"E") and b"sorry, too many clients already" in a for a in answers)
        for s in held:
            s.close()
        await await_until(
            lambda: "event=refuse" in log_path.read_text(), timeout=15, what="the refuse line"
        )
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in log_path.read_text()


async def test_fd_limit_lowered_at_run_time_is_counted_and_pgguard_keeps_serving(pg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`prlimit` lowers a running pgguard's open-file limit, then a flood: accept fails with
    EMFILE. Nothing is closed without a word (uvloop's own accept closed most of the flood
    and told nobody), the failures are counted in fd_exhausted and logged once per second
    with a count, and once descriptors are back a normal client is served."""
    import os
    import resource
    import subprocess

    config = write_config(
        tmp_path / "pgguard.toml", pg, METRICS_TOML,
        server="max_client_connections = 1000",
    )  # fmt: skip
    log_path = tmp_path / "pgguard.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgguard", "run", "-c", str(config), "--log-level", "info"],
            stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    flood: list[socket.socket] = []
    try:
        await await_until(
            lambda: "event=metrics" in log_path.read_text(), timeout=30, what="pgguard to start"
        )
        text = log_path.read_text()
        port = int(text.split("listen=127.0.0.1:")[1].split()[0])
        metrics_port = int(text.split("event=metrics listen=127.0.0.1:")[1].split()[0])
        soft, hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
        in_use = len(os.listdir(f"/proc/{proc.pid}/fd"))
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (in_use + 8, hard))
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            flood.append(s)
        for s in flood:  # on loopback the kernel completes the handshake: the bytes wait there
            s.send(_raw_startup(b"app"))
        await await_until(
            lambda: "event=refuse reason=accept" in log_path.read_text(),
            timeout=30, what="the fd exhaustion to be logged",
        )  # fmt: skip
        await await_until(
            lambda: "event=refuse_summary reason=accept" in log_path.read_text(),
            timeout=30, what="the rate-limited summary of the retries",
        )  # fmt: skip

        def closed_by_pgguard(s: socket.socket) -> bool:
            """Closed without a word (an ErrorResponse before the close is a word)."""
            try:
                return s.recv(1) == b""
            except BlockingIOError:
                return False  # still open: waiting in the backlog or accepted
            except ConnectionResetError:
                return True

        assert sum(map(closed_by_pgguard, flood)) == 0
        assert proc.poll() is None
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
        for s in flood:
            s.close()
        flood.clear()
        conn = await asyncpg.connect(f"postgresql://app@127.0.0.1:{port}/postgres", timeout=30)
        assert await conn.fetchval("select 1") == 1
        await conn.close()
        samples = await scrape(("127.0.0.1", metrics_port))
        assert sample(samples, "pgguard_fd_exhausted_total") >= 2
        lines = [line for line in log_path.read_text().splitlines() if "reason=accept" in line]
        assert len(lines) < sample(samples, "pgguard_fd_exhausted_total")  # rate-limited
    finally:
        for s in flood:
            s.close()
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in log_path.read_text()


# --------------------------------------------------- client text is data


async def test_metrics_survive_invalid_utf8_and_fold_unnamed_roles(guard) -> None:  # type: ignore[no-untyped-def]
    from pgguard.metrics import MAX_UNNAMED_LABELS

    g = await guard(METRICS_TOML + "[limits]\nrole_max_connections = 0\nqueue_timeout = 60\n")
    address = g.server.metrics.address
    raws = []
    bad = await Raw.open(g)
    bad.send(_raw_startup(b"\xff\xfebad\nrole", b"db\xc3"))
    raws.append(bad)
    for i in range(MAX_UNNAMED_LABELS + 20):
        raw = await Raw.open(g)
        raw.send(_raw_startup(b"many%03d" % i))
        raws.append(raw)
    await await_until(
        lambda: g.server.control.counts().clients_waiting == len(raws), what="every client queued"
    )
    samples = await scrape(address)
    waiting = {
        dict(labels)["role"]: value
        for (name, labels), value in samples.items()
        if name == "pgguard_clients_waiting"
    }
    assert len(waiting) <= MAX_UNNAMED_LABELS + 1
    assert sum(waiting.values()) == len(raws)
    assert waiting.get("other", 0) >= 20
    for raw in raws:
        await raw.close()


async def test_control_characters_in_names_cannot_forge_log_lines(guard, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level("INFO", logger="pgguard")
    g = await guard("[limits]\nrole_max_connections = 0\npolicy = \"reject\"\n")
    forged = b"app\nevent=admin_login user=admin\r\x1b[2J" + b"\n" * 200
    raw = await Raw.open(g)
    raw.send(_raw_startup(forged, b"db\n\xff"))
    tag, _ = await raw.read_message()
    assert tag == b"E"
    await raw.close()
    lines = [r.getMessage() for r in caplog.records if "event=reject " in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert 'role="app\\nevent=admin_login user=admin\\r\\x1b[2J' in line
    assert "database=db\\n\\xff" in line


async def test_show_clients_escapes_client_text(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard(ADMIN_TOML + "[limits]\nrole_max_connections = 0\nqueue_timeout = 60\n")
    raw = await Raw.open(g)
    raw.send(_raw_startup(b"evil\n\xff", application_name=b"tab\there"))
    await await_until(lambda: g.server.control.counts().clients_waiting == 1, what="the client queued")
    admin = await admin_connect(g.port)
    rows = await fetch(admin, "SHOW CLIENTS")
    row = by(rows, state="queued")
    assert (row["role"], row["application_name"]) == ("evil\\n\\xff", "tab\\there")
    queues = await fetch(admin, "SHOW QUEUES")
    assert by(queues, role="evil\\n\\xff")["waiting"] == "1"
    await admin.close()
    await raw.close()


# ------------------------------------------------------ leaving mid-result


async def test_client_reset_mid_result_frees_the_slot_without_a_traceback(guard) -> None:  # type: ignore[no-untyped-def]
    """The client resets while the server streams rows: no write into the closed client."""
    g = await guard("[backend]\nclose_timeout = 60\n")
    for _ in range(5):
        raw = await Raw.open(g)
        raw.send(_startup({"user": "app", "database": "postgres"}))
        while (await raw.read_message())[0] != b"Z":
            pass
        query = b"select repeat('x', 1000) from generate_series(1, 200000)\0"
        raw.send(b"Q" + struct.pack("!i", 4 + len(query)) + query)
        await raw.read_message()  # the RowDescription: rows are flowing
        await raw.reader.readexactly(64 * 1024)
        _reset(raw.writer)
    # Far sooner than close_timeout: the query is cancelled, the server ends the session.
    await g.wait_idle(timeout=20)


async def test_abandoned_copy_frees_the_slot_long_before_close_timeout(guard, pg) -> None:  # type: ignore[no-untyped-def]
    """A client stops reading a big COPY (pgguard pauses the server), then leaves.

    pgguard must read the server again, or the server never sees the cancel and the
    Terminate, and the slot is held until close_timeout.
    """
    g = await guard("[backend]\nclose_timeout = 120\n")
    raw = await Raw.open(g)
    raw.send(_startup({"user": "app", "database": "postgres", "application_name": "abandoned"}))
    while (await raw.read_message())[0] != b"Z":
        pass
    query = b"copy (select repeat('x', 1000) from generate_series(1, 2000000)) to stdout\0"
    raw.send(b"Q" + struct.pack("!i", 4 + len(query)) + query)

    def server_blocked_writing() -> bool:
        rows = pg.psql(
            "select wait_event from pg_stat_activity where application_name = 'abandoned'"
        )
        return "ClientWrite" in rows

    # The client reads nothing: its buffers fill, pgguard stops reading, the server blocks.
    await await_until(server_blocked_writing, timeout=30, what="the server to block in send()")
    await raw.close()
    await g.wait_idle(timeout=30)  # well under close_timeout = 120


# ------------------------------------------------------------- the server


async def test_server_closing_before_answering_gets_08006(guard) -> None:  # type: ignore[no-untyped-def]
    """A fake backend that accepts and closes at once: a real PostgreSQL cannot be made to do
    it on demand (it happens during a fast shutdown or a crash). The client must get an
    ErrorResponse, not a bare EOF."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    fake = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = fake.sockets[0].getsockname()[1]
    try:
        g = await guard(f"[backend]\nport = {port}\n")
        with pytest.raises(psycopg.OperationalError, match="server closed the connection unexpectedly"):
            await psycopg.AsyncConnection.connect(g.conninfo("app"), connect_timeout=20)
        raw = await Raw.open(g)
        raw.send(_startup({"user": "app", "database": "postgres"}))
        tag, body = await raw.read_message()
        fields = wire.parse_error_fields(body)
        assert (tag, fields["S"], fields["C"]) == (b"E", "FATAL", "08006")
        assert await raw.read_to_eof() == b""
        await raw.close()
        await g.wait_idle()
    finally:
        fake.close()


# --------------------------------------------------------------- console


MALFORMED = {
    "query_without_nul": b"Q" + struct.pack("!i", 4 + 3) + b"SHO",
    "query_not_utf8": b"Q" + struct.pack("!i", 4 + 3) + b"\xff\xfe\0",
    "parse_without_nul": b"P" + struct.pack("!i", 4 + 4) + b"stmt",
    "bind_truncated": b"B" + struct.pack("!i", 4 + 3) + b"\0\0\x00",
    "execute_without_nul": b"E" + struct.pack("!i", 4 + 2) + b"pp",
    "describe_empty": b"D" + struct.pack("!i", 4),
    "close_without_nul": b"C" + struct.pack("!i", 4 + 2) + b"Sx",
}


@pytest.mark.parametrize("message", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_console_answers_malformed_messages_with_08p01(guard, message: bytes) -> None:  # type: ignore[no-untyped-def]
    g = await guard('[admin]\nusers = ["admin"]\nauth = "trust"\n')
    raw = await Raw.open(g)
    raw.send(_startup({"user": "admin", "database": "pgguard"}))
    while (await raw.read_message())[0] != b"Z":
        pass
    raw.send(message + b"S" + struct.pack("!i", 4))
    tag, body = await raw.read_message()
    fields = wire.parse_error_fields(body)
    assert (tag, fields["S"], fields["C"], fields["M"]) == (
        b"E", "FATAL", "08P01", "invalid message format"
    )
    assert await raw.read_to_eof() == b""
    await raw.close()
    await await_until(lambda: not g.server.control.consoles, what="the console session to close")


# ------------------------------------------------------- metrics agree


async def test_stats_count_refusals_in_console_and_metrics(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard(ADMIN_TOML + METRICS_TOML + "[server]\nmax_client_connections = 2\n")
    admin = await admin_connect(g.port)  # one of the two sockets
    held = await Raw.open(g)
    await await_until(lambda: len(g.server.clients) == 1, what="the held socket")
    over = await Raw.open(g)
    # Past the cap with the console on, the socket's StartupMessage is read ([admin]
    # reserved_connections): not a console login, so 53300.
    over.send(_raw_startup(b"app"))
    tag, _ = await over.read_message()
    assert tag == b"E"
    stats = {r["stat"]: r["value"] for r in await fetch(admin, "SHOW STATS")}
    assert stats["rejections_max_client_connections"] == "1"
    samples = await scrape(g.server.metrics.address)
    assert sample(samples, "pgguard_rejections_total", reason="max_client_connections") == 1
    await admin.close()
    for raw in (held, over):
        await raw.close()


async def test_a_flood_of_unknown_cancel_keys_is_not_passed_on(guard) -> None:  # type: ignore[no-untyped-def]
    """Each forwarded CancelRequest costs the server a connection: forged ones are bounded."""
    g = await guard()
    n = 300
    raws = [await Raw.open(g) for _ in range(n)]
    for i, raw in enumerate(raws):  # all sent before any is answered
        raw.send(struct.pack("!iiii", 16, wire.CANCEL_REQUEST_CODE, 100000 + i, i))
    for raw in raws:
        assert await raw.read_to_eof() == b""
        await raw.close()
    stats = g.server.stats
    await await_until(
        lambda: stats.cancels_forwarded + stats.cancels_dropped == n, what="every cancel handled"
    )
    assert stats.cancels_dropped > 0
    await await_until(lambda: not g.server.control._tasks, what="the forwarded cancels to finish")


async def test_console_login_refuses_a_huge_claimed_message(guard) -> None:  # type: ignore[no-untyped-def]
    """Before its login a console client cannot make pgguard buffer a 1 GB message."""
    g = await guard('[admin]\nusers = ["admin"]\npassword = "secret"\n')
    raw = await Raw.open(g)
    raw.send(_startup({"user": "admin", "database": "pgguard"}))
    tag, _ = await raw.read_message()  # AuthenticationSASL
    assert tag == b"R"
    raw.send(b"p" + struct.pack("!i", 1 << 30) + b"x" * 1000)
    tag, body = await raw.read_message()
    fields = wire.parse_error_fields(body)
    assert (tag, fields["C"]) == (b"E", "08P01")
    assert await raw.read_to_eof() == b""
    await raw.close()


async def test_client_gone_before_the_servers_ready_for_query_is_no_session(guard) -> None:  # type: ignore[no-untyped-def]
    """The client resets while the server is finishing its login (found by the chaos harness).

    A fake backend holds its AuthenticationOk/ReadyForQuery until the client is gone: a real
    server cannot be made to wait at that point on demand. pgguard must not hand the dead
    session to a relay (it used to fail its state check, CLOSED -> ACTIVE), and frees the slot.
    """
    client_gone = asyncio.Event()

    async def slow_login(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = await reader.readexactly(4)
        await reader.readexactly(struct.unpack("!i", header)[0] - 4)
        await client_gone.wait()
        writer.write(
            wire.build_authentication_ok()
            + wire.build_backend_key_data(4242, b"\0\0\0\1")
            + wire.build_ready_for_query()
        )
        assert await reader.readexactly(5) == wire.TERMINATE  # as PostgreSQL, close on it
        writer.close()

    fake = await asyncio.start_server(slow_login, "127.0.0.1", 0)
    port = fake.sockets[0].getsockname()[1]
    try:
        g = await guard(f"[backend]\nport = {port}\nclose_timeout = 60\n")
        raw = await Raw.open(g)
        raw.send(_startup({"user": "app", "database": "postgres"}))
        await await_until(
            lambda: any(c.state.value == "authenticating" for c in g.server.clients.values()),
            what="the session to wait for the server's login",
        )
        _reset(raw.writer)
        await await_until(lambda: not g.server.clients, what="the client to be gone")
        client_gone.set()
        await g.wait_idle(timeout=30)  # the server closes after the Terminate: long before 60 s
        assert g.server.stats.backend_errors == 0
    finally:
        fake.close()
