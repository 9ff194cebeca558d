"""Helpers for the control-plane tests: psql and asyncpg on the admin console, metrics scrapes,
and pgguard servers started from a real config file (so RELOAD and SIGHUP have a file to read).

Every pgguard under test runs in the test's own event loop, so nothing here blocks it:
psql runs as an asyncio subprocess and HTTP scrapes run in a thread.
"""

from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from pgguard import config as config_mod
from pgguard.scram import make_verifier
from pgguard.server import Server
from pgguard.testing.cluster import PostgresCluster

ADMIN_USER = "admin"
ADMIN_PASSWORD = "adm1n pass"
# A fixed salt keeps the verifier stable across runs; PBKDF2 still runs for real.
ADMIN_VERIFIER = str(make_verifier(ADMIN_PASSWORD, salt=b"pgguard-test-salt"))
ADMIN_TOML = f"""
[admin]
users = ["{ADMIN_USER}"]
password = "{ADMIN_VERIFIER}"
"""


async def psql(
    port: int,
    *commands: str,
    user: str = ADMIN_USER,
    password: str = ADMIN_PASSWORD,
    database: str = "pgguard",
    host: str = "127.0.0.1",
    args: tuple[str, ...] = (),
) -> tuple[int, str, str]:
    """Run ``psql -c CMD ...`` against pgguard; returns (exit code, stdout, stderr)."""
    argv = ["psql", f"host={host} port={port} user={user} dbname={database}", "-X", *args]
    for cmd in commands:
        argv += ["-c", cmd]
    env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "20", "PGSSLMODE": "disable"}
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def psql_rows(port: int, command: str) -> list[dict[str, str]]:
    """One console command through psql, unaligned, as a list of {column: value}."""
    code, out, err = await psql(port, command, args=("-A", "-F", "\t", "-P", "footer=off"))
    assert code == 0, err
    lines = out.splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


async def admin_connect(
    port: int, *, password: str = ADMIN_PASSWORD, user: str = ADMIN_USER, host: str = "127.0.0.1"
) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=host,
        port=port,
        user=user,
        database="pgguard",
        password=password,
        statement_cache_size=0,
        ssl=False,
        timeout=20,
    )


async def fetch(conn: asyncpg.Connection, sql: str) -> list[dict[str, str]]:
    return [dict(r) for r in await conn.fetch(sql)]


def by(rows: list[dict[str, str]], **match: str) -> dict[str, str]:
    """The one row whose columns equal ``match``."""
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(address: tuple[str, int], path: str = "/metrics") -> Samples:
    """GET the metrics endpoint (in a thread) and parse it: {(sample name, labels): value}."""
    text = await http_get(address, path)
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


async def http_get(address: tuple[str, int], path: str, headers: dict[str, str] | None = None) -> str:
    url = f"http://{address[0]}:{address[1]}{path}"

    def get() -> str:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=20) as resp:
            body: bytes = resp.read()
            return body.decode()

    return await asyncio.to_thread(get)


def sample(samples: Samples, metric: str, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


def write_config(path: Path, pg: PostgresCluster, body: str = "", *, server: str = "") -> Path:
    """A config file in front of ``pg`` on a free port; ``server`` adds [server] keys."""
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:0"
client_login_timeout = 5.0
{server}

[backend]
host = "127.0.0.1"
port = {pg.port}
close_timeout = 5.0

{body}
"""
    )
    return path


@asynccontextmanager
async def file_server(path: Path) -> AsyncIterator[Server]:
    """A pgguard in this loop, configured from ``path``; closed on exit."""
    server = Server(config_mod.load(path), loop=asyncio.get_running_loop())
    await server.start()
    try:
        yield server
    finally:
        await server.close()
