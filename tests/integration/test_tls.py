"""TLS on both sides through real clients: psql, psycopg (its bundled libpq) and asyncpg.

Certificates are throwaway ones from ``trustme``: one CA signs the PostgreSQL server's
certificate, pgguard's own (a different key) and a renewed one for the reload test. The
session cluster ``pg`` has no TLS; ``tls_pg`` (this module) is a second cluster with
``ssl = on``. Raw-socket clients are used only where a real client cannot show the bytes
(a rejection inside TLS, ALPN offers libpq never makes, unencrypted data after SSLRequest).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
import pytest
import trustme

from pgguard import tls, wire
from pgguard.testing.cluster import PostgresCluster, free_port
from pgguard.testing.wait import await_until, wait_until

PASSWORD = "s3cret pass"
TIMEOUT = 30.0  # per client connection; the machine is shared
PSQL = shutil.which("psql") or "psql"
LIBPQ_DIRECT_TLS = psycopg.pq.version() >= 170000  # sslnegotiation=direct


@dataclass
class Certs:
    dir: Path
    ca: Path  # signed every certificate below
    foreign_ca: Path  # signed none of them
    pg_cert: Path  # the PostgreSQL server's (localhost, 127.0.0.1)
    pg_key: Path
    guard_cert: Path  # pgguard's own: same names, another key
    guard_key: Path
    new_cert: Path  # a renewed pgguard certificate
    new_key: Path


@pytest.fixture(scope="module")
def certs() -> Iterator[Certs]:
    ca, foreign = trustme.CA(), trustme.CA()
    # Under /tmp and world-traversable: the postgres OS user must read the server's files.
    d = Path(tempfile.mkdtemp(prefix="pgguard-tls-", dir="/tmp"))
    d.chmod(0o755)
    paths = Certs(
        d, d / "ca.crt", d / "foreign.crt", d / "pg.crt", d / "pg.key",
        d / "guard.crt", d / "guard.key", d / "new.crt", d / "new.key",
    )  # fmt: skip
    ca.cert_pem.write_to_path(paths.ca)
    foreign.cert_pem.write_to_path(paths.foreign_ca)
    for cert_path, key_path in (
        (paths.pg_cert, paths.pg_key),
        (paths.guard_cert, paths.guard_key),
        (paths.new_cert, paths.new_key),
    ):
        issued = ca.issue_cert("localhost", "127.0.0.1")
        issued.cert_chain_pems[0].write_to_path(cert_path)
        issued.private_key_pem.write_to_path(key_path)
    # PostgreSQL refuses a key readable by others; as root it runs as "postgres".
    paths.pg_key.chmod(0o600)
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        for item in d.iterdir():
            os.chown(item, owner.pw_uid, owner.pw_gid)
    yield paths
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_pg(certs: Certs) -> Iterator[PostgresCluster]:
    settings = {"ssl": True, "ssl_cert_file": str(certs.pg_cert), "ssl_key_file": str(certs.pg_key)}
    cluster = PostgresCluster(max_connections=40, settings=settings)
    if not cluster.ssl_supported:
        pytest.skip(f"the PostgreSQL server in {cluster.bindir} is built without OpenSSL (ssl = on cannot start)")
    with cluster:
        cluster.create_role("app")
        cluster.create_role("scram_user", password=PASSWORD)
        yield cluster


def guard_toml(
    certs: Certs,
    *,
    cert: str = "guard",
    client_mode: str = "allow",
    backend: PostgresCluster | None = None,
    sslmode: str = "disable",
    sslrootcert: Path | None = None,
    extra: str = "",
) -> str:
    cert_path, key_path = getattr(certs, f"{cert}_cert"), getattr(certs, f"{cert}_key")
    lines = [
        "[tls]",
        f'cert_file = "{cert_path}"',
        f'key_file = "{key_path}"',
        f'client_mode = "{client_mode}"',
        "[backend]",
        f'sslmode = "{sslmode}"',
        f'sslrootcert = "{sslrootcert or certs.ca}"',
    ]
    if backend is not None:
        lines.append(f"port = {backend.port}")
    return "\n".join(lines) + "\n" + extra


async def pq(g, user: str = "app", **params: str) -> psycopg.AsyncConnection:
    """A psycopg (libpq) connection to pgguard; ``params`` are libpq connection parameters."""
    kwargs = {"host": "127.0.0.1", "port": str(g.port), "user": user, "dbname": "postgres"}
    kwargs.update({"connect_timeout": str(int(TIMEOUT)), "gssencmode": "disable"}, **params)
    if user == "scram_user":
        kwargs.setdefault("password", PASSWORD)
    return await psycopg.AsyncConnection.connect(**kwargs)


async def psql(g, conninfo: str, *commands: str) -> tuple[int, str, str]:
    argv = [
        PSQL,
        "-X",
        "-A",
        "-t",
        "-w",
        f"host=127.0.0.1 port={g.port} dbname=postgres {conninfo}",
    ]
    for command in commands:
        argv += ["-c", command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSFILE="/nonexistent", PGCONNECT_TIMEOUT=str(int(TIMEOUT)))
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT * 2)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def server_ssl(conn: psycopg.AsyncConnection) -> bool:
    """Whether the server sees this session's own connection (pgguard's) as TLS."""
    cur = await conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    row = await cur.fetchone()
    assert row is not None
    return bool(row[0])


def client_context(certs: Certs, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


async def read_messages(reader: asyncio.StreamReader) -> list[tuple[bytes, bytes]]:
    """Every message until the server closes (or a ReadyForQuery)."""
    framer = wire.MessageReader()
    messages: list[tuple[bytes, bytes]] = []
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), TIMEOUT)
        except (ConnectionResetError, ssl.SSLError):
            chunk = b""
        if not chunk:
            return messages
        framer.feed(chunk)
        while (message := framer.next_message()) is not wire.NEED_DATA:
            assert isinstance(message, tuple)
            messages.append(message)
            if message[0] == b"Z":
                return messages


def startup(user: str = "app") -> bytes:
    return wire.build_startup_message({"user": user, "database": "postgres"})


def client_sessions_tls(g) -> list[bool]:
    return [c.client_tls is not None for c in g.server.clients.values()]


# ----------------------------------------------------------- clients verify and run over TLS


@pytest.mark.parametrize("server", ["clear-server", "tls-server"])
async def test_psql_psycopg_asyncpg_over_tls_with_verify_full_and_require(
    guard, pg, tls_pg, certs: Certs, server: str
) -> None:
    if server == "tls-server":
        g = await guard(guard_toml(certs, backend=tls_pg, sslmode="verify-full"))
    else:
        g = await guard(guard_toml(certs))
    expect_server_ssl = server == "tls-server"
    check = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"

    for mode in ("verify-full", "require"):
        code, out, err = await psql(
            g, f"user=app sslmode={mode} sslrootcert={certs.ca}", r"\conninfo", check
        )
        assert code == 0, err
        assert "SSL connection (protocol: TLSv1." in out, out
        assert out.strip().splitlines()[-1] == ("t" if expect_server_ssl else "f")

        conn = await pq(g, sslmode=mode, sslrootcert=str(certs.ca))
        assert conn.pgconn.ssl_in_use
        assert await server_ssl(conn) is expect_server_ssl
        assert client_sessions_tls(g) == [True]
        await conn.close()

    # asyncpg: verify-full is an SSLContext with the CA (host names checked), then "require".
    for ssl_arg in (client_context(certs), "require"):
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=g.port,
            user="app",
            database="postgres",
            ssl=ssl_arg,
            timeout=TIMEOUT,
        )
        assert await conn.fetchval(check) is expect_server_ssl
        assert client_sessions_tls(g) == [True]
        await conn.close()
    await g.wait_idle()


async def test_copy_both_ways_through_tls_on_both_sides(guard, tls_pg, certs: Certs) -> None:
    """About 8 MB each way: the pump and its flow control between two SSL transports."""
    g = await guard(guard_toml(certs, backend=tls_pg, sslmode="require"))
    conn = await pq(g, sslmode="require")
    await conn.execute("CREATE TEMP TABLE sink (n int, pad text)")
    rows = "SELECT g, repeat('x', 80) FROM generate_series(1, 100000) g"
    received = 0
    async with conn.cursor().copy(f"COPY ({rows}) TO STDOUT") as copy:
        async for chunk in copy:
            received += len(chunk)
    assert received == sum(len(f"{n}\t{'x' * 80}\n") for n in range(1, 100001))
    line = "x" * 80
    async with conn.cursor().copy("COPY sink FROM STDIN") as copy:
        for start in range(1, 100001, 1000):
            await copy.write("".join(f"{n}\t{line}\n" for n in range(start, start + 1000)))
    cur = await conn.execute("SELECT count(*), sum(length(pad)) FROM sink")
    assert await cur.fetchone() == (100000, 8000000)
    assert await server_ssl(conn)
    await conn.close()
    await g.wait_idle()


async def test_psql_refuses_pgguard_certificate_from_an_unknown_ca(guard, certs: Certs) -> None:
    g = await guard(guard_toml(certs))
    code, _, err = await psql(
        g, f"user=app sslmode=verify-full sslrootcert={certs.foreign_ca}", "SELECT 1"
    )
    assert code != 0 and "certificate verify failed" in err
    await g.wait_idle()
    assert not g.server.clients


async def test_clear_clients_still_served_when_client_mode_allow(guard, certs: Certs) -> None:
    g = await guard(guard_toml(certs))
    conn = await pq(g, sslmode="disable")
    assert not conn.pgconn.ssl_in_use
    await conn.close()
    conn = await pq(g, sslmode="prefer")  # libpq's default: asks, and pgguard says S
    assert conn.pgconn.ssl_in_use
    await conn.close()


async def test_client_mode_disable_answers_n(guard, certs: Certs) -> None:
    g = await guard(guard_toml(certs, client_mode="disable"))
    conn = await pq(g, sslmode="prefer")
    assert not conn.pgconn.ssl_in_use
    await conn.close()
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
        await pq(g, sslmode="require")


async def test_admin_console_over_tls(guard, certs: Certs) -> None:
    g = await guard(guard_toml(certs, extra='[admin]\nusers = ["admin"]\nauth = "trust"\n'))
    code, out, err = await psql(
        g,
        f"user=admin dbname=pgguard sslmode=verify-full sslrootcert={certs.ca}",
        r"\conninfo",
        "SHOW STATS",
    )
    assert code == 0, err
    assert "SSL connection (protocol: TLSv1." in out and "admissions" in out


# ---------------------------------------------------------------- client_mode = require


async def test_client_mode_require_refuses_clear_clients_with_28000(guard, certs: Certs) -> None:
    g = await guard(guard_toml(certs, client_mode="require"))
    message = (
        'no pg_hba.conf entry for host "127.0.0.1", user "app", database "postgres", no encryption'
    )
    code, _, err = await psql(g, "user=app sslmode=disable", "SELECT 1")
    assert code != 0 and f"FATAL:  {message}" in err, err
    with pytest.raises(psycopg.OperationalError, match=message):
        await pq(g, sslmode="disable")
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match=message) as caught:
        await asyncpg.connect(
            host="127.0.0.1",
            port=g.port,
            user="app",
            database="postgres",
            ssl=False,
            timeout=TIMEOUT,
        )
    assert caught.value.sqlstate == "28000"
    code, out, err = await psql(g, "user=app", "SELECT 1")  # psql's default sslmode=prefer
    assert (code, out.strip()) == (0, "1"), err
    conn = await pq(g, sslmode="require")
    await conn.close()
    await g.wait_idle()
    assert g.server.stats.admissions == 2  # the refused ones never reached admission


# ----------------------------------------------------------------- rejections inside TLS


async def test_rejection_over_tls_arrives_inside_tls(guard, certs: Certs) -> None:
    g = await guard(
        guard_toml(certs, extra='[roles.app]\nmax_connections = 0\npolicy = "reject"\n')
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", g.port)
    writer.write(tls.SSL_REQUEST)
    assert await asyncio.wait_for(reader.readexactly(1), TIMEOUT) == b"S"
    await writer.start_tls(client_context(certs), server_hostname="localhost")
    assert writer.get_extra_info("ssl_object") is not None
    writer.write(startup())
    messages = await read_messages(reader)
    assert [tag for tag, _ in messages] == [b"E"]
    fields = wire.parse_error_fields(messages[0][1])
    assert (fields["S"], fields["C"], fields["M"]) == (
        "FATAL", "53300", 'too many connections for role "app"'
    )  # fmt: skip
    writer.close()

    with pytest.raises(psycopg.OperationalError, match='too many connections for role "app"'):
        await pq(g, sslmode="verify-full", sslrootcert=str(certs.ca))
    await g.wait_idle()
    assert (
        g.server.stats.rejections["role_max_connections"] + sum(g.server.stats.rejections.values())
        >= 2
    )


# --------------------------------------------------------------------- SCRAM and -PLUS


async def test_scram_channel_binding_prefer_through_tls_to_a_clear_server(
    guard, certs: Certs
) -> None:
    """The server offers no -PLUS over a clear connection; libpq (TLS to pgguard) says 'y'."""
    g = await guard(guard_toml(certs))
    conn = await pq(g, "scram_user", sslmode="require", channel_binding="prefer")
    assert conn.pgconn.ssl_in_use and not await server_ssl(conn)
    await conn.close()


async def test_scram_plus_stripped_for_a_clear_client_of_a_tls_server(
    guard, tls_pg, certs: Certs
) -> None:
    """A TLS server offers SCRAM-SHA-256-PLUS; libpq over a clear connection refuses such an
    offer outright ("server offered SCRAM-SHA-256-PLUS authentication over a non-SSL
    connection"), so this login works only because pgguard strips -PLUS."""
    g = await guard(guard_toml(certs, backend=tls_pg, sslmode="verify-full"))
    for channel_binding in ("prefer", "disable"):
        conn = await pq(g, "scram_user", sslmode="disable", channel_binding=channel_binding)
        assert not conn.pgconn.ssl_in_use and await server_ssl(conn)
        await conn.close()
    conn = await asyncpg.connect(
        host="127.0.0.1", port=g.port, user="scram_user", password=PASSWORD,
        database="postgres", ssl=False, timeout=TIMEOUT,
    )  # fmt: skip
    await conn.close()
    await g.wait_idle()


async def test_channel_binding_works_when_pgguard_shows_the_server_certificate(
    guard, tls_pg, certs: Certs
) -> None:
    """tls-server-end-point binds to the certificate: with the server's own certificate and key,
    pgguard leaves -PLUS in place and even channel_binding=require authenticates."""
    g = await guard(guard_toml(certs, cert="pg", backend=tls_pg, sslmode="verify-full"))
    for channel_binding in ("require", "prefer"):
        conn = await pq(g, "scram_user", sslmode="verify-full", sslrootcert=str(certs.ca),
                        channel_binding=channel_binding)  # fmt: skip
        assert conn.pgconn.ssl_in_use and await server_ssl(conn)
        await conn.close()
    await g.wait_idle()


async def test_channel_binding_with_two_certificates_needs_channel_binding_disable(
    guard, tls_pg, certs: Certs
) -> None:
    """pgguard's own certificate in front of a TLS server: -PLUS is stripped, and libpq
    over TLS then says "I support channel binding, you don't" ('y'), which a TLS server
    refuses (its downgrade protection). channel_binding=disable, and asyncpg (which never
    binds), authenticate; require cannot, as docs/tls.md says."""
    g = await guard(guard_toml(certs, backend=tls_pg, sslmode="verify-full"))
    conn = await pq(g, "scram_user", sslmode="require", channel_binding="disable")
    assert conn.pgconn.ssl_in_use and await server_ssl(conn)
    await conn.close()
    conn = await asyncpg.connect(
        host="127.0.0.1", port=g.port, user="scram_user", password=PASSWORD,
        database="postgres", ssl="require", timeout=TIMEOUT,
    )  # fmt: skip
    await conn.close()
    with pytest.raises(psycopg.OperationalError, match="SCRAM channel binding negotiation error"):
        await pq(g, "scram_user", sslmode="require", channel_binding="prefer")
    with pytest.raises(psycopg.OperationalError, match="channel binding is required"):
        await pq(g, "scram_user", sslmode="require", channel_binding="require")
    await g.wait_idle()


# -------------------------------------------------------------------- backend sslmode


async def test_backend_sslmode_require_against_a_server_without_tls(guard, certs: Certs) -> None:
    g = await guard(guard_toml(certs, sslmode="require"))
    with pytest.raises(
        psycopg.OperationalError,
        match="pgguard could not connect to the server: server does not support SSL, but SSL was required",
    ):
        await pq(g, sslmode="disable")
    await g.wait_idle()
    assert g.server.stats.dial_failures == 1

    g = await guard(guard_toml(certs, sslmode="prefer"))  # prefer carries on in clear
    conn = await pq(g, sslmode="disable")
    assert not await server_ssl(conn)
    await conn.close()


@pytest.mark.parametrize("sslmode", ["prefer", "require", "verify-ca"])
async def test_backend_sslmodes_reach_a_tls_server_over_tls(
    guard, tls_pg, certs: Certs, sslmode: str
) -> None:
    g = await guard(guard_toml(certs, backend=tls_pg, sslmode=sslmode))
    conn = await pq(g, sslmode="disable")
    assert await server_ssl(conn)
    await conn.close()


async def test_backend_verify_full_refuses_a_certificate_from_an_unknown_ca(
    guard, tls_pg, certs: Certs
) -> None:
    g = await guard(
        guard_toml(certs, backend=tls_pg, sslmode="verify-full", sslrootcert=certs.foreign_ca)
    )
    with pytest.raises(
        psycopg.OperationalError,
        match="pgguard could not connect to the server: .*certificate verify failed",
    ):
        await pq(g, sslmode="require")
    await g.wait_idle()
    assert g.server.stats.dial_failures == 1


# ----------------------------------------------------------------------- direct TLS


@pytest.mark.skipif(not LIBPQ_DIRECT_TLS, reason="this libpq has no sslnegotiation=direct")
async def test_libpq_direct_tls(guard, tls_pg, certs: Certs) -> None:
    g = await guard(guard_toml(certs, backend=tls_pg, sslmode="verify-full"))
    conn = await pq(g, "scram_user", sslmode="verify-full", sslrootcert=str(certs.ca),
                    sslnegotiation="direct", channel_binding="disable")  # fmt: skip
    assert conn.pgconn.ssl_in_use and await server_ssl(conn)
    await conn.close()
    await g.wait_idle()


async def test_direct_tls_alpn_is_checked_as_postgresql_does(guard, certs: Certs) -> None:
    g = await guard(guard_toml(certs))
    # ALPN postgresql: accepted, and the session works.
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", g.port, ssl=client_context(certs, ["postgresql"]), server_hostname="localhost"
    )
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "postgresql"
    writer.write(startup())
    assert [tag for tag, _ in await read_messages(reader)][-1] == b"Z"
    writer.close()
    # An offer without postgresql: the TLS alert no_application_protocol, as PostgreSQL 17.
    with pytest.raises(ssl.SSLError, match="(?i)no.application.protocol"):
        await asyncio.open_connection(
            "127.0.0.1",
            g.port,
            ssl=client_context(certs, ["h2", "http/1.1"]),
            server_hostname="localhost",
        )
    # No ALPN at all: refused (PostgreSQL completes the handshake, then closes; pgguard closes first).
    with pytest.raises((ssl.SSLError, ConnectionError)):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", g.port, ssl=client_context(certs), server_hostname="localhost"
        )
        writer.write(startup())
        assert await read_messages(reader) == []
        raise ConnectionError("closed after the handshake")
    await g.wait_idle()
    await await_until(
        lambda: not g.server.clients, timeout=TIMEOUT, what="refused clients to be gone"
    )


