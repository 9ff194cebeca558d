"""Helpers for the cluster tests that run real ``python -m pgguard run`` processes sharing one
``[cluster]`` (a real redis-server) in front of one real PostgreSQL: start them, read their
logs, sample ``pg_stat_activity``."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from pgguard.testing.cluster import PostgresCluster, free_port
from pgguard.testing.wait import await_until

ROLE_LIMIT = 5
LEASE_TTL = 2.0


@dataclass
class PgguardProcess:
    """A ``python -m pgguard run`` process: its listen port, its log lines, its console."""

    proc: asyncio.subprocess.Process
    port: int
    log: list[str] = field(default_factory=list, kw_only=True)

    @property
    def log_text(self) -> str:
        return "\n".join(self.log)

    def dsn(self, user: str = "app") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/postgres"

    async def console(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1", port=self.port, user="admin", database="pgguard",
            statement_cache_size=0, ssl=False, timeout=20,
        )  # fmt: skip

    async def show(self, what: str) -> list[dict[str, str]]:
        console = await self.console()
        try:
            return [dict(r) for r in await console.fetch(f"SHOW {what}")]
        finally:
            await console.close()


@dataclass
class Instance(PgguardProcess):
    """One pgguard of a cluster test: its instance name and the test's key prefix."""

    name: str
    prefix: str


def _config(
    path: Path, pg: PostgresCluster, redis_url: str, prefix: str, name: str, port: int, body: str, failure: str
) -> Path:
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
client_login_timeout = 5.0

[backend]
host = "127.0.0.1"
port = {pg.port}
close_timeout = 5.0

[admin]
users = ["admin"]
auth = "trust"

[cluster]
redis = "{redis_url}"
instance = "{name}"
prefix = "{prefix}"
lease_ttl = {LEASE_TTL}
timeout = 3.0
on_redis_failure = "{failure}"

{body}
"""
    )
    return path


@asynccontextmanager
async def instance(
    tmp_path: Path, pg: PostgresCluster, redis_url: str, prefix: str, name: str, body: str, failure: str = "local"
) -> AsyncIterator[Instance]:
    port = free_port()
    path = _config(tmp_path / f"{name}.toml", pg, redis_url, prefix, name, port, body, failure)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgguard", "run", "-c", str(path), "--log-level", "info",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    inst = Instance(proc, port, name, prefix)

    async def read_log() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            inst.log.append(line.decode().rstrip())

    reader = asyncio.create_task(read_log())
    try:
        await await_until(
            lambda: "event=cluster_join" in inst.log_text or proc.returncode is not None,
            timeout=30,
            what=f"{name} to join the cluster",
        )
        assert proc.returncode is None, inst.log_text
        yield inst
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await asyncio.wait_for(reader, 10)
        assert "Traceback" not in inst.log_text, inst.log_text


@asynccontextmanager
async def three(
    tmp_path: Path, pg: PostgresCluster, redis_url: str, body: str, first: str = ""
) -> AsyncIterator[list[Instance]]:
    """Three instances with ``body``; ``first`` is added to the first one's config only."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    async with AsyncExitStack() as stack:
        out = [
            await stack.enter_async_context(
                instance(tmp_path, pg, redis_url, prefix, f"g{i}", body + ("" if i else first))
            )
            for i in range(3)
        ]
        yield out


class Sampler:
    """Samples pg_stat_activity for role app while a storm runs: the server's own view."""

    def __init__(self, pg: PostgresCluster) -> None:
        self.pg = pg
        self.peak = 0
        self.samples = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        conn = await asyncpg.connect(self.pg.dsn())
        try:
            while not self._stop.is_set():
                n = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'")
                self.peak = max(self.peak, n)
                self.samples += 1
        finally:
            await conn.close()

    def stop(self) -> None:
        self._stop.set()


async def _client(dsn: str, results: list[str], hold: float = 0.05, waits: list[float] | None = None) -> None:
    started = time.monotonic()
    try:
        conn = await asyncpg.connect(dsn, timeout=60, ssl=False)
    except asyncpg.TooManyConnectionsError:
        results.append("53300")
        return
    if waits is not None:
        waits.append(time.monotonic() - started)
    try:
        await conn.execute(f"SELECT pg_sleep({hold})")
        results.append("served")
    finally:
        await conn.close()


class Forwarder:
    """A TCP forwarder to a real redis-server that the test can freeze: a network cut-off
    between one pgguard and Redis while Redis stays up for the others.

    Frozen, it forwards nothing (bytes read are dropped, new connections are accepted and
    left silent), so the pgguard's calls time out as over a dead link; thawed, every
    connection open during the freeze is reset (a partition kills them) and new ones are
    forwarded again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thawed = asyncio.Event()
        self._thawed.set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self._thawed.clear()

    def thaw(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        self._thawed.set()

    async def close(self) -> None:
        self.thaw()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._thawed.wait()
            if writer.transport.is_closing():
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers.add(up_writer)
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except OSError:
            pass
        finally:
            writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not self._thawed.is_set():  # dropped; the connection is reset at the thaw
                    await self._thawed.wait()
                    return
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()