async def test_direct_tls_without_tls_configured_is_closed(guard) -> None:
    g = await guard()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["postgresql"])
        await asyncio.open_connection("127.0.0.1", g.port, ssl=ctx, server_hostname="localhost")


# -------------------------------------------------------------- SSLRequest edge cases


async def test_unencrypted_data_after_ssl_request_is_refused(guard, certs: Certs) -> None:
    g = await guard(guard_toml(certs))
    reader, writer = await asyncio.open_connection("127.0.0.1", g.port)
    writer.write(tls.SSL_REQUEST + startup())  # one write: the server has both at once
    assert await asyncio.wait_for(reader.readexactly(1), TIMEOUT) == b"S"
    messages = await read_messages(reader)
    assert len(messages) == 1 and messages[0][0] == b"E"
    fields = wire.parse_error_fields(messages[0][1])
    assert (fields["C"], fields["M"]) == ("08P01", "received unencrypted data after SSL request")
    writer.close()
    await await_until(lambda: not g.server.clients, timeout=TIMEOUT, what="the client to be gone")


async def test_silent_client_after_s_is_closed_at_login_timeout(guard, certs: Certs) -> None:
    g = await guard(guard_toml(certs, extra="[server]\nclient_login_timeout = 0.5\n"))
    reader, writer = await asyncio.open_connection("127.0.0.1", g.port)
    writer.write(tls.SSL_REQUEST)
    assert await asyncio.wait_for(reader.readexactly(1), TIMEOUT) == b"S"
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # closed, no handshake
    writer.close()
    await await_until(lambda: not g.server.clients, timeout=TIMEOUT, what="the client to be gone")


async def test_broken_handshakes_leave_nothing_behind(guard, certs: Certs, caplog) -> None:
    g = await guard(guard_toml(certs))
    hello = _client_hello_bytes()
    attempts = [
        (tls.SSL_REQUEST, b"GET / HTTP/1.1\r\n\r\n"),  # not TLS after S
        (tls.SSL_REQUEST, hello[: len(hello) // 2]),  # leaves mid-ClientHello
        (b"", hello[: len(hello) // 2]),  # direct TLS, leaves mid-ClientHello
        (b"", b"\x16\x03\x01\x00\x02\x15\x00"),  # direct: a record that is no ClientHello
    ]
    for request, then in attempts:
        reader, writer = await asyncio.open_connection("127.0.0.1", g.port)
        if request:
            writer.write(request)
            assert await asyncio.wait_for(reader.readexactly(1), TIMEOUT) == b"S"
        writer.write(then)
        await writer.drain()
        writer.close()
    await await_until(lambda: not g.server.clients, timeout=TIMEOUT, what="every client to be gone")
    assert g.server.control.counts().sessions_active == 0
    assert "Traceback" not in caplog.text and "never retrieved" not in caplog.text


def _client_hello_bytes() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(["postgresql"])
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


async def test_cancel_from_a_tls_client(guard, pg, certs: Certs) -> None:
    """libpq 17+ (PQcancelCreate) sends its CancelRequest inside TLS, after an SSLRequest."""
    g = await guard(guard_toml(certs))
    closed: list[tuple[bool, bool]] = []  # (had TLS, sent a StartupMessage) per closed client
    client_closed = g.server.control.client_closed

    def record(client) -> None:
        closed.append((client.client_tls is not None, client.startup is not None))
        client_closed(client)

    g.server.control.client_closed = record  # type: ignore[method-assign]
    conn = await pq(g, sslmode="require")
    query = asyncio.create_task(conn.execute("SELECT pg_sleep(60)"))

    async def sleeping() -> bool:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'"
        return await asyncio.to_thread(pg.psql, sql) == "1"

    await await_until(sleeping, timeout=TIMEOUT, what="the query to run on the server")
    await conn.cancel_safe(timeout=TIMEOUT)
    with pytest.raises(psycopg.errors.QueryCanceled):
        await asyncio.wait_for(query, TIMEOUT)
    assert g.server.stats.cancels_forwarded == 1
    if LIBPQ_DIRECT_TLS:  # libpq 17+: the cancel connection was TLS too
        assert (True, False) in closed
    await conn.close()


# ------------------------------------------------------------------ certificate reload


async def _served_certificate(g, certs: Certs) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", g.port)
    writer.write(tls.SSL_REQUEST)
    assert await asyncio.wait_for(reader.readexactly(1), TIMEOUT) == b"S"
    await writer.start_tls(client_context(certs), server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return der


def _der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


@pytest.mark.log_errors("event=reload_failed")
async def test_reload_picks_up_a_renewed_certificate_and_keeps_it_on_a_bad_one(
    guard, certs: Certs, tmp_path: Path
) -> None:
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(certs.guard_cert, cert)
    shutil.copy(certs.guard_key, key)
    g = await guard(f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')
    assert await _served_certificate(g, certs) == _der(certs.guard_cert)
    held = await pq(g, sslmode="require")  # a session from before the renewal

    shutil.copy(certs.new_cert, cert)
    shutil.copy(certs.new_key, key)
    assert g.server.reload(g.server.config)
    assert await _served_certificate(g, certs) == _der(certs.new_cert)

    key.write_text("not a key\n")
    assert not g.server.reload(g.server.config)
    assert await _served_certificate(g, certs) == _der(certs.new_cert)
    assert (await (await held.execute("SELECT 1")).fetchone()) == (1,)
    await held.close()


# --------------------------------------------------- pgguard run: uvloop, SIGHUP, pgbench


def test_pgguard_run_serves_tls_under_uvloop_and_reloads_on_sighup(
    tls_pg, certs: Certs, tmp_path: Path
) -> None:
    """The real process (uvloop): SSLRequest and direct TLS clients, pgbench over TLS on
    both sides, a certificate renewed on SIGHUP, and a clean drain on SIGTERM."""
    port = free_port()
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(certs.guard_cert, cert)
    shutil.copy(certs.guard_key, key)
    config = tmp_path / "pgguard.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nshutdown_timeout = 10.0\n'
        f'[backend]\nport = {tls_pg.port}\nsslmode = "verify-full"\nsslrootcert = "{certs.ca}"\n'
        f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\nclient_mode = "require"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgguard", "run", "-c", str(config), "--log-level", "debug"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(
            lambda: _accepts(port) or proc.poll() is not None,
            timeout=TIMEOUT,
            what="pgguard to listen",
        )
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        base = {"host": "127.0.0.1", "port": port, "user": "app", "dbname": "postgres",
                "sslrootcert": str(certs.ca), "sslmode": "verify-full", "connect_timeout": 30}  # fmt: skip
        with psycopg.connect(**base) as conn:
            assert conn.execute(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone() == (True,)
        if LIBPQ_DIRECT_TLS:
            with psycopg.connect(**base, sslnegotiation="direct") as conn:
                assert conn.pgconn.ssl_in_use

        script = tmp_path / "select.sql"
        script.write_text("SELECT 1;\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGSSLMODE="require", PGCONNECT_TIMEOUT="30")
        bench = subprocess.run(
            ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(port), "-U", "app", "-c", "4", "-j", "2",
             "-t", "50", "-f", str(script), "postgres"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert bench.returncode == 0, bench.stderr
        assert "number of transactions actually processed: 200/200" in bench.stdout

        shutil.copy(certs.new_cert, cert)
        shutil.copy(certs.new_key, key)
        proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: _served_der(port, certs) == _der(certs.new_cert), timeout=TIMEOUT,
            what="the renewed certificate after SIGHUP",
        )  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stderr.read() if proc.stderr else ""


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _served_der(port: int, certs: Certs) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(tls.SSL_REQUEST)
        assert sock.recv(1) == b"S"
        with client_context(certs).wrap_socket(sock, server_hostname="localhost") as tls_sock:
            der = tls_sock.getpeercert(binary_form=True)
            assert der is not None
            return der
