"""``python -m benchmarks chaos``: hostile clients and a failing server against a pgguard process, then one set of checks.

What it does
------------
A throwaway PostgreSQL 15 (``pgguard.testing.cluster``) and, for each run, a fresh pgguard in
its own process (``python -m pgguard run``, logging to a file, from this tree or
``--pgguard-tree``), everything on 127.0.0.1. Each run first does a small slice of its own
workload (warm-up), lets pgguard settle, records its descriptors and RSS, then does the real
workload and ends with the same checks:

- ``alive``: the pgguard process is still running;
- ``no slots``: zero sessions held and zero waiters, and the console (SHOW STATS, SHOW QUEUES)
  and ``/metrics`` agree, and ``pg_stat_activity`` shows no proxied session left;
- ``fds``: ``/proc/PID/fd`` back to the count after warm-up;
- ``rss``: growth after warm-up within the run's bound;
- ``log``: no traceback, ERROR line or asyncio complaint in pgguard's log (the first few are
  printed), and no log line forged by a client (a newline in a name);
- ``served``: a normal client (asyncpg) logs in and runs ``select 1`` at the end;
plus the checks particular to the run (a 08P01 and never XX000 on the console, no bare EOF for
a client turned away, refusals at the fd limit logged, a slot freed promptly after an
abandoned COPY, linear TLS sniffing, ...).

Runs: ``fuzz`` (mutated startup packets of every kind, malformed console messages),
``disconnects`` (abrupt FIN/RST at every phase of a session), ``slowloris`` (plain and
direct-TLS dripping), ``faults`` (pg_terminate_backend, SIGKILL of a backend, ``pg_ctl stop -m
fast`` and start, with clients queued), ``fdlimit`` (pgguard under RLIMIT_NOFILE 256),
``memory`` (distinct refused user names, TLS SSLRequest-then-RST) and ``reuse`` (the
disconnects again, plus clients leaving idle, with ``[pool] reuse`` on: pgguard's own SCRAM
exchange, warm sessions handed out, taken back and reset).

Every loop is bounded in count and in time. The table is printed and written as JSON to
``benchmarks/results/chaos-*.json``; the exit code is 1 when a check failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import os
import random
import re
import resource
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pgguard.testing.cluster import BINDIR_ENV, PostgresCluster, free_port

from .stack import (
    REPO,
    _Process,
    clean_env,
    cpu_seconds,
    fd_count,
    machine_info,
    raise_nofile,
    rss_kib,
)

__all__ = ["RUNS", "ChaosSettings", "main_chaos"]

RESULTS: Final = REPO / "benchmarks" / "results"
HOST: Final = "127.0.0.1"

# Roles and databases. pgguard refuses every role it has no table for (role_max_connections
# = 0, policy reject), so fuzzed names never reach the server.
CHAOS_ROLE: Final = "chaos"          # a normal application role, limit CHAOS_LIMIT, queue
CHAOS_DB: Final = "chaos"
CHAOS_LIMIT: Final = 40
SCRAM_ROLE: Final = "scram_user"     # authenticates with SCRAM at the server
SCRAM_PASSWORD: Final = "s3cret pass"
WAIT_ROLE: Final = "waiter"          # limit 0, policy queue: every client of it queues
ADMIN_USER: Final = "admin"
ADMIN_DB: Final = "pgguard"
PG_MAX_CONNECTIONS: Final = 200

PROTOCOL_3_0: Final = 196608
PROTOCOL_3_2: Final = 196610
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102
TERMINATE: Final = b"X\x00\x00\x00\x04"
# SO_LINGER {on, 0 s}: close() sends RST instead of FIN (and leaves no TIME_WAIT behind).
LINGER_RST: Final = struct.pack("ii", 1, 0)
FORGED_MARKER: Final = "chaos-forged-line"
# A pgguard log line: "2026-12-02 00:15:00,123 level=INFO event=..."; anything else is either
# a traceback's continuation or a line a client forged with a newline in a name.
LOG_LINE: Final = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ level=(\w+) ")
# Problems: ERROR and CRITICAL lines (asyncio's "Task was destroyed but it is pending",
# "Fatal error on transport", "Exception in callback" are logged at ERROR), judged by the
# line's own level, never by text a client put in a name.
PROBLEM_LEVELS: Final = frozenset({"ERROR", "CRITICAL"})
# Wall-clock budget of one run; past it the run is cancelled and reported as failed.
RUN_BUDGET_S: Final = {"full": 1800.0, "quick": 300.0, "smoke": 120.0}
# Settling: how long the checks wait for slots, waiters, fds and server sessions to go.
SETTLE_S: Final = 25.0
POLL_S: Final = 0.05


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ChaosSettings:
    """Counts and durations for one mode (full, quick, smoke)."""

    mode: str
    fuzz_packets: int
    fuzz_concurrency: int
    console_sessions: int
    disconnects: int
    disconnect_concurrency: int
    copy_probes: int
    copy_pause_s: float
    slowloris_clients: int
    slowloris_seconds: float
    slowloris_login_timeout: float
    tls_drip_clients: int
    tls_drip_interval_s: float
    fault_rounds: int
    fault_clients: int
    fd_nofile: int
    fd_clients: int
    memory_names: int
    memory_name_bytes: int
    memory_tls_rsts: int
    # RSS growth allowed in the memory run. The TLS handshakes' buffers (uvloop's SSL protocol
    # and OpenSSL's) move the allocator's high-water mark in steps of several MiB for the first
    # few thousand handshakes, then it stays flat (measured: +18 MiB over 4,000, then +0.5 over
    # the next 4,000); the small modes see one such step. The leak this guards against was
    # 53 KiB per connection: 53 MiB per 1,000.
    memory_bound_mib: float
    warmup: float  # share of the workload done before the baseline is taken
    close_timeout: float

    @classmethod
    def for_mode(cls, mode: str) -> ChaosSettings:
        if mode == "full":
            return cls(
                mode=mode, fuzz_packets=200_000, fuzz_concurrency=256, console_sessions=2_000,
                disconnects=20_000, disconnect_concurrency=48, copy_probes=3, copy_pause_s=2.0,
                slowloris_clients=500, slowloris_seconds=14.0, slowloris_login_timeout=10.0,
                tls_drip_clients=10, tls_drip_interval_s=0.01, fault_rounds=3, fault_clients=30,
                fd_nofile=256, fd_clients=400, memory_names=100_000, memory_name_bytes=512,
                memory_tls_rsts=10_000, memory_bound_mib=10, warmup=0.1, close_timeout=8.0,
            )  # fmt: skip
        if mode == "quick":
            return cls(
                mode=mode, fuzz_packets=12_000, fuzz_concurrency=128, console_sessions=200,
                disconnects=1_500, disconnect_concurrency=32, copy_probes=1, copy_pause_s=1.5,
                slowloris_clients=150, slowloris_seconds=5.0, slowloris_login_timeout=3.0,
                tls_drip_clients=3, tls_drip_interval_s=0.004, fault_rounds=1, fault_clients=16,
                fd_nofile=256, fd_clients=320, memory_names=15_000, memory_name_bytes=1_000,
                memory_tls_rsts=2_000, memory_bound_mib=12, warmup=0.15, close_timeout=8.0,
            )  # fmt: skip
        if mode == "smoke":
            return cls(
                mode=mode, fuzz_packets=1_500, fuzz_concurrency=64, console_sessions=30,
                disconnects=150, disconnect_concurrency=16, copy_probes=1, copy_pause_s=1.0,
                slowloris_clients=30, slowloris_seconds=3.0, slowloris_login_timeout=2.5,
                tls_drip_clients=1, tls_drip_interval_s=0.002, fault_rounds=1, fault_clients=8,
                fd_nofile=256, fd_clients=300, memory_names=1_500, memory_name_bytes=1_000,
                memory_tls_rsts=1_000, memory_bound_mib=16, warmup=0.2, close_timeout=4.0,
            )  # fmt: skip
        raise ValueError(mode)


# ----------------------------------------------------------------------------- results


@dataclass
class Check:
    name: str
    passed: bool
    value: str
    detail: str = ""


@dataclass
class RunResult:
    name: str
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    log_problems: list[str] = field(default_factory=list)
    error: str = ""

    def check(self, name: str, passed: bool, value: object, detail: str = "") -> None:
        self.checks.append(Check(name, bool(passed), str(value), detail))

    @property
    def passed(self) -> bool:
        return not self.error and all(c.passed for c in self.checks)


# ------------------------------------------------------------------------ wire helpers


def startup_packet(params: Iterable[tuple[bytes, bytes]], protocol: int = PROTOCOL_3_0) -> bytes:
    body = struct.pack("!I", protocol)
    for key, value in params:
        body += key + b"\x00" + value + b"\x00"
    body += b"\x00"
    return struct.pack("!I", len(body) + 4) + body


def startup_for(user: str | bytes, database: str | bytes, app: str | bytes = "chaos") -> bytes:
    def b(v: str | bytes) -> bytes:
        return v if isinstance(v, bytes) else v.encode()

    return startup_packet([(b"user", b(user)), (b"database", b(database)), (b"application_name", b(app))])


def query_message(sql: str) -> bytes:
    body = sql.encode() + b"\x00"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def messages(buf: bytes | bytearray) -> list[tuple[int, bytes]]:
    """Complete backend messages at the start of ``buf`` as (tag, body)."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while len(buf) - pos >= 5:
        tag = buf[pos]
        (length,) = struct.unpack_from("!I", buf, pos + 1)
        if length < 4 or pos + 1 + length > len(buf):
            break
        out.append((tag, bytes(buf[pos + 5 : pos + 1 + length])))
        pos += 1 + length
    return out


def sqlstate_of(body: bytes) -> str:
    for part in body.split(b"\x00"):
        if part[:1] == b"C":
            return part[1:].decode("ascii", "replace")
    return "?????"


def first_error(buf: bytes | bytearray) -> str | None:
    for tag, body in messages(buf):
        if tag == ord("E"):
            return sqlstate_of(body)
    return None


def has_ready(buf: bytes | bytearray, status: bytes | None = None) -> bool:
    return any(tag == ord("Z") and (status is None or body == status) for tag, body in messages(buf))


async def _wait_fd(fd: int, *, write: bool, timeout: float) -> bool:
    """Wait until ``fd`` is readable (writable); False after ``timeout``. Cancellable.

    The harness waits on descriptors itself rather than through the loop's ``sock_*``
    methods: a timed-out ``wait_for`` around uvloop's ``sock_connect`` waits for the inner
    future to acknowledge its cancellation, which it may never do (a run hung so).
    """
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        done, _ = await asyncio.wait([ready], timeout=max(0.0, timeout))
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
    return bool(done)


class Conn:
    """One raw client socket on the harness's event loop; every wait is bounded."""

    __slots__ = ("sock", "buf", "eof", "reset", "loop", "received")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False
        self.reset = False
        self.received = 0
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, port: int, *, timeout: float = 10.0, rst: bool = False, nodelay: bool = False) -> Conn:
        """Connect to 127.0.0.1:``port``; raises ``TimeoutError`` or ``OSError``."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if rst:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            if nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex((HOST, port))
            if err == errno.EINPROGRESS:
                if not await _wait_fd(sock.fileno(), write=True, timeout=timeout):
                    raise TimeoutError(f"connect to {HOST}:{port}")
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data: bytes, timeout: float = 30.0) -> bool:
        """Send all of ``data``; False if the peer reset or closed, or it took over ``timeout``."""
        view = memoryview(data)
        deadline = self.loop.time() + timeout
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                if not await _wait_fd(self.sock.fileno(), write=True, timeout=deadline - self.loop.time()):
                    return False
            except OSError:  # reset, broken pipe
                self.reset = True
                return False
        return True

    async def read_until(self, done: Callable[[bytearray], bool], timeout: float, cap: int = 1 << 20) -> bool:
        """Read until ``done(buf)``, EOF, a reset or ``timeout``; True when ``done`` held."""
        deadline = self.loop.time() + timeout
        while not done(self.buf):
            if self.eof or self.reset:
                return False
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                left = deadline - self.loop.time()
                if left <= 0 or not await _wait_fd(self.sock.fileno(), write=False, timeout=left):
                    return False
                continue
            except OSError:  # reset
                self.reset = True
                return False
            if not data:
                self.eof = True
                return done(self.buf)
            self.received += len(data)
            if len(self.buf) < cap:
                self.buf += data
        return True

    def close(self, *, rst: bool = False) -> None:
        if rst:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        self.sock.close()

    def outcome(self) -> str:
        """What the peer said: ``E:SQLSTATE`` for its first ErrorResponse, else eof/reset/open."""
        err = first_error(self.buf)
        if err is not None:
            return f"E:{err}"
        if self.reset:
            return "reset"
        if self.eof:
            return "eof" if not self.buf else "eof-after-data"
        return "open"


async def login(port: int, user: str, database: str = CHAOS_DB, *, app: str = "chaos",
                timeout: float = 30.0, rst: bool = False) -> tuple[Conn, bool]:
    """StartupMessage (trust) and read to ReadyForQuery; returns the connection and whether it got there."""
    conn = await Conn.open(port, rst=rst)
    await conn.send(startup_for(user, database, app))
    ok = await conn.read_until(lambda b: has_ready(b) or first_error(b) is not None, timeout)
    return conn, ok and has_ready(conn.buf)


async def run_pool(total: int, concurrency: int, shot: Callable[[int], Awaitable[str]],
                   deadline_s: float) -> tuple[Counter[str], float]:
    """Run ``shot(i)`` for i in range(total), ``concurrency`` at a time, within ``deadline_s``.

    Returns the outcomes (what each shot returned, or the exception's name) and the elapsed
    time. Shots not started by the deadline are skipped and counted as ``not-run``.
    """
    outcomes: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    started = loop.time()
    stop_at = started + deadline_s
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < total and loop.time() < stop_at:
            i = next_index
            next_index += 1
            try:
                outcomes[await asyncio.wait_for(shot(i), max(1.0, stop_at - loop.time() + 5.0))] += 1
            except TimeoutError:
                outcomes["shot-timeout"] += 1
            except OSError as exc:
                outcomes[f"oserror:{exc.errno}"] += 1
            except Exception as exc:  # a harness bug must not stop the run; it is counted
                outcomes[f"harness:{type(exc).__name__}"] += 1

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, total)))))
    if next_index < total:
        outcomes["not-run"] += total - next_index
    return outcomes, loop.time() - started


# -------------------------------------------------------------------------- the stack


def _pg_ctl_path() -> str:
    bindir = os.environ.get(BINDIR_ENV) or "/usr/lib/postgresql/15/bin"
    path = Path(bindir) / "pg_ctl"
    if not path.exists():
        for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True):
            return str(candidate)
    return str(path)


class ChaosStack:
    """One throwaway PostgreSQL for the whole chaos run; a fresh pgguard process per run."""

    def __init__(self, pgguard_tree: Path | None, log_level: str = "info") -> None:
        import tempfile

        self.workdir = Path(tempfile.mkdtemp(prefix="pgguard-chaos-", dir="/tmp"))
        self.pgguard_tree = pgguard_tree
        self.log_level = log_level
        self.pg = PostgresCluster(
            max_connections=PG_MAX_CONNECTIONS,
            settings={"log_connections": False, "log_disconnections": False},
        )
        self._tls: tuple[Path, Path] | None = None
        self.nofile = raise_nofile()
        self.guards: list[Guard] = []

    def __enter__(self) -> ChaosStack:
        pg = self.pg
        pg.start()
        pg.create_role(CHAOS_ROLE)
        pg.create_role(WAIT_ROLE)
        pg.create_role(SCRAM_ROLE, password=SCRAM_PASSWORD)
        pg.create_database(CHAOS_DB, owner=CHAOS_ROLE)
        for role in (WAIT_ROLE, SCRAM_ROLE):
            pg.execute(f"GRANT CONNECT ON DATABASE {CHAOS_DB} TO {role}")
        pg.create_auth_lookup()  # the reuse run reads SCRAM_ROLE's verifier through it
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_guards()
        self.pg.stop()
        import shutil

        shutil.rmtree(self.workdir, ignore_errors=True)

    def tls_files(self) -> tuple[Path, Path]:
        if self._tls is None:
            import trustme

            leaf = trustme.CA().issue_cert("127.0.0.1", "localhost")
            cert, key = self.workdir / "chaos.crt", self.workdir / "chaos.key"
            leaf.cert_chain_pems[0].write_to_path(str(cert))
            leaf.private_key_pem.write_to_path(str(key))
            key.chmod(0o600)
            self._tls = (cert, key)
        return self._tls

    def pg_ctl(self, *args: str) -> None:
        """Run pg_ctl on the cluster's data directory (as the postgres OS user when root)."""
        argv = [_pg_ctl_path(), "-D", str(self.pg.data_dir), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        subprocess.run(argv, env=env, cwd=str(self.pg.socket_dir), capture_output=True, check=True,
                       timeout=90, stdin=subprocess.DEVNULL)

    def server_sessions(self) -> int:
        """Client backends of the proxied roles in pg_stat_activity."""
        return self.pg.connection_count(users=[CHAOS_ROLE, WAIT_ROLE, SCRAM_ROLE])

    def guard(self, name: str, settings: ChaosSettings, *, tls: bool = False,
              login_timeout: float = 5.0, nofile: int | None = None, extra: str = "",
              backend_extra: str = "") -> Guard:
        guard = Guard(self, name, settings, tls=tls, login_timeout=login_timeout, nofile=nofile,
                      extra=extra, backend_extra=backend_extra)
        self.guards.append(guard)
        return guard

    def stop_guards(self) -> None:
        """Stop every pgguard process still running (a run that failed half-way leaves one)."""
        for guard in self.guards:
            guard.stop()
        self.guards.clear()


class Guard:
    """``python -m pgguard run`` in its own process, with its console and /metrics."""

    def __init__(self, stack: ChaosStack, name: str, settings: ChaosSettings, *, tls: bool,
                 login_timeout: float, nofile: int | None, extra: str = "", backend_extra: str = "") -> None:
        self.stack = stack
        self.name = name
        self.tls = tls
        self.nofile = nofile
        self.port = free_port()
        self.metrics_port = free_port()
        tls_conf = ""
        if tls:
            cert, key = stack.tls_files()
            tls_conf = f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\nclient_mode = "allow"\n'
        self.config_path = stack.workdir / f"{name}.toml"
        self.config_path.write_text(f"""\
[server]
listen = "{HOST}:{self.port}"
client_login_timeout = {login_timeout}
shutdown_timeout = 2.0

[backend]
host = "{stack.pg.host}"
port = {stack.pg.port}
connect_timeout = 10.0
close_timeout = {settings.close_timeout}
{backend_extra}

[limits]
policy = "reject"
role_max_connections = 0
queue_timeout = 30.0
max_queue = 5000

[roles.{CHAOS_ROLE}]
max_connections = {CHAOS_LIMIT}
policy = "queue"

[roles.{SCRAM_ROLE}]
max_connections = 20
policy = "queue"

[roles.{WAIT_ROLE}]
max_connections = 0
policy = "queue"
queue_timeout = 60.0

[admin]
users = ["{ADMIN_USER}"]
auth = "trust"

[metrics]
listen = "{HOST}:{self.metrics_port}"

{tls_conf}
{extra}""")
        self.log = stack.workdir / f"{name}.log"
        self.proc: _Process | None = None

    def start(self) -> None:
        tree = self.stack.pgguard_tree
        env = clean_env()
        if tree is not None:
            env["PYTHONPATH"] = str(tree)
        nofile = self.nofile

        def limit_fds() -> None:
            if nofile is not None:
                # Soft and hard: pgguard may raise its soft limit to the hard one at start.
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = _Process(
            self.name,
            [sys.executable, "-m", "pgguard", "run", "-c", str(self.config_path), "--log-level",
             self.stack.log_level],
            self.log, cwd=str(tree or REPO), env=env, preexec_fn=limit_fds,
        )  # fmt: skip
        self.proc.wait_for_log(r"event=start\b")
        deadline = time.monotonic() + 30
        for port in (self.port, self.metrics_port):
            while True:
                try:
                    socket.create_connection((HOST, port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or not self.alive():
                        raise RuntimeError(f"{self.name}: port {port} not answering; log:\n"
                                           f"{self.log_text()[-2000:]}") from None
                    time.sleep(POLL_S)  # polling a port that is about to open; bounded

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def rss(self) -> int:
        return rss_kib(self.pid)

    def fds(self) -> int:
        return fd_count(self.pid)

    def fd_targets(self) -> dict[str, str]:
        """fd -> what it is (``socket:[inode]``, a path), for saying which descriptors stayed."""
        out = {}
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):
                out[fd] = os.readlink(f"/proc/{self.pid}/fd/{fd}")
        return out

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.stop()
        return self.proc.proc.returncode

    async def console(self, sql: str) -> list[tuple[str, ...]]:
        import asyncpg

        conn = await asyncpg.connect(host=HOST, port=self.port, user=ADMIN_USER, database=ADMIN_DB,
                                     ssl=False, timeout=10)
        try:
            rows = await asyncio.wait_for(conn.fetch(sql), 10)
        finally:
            await asyncio.wait_for(conn.close(), 10)
        return [tuple(r.values()) for r in rows]

    async def stats(self) -> dict[str, str]:
        return {k: v for k, v in await self.console("SHOW STATS")}

    async def metrics(self) -> str:
        def scrape() -> str:
            with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=10) as r:
                text: str = r.read().decode("utf-8", "replace")
                return text

        return await asyncio.to_thread(scrape)


def metric_sum(text: str, name: str, skip_label: str | None = None) -> float:
    """Sum of a metric's samples (all label sets), leaving out samples containing ``skip_label``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            if skip_label and skip_label in line:
                continue
            total += float(line.rsplit(" ", 1)[1])
    return total


# ------------------------------------------------------------------------ the checks


async def await_condition(check: Callable[[], Awaitable[bool]], timeout: float) -> tuple[bool, float]:
    """Poll ``check`` until it holds or ``timeout``; returns (held, seconds waited)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        try:
            if await check():
                return True, loop.time() - started
        except Exception:  # pgguard down or answering badly: the caller's checks say so
            pass
        if loop.time() - started > timeout:
            return False, loop.time() - started
        await asyncio.sleep(POLL_S)  # polling another process's state; bounded by timeout


async def served(guard: Guard) -> tuple[bool, str]:
    import asyncpg

    try:
        conn = await asyncpg.connect(host=HOST, port=guard.port, user=CHAOS_ROLE, database=CHAOS_DB,
                                     ssl=False, timeout=15)
        try:
            value = await asyncio.wait_for(conn.fetchval("select 1"), 15)
        finally:
            await asyncio.wait_for(conn.close(), 10)
        return value == 1, "select 1 answered"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"[:200]


async def settle(guard: Guard, stack: ChaosStack, timeout: float = SETTLE_S) -> tuple[bool, float, str]:
    """Wait until pgguard holds nothing and the server has no proxied session; returns (ok, s, state)."""
    last = {"state": ""}

    async def idle() -> bool:
        stats = await guard.stats()
        queues = await guard.console("SHOW QUEUES")
        metrics = await guard.metrics()
        server = await asyncio.to_thread(stack.server_sessions)
        m_active = metric_sum(metrics, "pgguard_sessions_active")
        m_waiting = metric_sum(metrics, "pgguard_clients_waiting")
        m_connected = metric_sum(metrics, "pgguard_clients_connected", skip_label='state="admin"')
        state = (f"console active={stats.get('sessions_active')} waiting={stats.get('clients_waiting')} "
                 f"connected={stats.get('clients_connected')} queues={len(queues)}; metrics "
                 f"active={m_active:g} waiting={m_waiting:g} connected={m_connected:g}; "
                 f"pg_stat_activity={server}")
        last["state"] = state
        return (stats.get("sessions_active") == "0" and stats.get("clients_waiting") == "0"
                and stats.get("clients_connected") == "0" and not queues and m_active == 0
                and m_waiting == 0 and m_connected == 0 and server == 0)

    ok, waited = await await_condition(idle, timeout)
    if not last["state"]:
        last["state"] = "console or /metrics did not answer"
    return ok, waited, last["state"]


@dataclass
class Baseline:
    fds: int
    rss_kib: int
    cpu: float
    fd_targets: dict[str, str] = field(default_factory=dict)


async def baseline(guard: Guard, stack: ChaosStack) -> Baseline:
    await settle(guard, stack, timeout=SETTLE_S)
    return Baseline(guard.fds(), guard.rss(), guard.cpu(), guard.fd_targets())


def scan_log(text: str) -> tuple[list[str], int, int]:
    """(problem lines, lines not in pgguard's format, lines a client forged).

    A problem is a line in pgguard's format at level ERROR or CRITICAL, or the first line of
    a traceback. Any other line not in the format is either a traceback's body or text a
    client smuggled in through a newline in a name; those carrying our marker are counted as
    forged (fuzzing may flip a bit in the marker, so "forged" alone is enough).
    """
    problems: list[str] = []
    unframed = forged = 0
    in_problem = False  # inside the lines that belong to a problem (a traceback's body)
    for line in text.splitlines():
        framed = LOG_LINE.match(line)
        if framed:
            in_problem = framed.group(1) in PROBLEM_LEVELS
            if in_problem:
                problems.append(line[:240])
            continue
        if line.startswith("Traceback (most recent call last)"):
            if not in_problem:
                problems.append(line[:240])
            in_problem = True
        elif in_problem:
            continue
        elif "forged" in line:
            forged += 1
            unframed += 1
        else:
            unframed += 1
    return problems, unframed, forged


def problem_excerpts(text: str, blocks: int = 3, lines: int = 30) -> list[str]:
    """The first few problems in full (an ERROR line and the traceback under it), for the JSON."""
    out: list[str] = []
    all_lines = text.splitlines()
    for i, line in enumerate(all_lines):
        framed = LOG_LINE.match(line)
        if not (framed and framed.group(1) in PROBLEM_LEVELS):
            continue
        block = [line[:300]]
        for follow in all_lines[i + 1 : i + lines]:
            if LOG_LINE.match(follow):
                break
            block.append(follow[:300])
        out.append("\n".join(block))
        if len(out) >= blocks:
            break
    return out


async def final_checks(run: RunResult, guard: Guard, stack: ChaosStack, base: Baseline,
                       *, rss_bound_mib: float) -> None:
    """The checks every run ends with (see the module docstring)."""
    run.check("alive", guard.alive(), "running" if guard.alive() else f"exit {guard.proc.proc.poll() if guard.proc else '?'}")
    if guard.alive():
        ok, waited, state = await settle(guard, stack)
        run.check("no slots, waiters or server sessions left", ok, f"{'settled' if ok else 'NOT settled'} in {waited:.1f} s",
                  state)
        run.figures["settle_s"] = round(waited, 2)
        loop = asyncio.get_running_loop()
        start = loop.time()
        fds = guard.fds()
        while fds > base.fds and loop.time() - start < 5.0:
            await asyncio.sleep(POLL_S)  # descriptors close asynchronously; bounded
            fds = guard.fds()
        new_fds = {fd: what for fd, what in guard.fd_targets().items() if base.fd_targets.get(fd) != what}
        run.check("fds back to start", fds <= base.fds, f"{base.fds} -> {fds}",
                  "" if fds <= base.fds else f"new: {new_fds}"[:300])
        rss = guard.rss()
        growth = (rss - base.rss_kib) / 1024
        run.figures.update(rss_kib_after_warmup=base.rss_kib, rss_kib_end=rss, rss_growth_mib=round(growth, 2))
        run.check("rss growth after warm-up", growth <= rss_bound_mib,
                  f"{base.rss_kib / 1024:.1f} -> {rss / 1024:.1f} MiB (+{growth:.1f}, bound {rss_bound_mib:g})")
        ok, why = await served(guard)
        run.check("normal client served", ok, "yes" if ok else "no", why)
    code = guard.stop()
    run.figures["pgguard_exit_code"] = code
    text = guard.log_text()
    problems, unframed, forged = scan_log(text)
    run.log_problems = problems[:20]
    run.figures["log_excerpts"] = problem_excerpts(text)
    run.figures["log_problem_lines"] = len(problems)
    run.check("no traceback/ERROR in log", not problems, f"{len(problems)} lines",
              (problems[0] if problems else ""))
    run.check("log lines well-formed (no forged lines)", unframed == 0 and forged == 0,
              f"{unframed} unframed, {forged} forged")


# ------------------------------------------------------------------------------ fuzz


_ODD_NAMES: Final = [
    b"\xff\xfe\xfd", b"caf\xc3", b"\xc0\x80", b"a\x01b\x02c", b"\x1b[31mred\x1b[0m",
    b"line1\n" + FORGED_MARKER.encode() + b" level=ERROR event=forged", b"\r\n\r\n",
    b"tab\tname", b"\x7f\x7f", b"x" * 300, b"\xe2\x80\xae" + b"rtl", b"",
]


def _odd_name(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.4:
        return rng.choice(_ODD_NAMES)
    if pick < 0.7:
        return rng.randbytes(rng.randrange(1, 40)).replace(b"\x00", b"\x01")
    if pick < 0.8:
        return b"\n".join([FORGED_MARKER.encode()] * rng.randrange(1, 20))
    return f"fuzz{rng.randrange(1_000_000)}".encode()


def _client_hello(alpn: list[str] | None = None) -> bytes:
    """A real TLS ClientHello record (what ``ssl`` sends first), for direct-TLS fuzzing and drips."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


_HELLO_CACHE: dict[str, bytes] = {}


def hello(alpn: str | None) -> bytes:
    key = alpn or ""
    if key not in _HELLO_CACHE:
        _HELLO_CACHE[key] = _client_hello([alpn] if alpn else None)
    return _HELLO_CACHE[key]


def big_hello() -> bytes:
    """A ClientHello offering ``postgresql`` plus six 250-byte ALPN names: about 2,000 bytes.

    The longer the ClientHello, the more one-byte records, and the plainer the difference
    between sniffing that is linear in the bytes received and sniffing that is quadratic.
    """
    key = "big"
    if key not in _HELLO_CACHE:
        _HELLO_CACHE[key] = _client_hello(["postgresql"] + [f"{i}" * 250 for i in range(6)])
    return _HELLO_CACHE[key]


def one_byte_records(record: bytes) -> list[bytes]:
    """Re-frame a TLS handshake record as one-byte records (legal TLS fragmentation)."""
    kind, version = record[0:1], record[1:3]
    payload = record[5:]
    return [kind + version + b"\x00\x01" + payload[i : i + 1] for i in range(len(payload))]


def fuzz_packet(rng: random.Random) -> tuple[str, bytes]:
    """One mutated startup-phase byte string and its family name."""
    family = rng.choices(
        ["startup30", "startup32", "startup_other", "ssl", "gssenc", "cancel", "direct_tls", "random"],
        weights=[30, 8, 4, 12, 8, 8, 10, 6],
    )[0]
    if family.startswith("startup"):
        protocol = {"startup30": PROTOCOL_3_0, "startup32": PROTOCOL_3_2}.get(
            family, rng.choice([0x00020000, 0x00040000, 0x0003FFFF, 0, 0xFFFFFFFF, 1234]))
        params = [(b"user", _odd_name(rng)), (b"database", _odd_name(rng))]
        if rng.random() < 0.5:
            params.append((b"application_name", _odd_name(rng)))
        if rng.random() < 0.2:
            params.append((_odd_name(rng), _odd_name(rng)))
        if rng.random() < 0.1:
            params.append((b"options", b"-c " + _odd_name(rng)))
        if rng.random() < 0.05:
            params = [(b"database", b"x")]  # no user
        if rng.random() < 0.05:
            params.append((b"_pq_.chaos", b"1"))  # protocol extension option
        data = startup_packet(rng.sample(params, len(params)), protocol)
        if rng.random() < 0.05:
            data = data[:-1]  # no final terminator
    elif family in ("ssl", "gssenc"):
        code = SSL_REQUEST_CODE if family == "ssl" else GSSENC_REQUEST_CODE
        length = rng.choice([8, 8, 8, 4, 7, 9, 12, 16, 10001, 0x7FFFFFFF])
        data = struct.pack("!II", length, code)
        if rng.random() < 0.3:
            data += startup_for("fuzz", "fuzz") if rng.random() < 0.5 else rng.randbytes(20)
    elif family == "cancel":
        # A well-formed CancelRequest is forwarded to the server (a process fork there): rare.
        length = 16 if rng.random() < 0.05 else rng.choice([8, 12, 15, 17, 20, 4, 0xFFFFFFFF])
        data = struct.pack("!III", length, CANCEL_REQUEST_CODE, rng.randrange(1 << 31)) + struct.pack("!I", rng.randrange(1 << 32))
        data = data[: max(8, min(len(data), length))] if length < 16 and rng.random() < 0.5 else data
    elif family == "direct_tls":
        base = hello(rng.choice(["postgresql", "http/1.1", None]))
        pick = rng.random()
        if pick < 0.3:
            data = b"\x16\x03\x01" + rng.randbytes(rng.randrange(0, 80))
        elif pick < 0.6:
            data = base[: rng.randrange(1, len(base))]
        else:
            data = bytearray(base)
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(5, len(data))] = rng.randrange(256)
            data = bytes(data)
    else:
        data = rng.randbytes(rng.randrange(1, 64))
    # Generic mutations on top.
    roll = rng.random()
    if roll < 0.1 and len(data) >= 4:
        data = struct.pack("!I", rng.choice([0, 3, 5, 10001, 10_000_000, 0x7FFFFFFF, 0xFFFFFFFF])) + data[4:]
    elif roll < 0.2 and len(data) > 1:
        data = data[: rng.randrange(1, len(data))]
    elif roll < 0.25:
        data = data + rng.randbytes(rng.randrange(1, 32))
    elif roll < 0.3 and data:
        flipped = bytearray(data)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        data = bytes(flipped)
    return family, data


def _classify_reply(conn: Conn) -> str:
    if not conn.buf:
        return "reset" if conn.reset else ("eof" if conn.eof else "silent")
    first = conn.buf[:1]
    if first == b"E":
        return "E:" + (first_error(conn.buf) or "partial")
    if first in (b"S", b"N"):
        return first.decode()
    if conn.buf[:1] == b"\x15" or conn.buf[:1] == b"\x16":
        return "tls"
    return "other:" + first.hex()


_CONSOLE_GARBAGE: Final = [
    b"P\x00\x00\x00\x06ab",                               # Parse: no terminators
    b"P\x00\x00\x00\x07s\x00x",                           # Parse: query not terminated
    b"P\x00\x00\x00\x0f\x00select 1\x00\xff",             # Parse: truncated parameter count
    b"B\x00\x00\x00\x05\x00",                             # Bind: statement name missing
    b"B\x00\x00\x00\x0a\x00\x00\x00\x05\x00\x01",         # Bind: format count past the end
    b"E\x00\x00\x00\x05p",                                # Execute: portal not terminated
    b"E\x00\x00\x00\x06\x00\x00",                         # Execute: row count truncated
    b"Q\x00\x00\x00\x08SHOW",                             # Query without NUL
    b"Q\x00\x00\x00\x05\xff",                             # Query: not UTF-8, no NUL
    b"Q\x00\x00\x00\x07\xff\xfe\x00",                     # Query: not UTF-8
    b"D\x00\x00\x00\x05X",                                # Describe: bad kind, no name
    b"C\x00\x00\x00\x04",                                 # Close: empty
    b"Q\x00\x00\x00\x03",                                 # length below 4
    b"Q\xff\xff\xff\xff",                                 # huge length
    b"\x01\x00\x00\x00\x04",                              # unknown message type
]


async def fuzz_run(stack: ChaosStack, settings: ChaosSettings, run: RunResult) -> None:
    guard = stack.guard("fuzz", settings, tls=True, login_timeout=2.0)
    guard.start()
    rng = random.Random(20261202)
    families: Counter[str] = Counter()
    console_by_message: Counter[str] = Counter()

    async def shot(i: int) -> str:
        family, data = fuzz_packet(rng)
        families[family] += 1
        conn = await Conn.open(guard.port, rst=True)
        try:
            mode = i % 4
            if mode == 0:  # send and reset at once
                await conn.send(data)
                return "sent-rst"
            if mode == 1 and len(data) > 2:  # split in two writes
                cut = rng.randrange(1, len(data))
                await conn.send(data[:cut])
                await asyncio.sleep(0)
                await conn.send(data[cut:])
            else:
                await conn.send(data)
            if mode == 3:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_WR)  # FIN after the packet
            await conn.read_until(lambda b: len(b) > 0, timeout=0.5 if mode == 3 else 0.2)
            return _classify_reply(conn)
        finally:
            conn.close(rst=True)

    async def console_shot(i: int) -> str:
        conn, ok = await login(guard.port, ADMIN_USER, ADMIN_DB, timeout=5.0)
        try:
            if not ok:
                return "login-failed:" + conn.outcome()
            which = i % len(_CONSOLE_GARBAGE)
            await conn.send(_CONSOLE_GARBAGE[which])
            await conn.read_until(lambda b: first_error(b) is not None, timeout=2.0)
            console_by_message[f"{_CONSOLE_GARBAGE[which][:12]!r}: {conn.outcome()}"] += 1
            return conn.outcome()
        finally:
            conn.close(rst=i % 2 == 0)

    warm = max(1, int(settings.fuzz_packets * settings.warmup))
    await run_pool(warm, settings.fuzz_concurrency, shot, deadline_s=120)
    base = await baseline(guard, stack)
    cpu0 = guard.cpu()
    outcomes, elapsed = await run_pool(settings.fuzz_packets, settings.fuzz_concurrency, shot, deadline_s=900)
    cpu = guard.cpu() - cpu0
    sent = settings.fuzz_packets - outcomes.get("not-run", 0)
    run.figures.update(
        packets=sent, seconds=round(elapsed, 1), packets_per_s=round(sent / elapsed),
        pgguard_cpu_s=round(cpu, 1), families=dict(families), replies=dict(outcomes.most_common(25)),
    )
    run.check("fuzz packets sent", sent >= settings.fuzz_packets, f"{sent:,} at {sent / elapsed:,.0f}/s")
    harness = sum(v for k, v in outcomes.items() if k.startswith("harness:"))
    run.check("harness errors", harness == 0, harness)

    # Odd names queued (role waiter, limit 0): /metrics and SHOW CLIENTS must still answer.
    held: list[Conn] = []
    for name in (b"\xff\xfe-db", b"caf\xc3", b"new\nline", FORGED_MARKER.encode() + b"\n" + FORGED_MARKER.encode()):
        conn = await Conn.open(guard.port)
        await conn.send(startup_for(WAIT_ROLE, name))
        held.append(conn)
    ok_metrics: bool
    why = why_clients = ""

    async def queued() -> bool:
        return (await guard.stats()).get("clients_waiting") == str(len(held))

    await await_condition(queued, 10)
    try:
        text = await guard.metrics()
        ok_metrics = "pgguard_clients_waiting" in text
    except Exception as exc:
        ok_metrics, why = False, f"{type(exc).__name__}: {exc}"[:200]
    try:
        rows = await guard.console("SHOW CLIENTS")
        ok_clients = len(rows) >= len(held)
    except Exception as exc:
        ok_clients, why_clients = False, f"{type(exc).__name__}: {exc}"[:200]
    run.check("/metrics answers with non-UTF-8 names queued", ok_metrics, "yes" if ok_metrics else "no", why)
    run.check("SHOW CLIENTS answers with odd names queued (asyncpg)", ok_clients, "yes" if ok_clients else "no",
              why_clients)
    for conn in held:
        conn.close()

    # Malformed frontend messages from a logged-in admin: 08P01, never XX000.
    console, _ = await run_pool(settings.console_sessions, 16, console_shot, deadline_s=300)
    run.figures["console_replies"] = dict(console)
    run.figures["console_replies_by_message"] = dict(sorted(console_by_message.items()))
    xx = sum(v for k, v in console.items() if k.startswith("E:XX"))
    run.check("console: malformed messages get 08P01, never XX000", xx == 0 and console.get("E:08P01", 0) > 0,
              f"XX000 {xx}, 08P01 {console.get('E:08P01', 0)} of {settings.console_sessions}")
    await final_checks(run, guard, stack, base, rss_bound_mib=16)


# ----------------------------------------------------------------------- disconnects


PHASES: Final = ("mid-startup", "queued", "mid-dial", "mid-scram", "mid-query", "mid-result", "idle-in-tx")
# Shares of the disconnects (the phases that reach the server cost it a process each).
PHASE_WEIGHTS: Final = (25, 20, 11, 11, 11, 11, 11)
BIG_RESULT_SQL: Final = "SELECT repeat('x', 2000) FROM generate_series(1, 50000)"
BIG_COPY_SQL: Final = "COPY (SELECT repeat('x', 2000) FROM generate_series(1, 100000)) TO STDOUT"


def _sasl_initial() -> bytes:
    mech = b"SCRAM-SHA-256\x00"
    first = b"n,,n=,r=" + os.urandom(18).hex().encode()
    body = mech + struct.pack("!I", len(first)) + first
    return b"p" + struct.pack("!I", len(body) + 4) + body


def _auth_code(buf: bytes | bytearray) -> int | None:
    for tag, body in messages(buf):
        if tag == ord("R") and len(body) >= 4:
            code: int = struct.unpack_from("!I", body)[0]
            return code
    return None


async def disconnect_shot(port: int, phase: str, rst: bool, rng: random.Random) -> str:
    """Open a session, take it to ``phase``, and drop it (FIN or RST); returns how far it got."""
    conn = await Conn.open(port, rst=rst)
    try:
        if phase == "mid-startup":
            packet = startup_for(CHAOS_ROLE, CHAOS_DB)
            await conn.send(packet[: rng.randrange(1, len(packet))])
            return phase
        if phase == "queued":
            await conn.send(startup_for(WAIT_ROLE, CHAOS_DB))
            if rng.random() < 0.5:
                await conn.read_until(lambda b: len(b) > 0, timeout=0.02)
            return phase if not conn.buf else "queued:" + conn.outcome()
        if phase == "mid-dial":
            await conn.send(startup_for(CHAOS_ROLE, CHAOS_DB))
            return phase
        if phase == "mid-scram":
            await conn.send(startup_for(SCRAM_ROLE, CHAOS_DB))
            if not await conn.read_until(lambda b: _auth_code(b) == 10 or first_error(b) is not None
                                         or has_ready(b), 20) or _auth_code(conn.buf) != 10:
                return "mid-scram:no-sasl:" + conn.outcome()
            if rng.random() < 0.5:
                conn.buf.clear()
                await conn.send(_sasl_initial())
                await conn.read_until(lambda b: _auth_code(b) == 11 or first_error(b) is not None, 20)
            return phase
        await conn.send(startup_for(CHAOS_ROLE, CHAOS_DB))
        if not await conn.read_until(lambda b: has_ready(b) or first_error(b) is not None, 30) or not has_ready(conn.buf):
            return f"{phase}:no-login:{conn.outcome()}"
        conn.buf.clear()
        if phase == "mid-query":
            await conn.send(query_message("SELECT pg_sleep(60)"))
            await asyncio.sleep(rng.random() * 0.02)  # inside the query, at some point
        elif phase == "mid-result":
            await conn.send(query_message(BIG_COPY_SQL if rng.random() < 0.5 else BIG_RESULT_SQL))
            await conn.read_until(lambda b: conn.received > 0, 10)  # the result has started
        elif phase == "idle-in-tx":
            await conn.send(query_message("BEGIN; SELECT 1"))
            await conn.read_until(lambda b: has_ready(b, b"T"), 10)
        elif phase == "idle":  # done: with a Terminate or without ([pool]: the session is reused)
            await conn.send(query_message("SELECT 1"))
            await conn.read_until(lambda b: has_ready(b, b"I"), 10)
            if rng.random() < 0.5:
                await conn.send(TERMINATE)
        return phase
    finally:
        conn.close(rst=rst)


async def abandoned_copy_probe(guard: Guard, pause_s: float) -> float:
    """A client starts a large COPY TO STDOUT, stops reading, then closes: seconds until its slot frees."""
    conn, ok = await login(guard.port, CHAOS_ROLE)
    if not ok:
        conn.close()
        return -1.0
    await conn.send(query_message("COPY (SELECT repeat('x', 2000) FROM generate_series(1, 200000)) TO STDOUT"))
    await conn.read_until(lambda b: conn.received > 256 * 1024, 10)
    await asyncio.sleep(pause_s)  # the client stops reading: pgguard pauses the server side
    loop = asyncio.get_running_loop()
    closed_at = loop.time()
    conn.close()

    async def free() -> bool:
        return (await guard.stats()).get("sessions_active") == "0"

    ok, _ = await await_condition(free, 30)
    return loop.time() - closed_at if ok else 30.0


async def disconnects_run(stack: ChaosStack, settings: ChaosSettings, run: RunResult) -> None:
    guard = stack.guard("disconnects", settings, tls=False, login_timeout=5.0)
    guard.start()
    base = await _disconnect_storm(guard, stack, settings, run, PHASES, PHASE_WEIGHTS)
    releases = [round(await abandoned_copy_probe(guard, settings.copy_pause_s), 2) for _ in range(settings.copy_probes)]
    run.figures["abandoned_copy_release_s"] = releases
    run.check("slot freed promptly after an abandoned COPY", max(releases) <= 2.0 and min(releases) >= 0,
              f"{releases} s (close_timeout {settings.close_timeout:g})")
    await final_checks(run, guard, stack, base, rss_bound_mib=16)


# [pool] reuse on: pgguard runs the SCRAM exchange itself, hands warm sessions out, takes them
# back and resets them; the same disconnects at every phase, plus clients that leave idle.
REUSE_CONF: Final = f"""
[pool]
reuse = true
trusted_roles = ["{CHAOS_ROLE}", "{WAIT_ROLE}"]
server_idle_timeout = 0.5
"""
REUSE_PHASES: Final = (*PHASES, "idle")
REUSE_WEIGHTS: Final = (*PHASE_WEIGHTS, 30)


async def reuse_run(stack: ChaosStack, settings: ChaosSettings, run: RunResult) -> None:
    guard = stack.guard("reuse", settings, tls=False, login_timeout=5.0, extra=REUSE_CONF,
                        backend_extra=f'monitor_dsn = "{stack.pg.dsn()}"')
    guard.start()
    # One SCRAM login first: pgguard's lookup connection (monitor_dsn) opens with it and stays,
    # so it is in the baseline's descriptors.
    import asyncpg

    conn = await asyncpg.connect(host=HOST, port=guard.port, user=SCRAM_ROLE, password=SCRAM_PASSWORD,
                                 database=CHAOS_DB, ssl=False, timeout=15)
    run.check("SCRAM login checked by pgguard", await conn.fetchval("select 1") == 1, "select 1 answered")
    await conn.close()
    base = await _disconnect_storm(guard, stack, settings, run, REUSE_PHASES, REUSE_WEIGHTS)
    metrics = await guard.metrics()
    reused = metric_sum(metrics, "pgguard_pool_sessions_reused_total")
    created = metric_sum(metrics, "pgguard_pool_sessions_created_total")
    run.figures.update(server_sessions_created=created, server_sessions_reused=reused)
    run.check("warm sessions reused", reused > 0, f"{reused:,.0f} reused, {created:,.0f} created")
    await final_checks(run, guard, stack, base, rss_bound_mib=16)


async def _disconnect_storm(guard: Guard, stack: ChaosStack, settings: ChaosSettings, run: RunResult,
                            phases: tuple[str, ...], weights: tuple[int, ...]) -> Baseline:
    """Clients that drop (FIN or RST) at each of ``phases``; returns the baseline taken after
    the warm-up share of them."""
    rng = random.Random(7)
    plan = rng.choices(phases, weights=weights, k=settings.disconnects)

    def shot_for(plan: list[str]) -> Callable[[int], Awaitable[str]]:
        async def shot(i: int) -> str:
            rst = i % 2 == 1
            got = await disconnect_shot(guard.port, plan[i], rst, rng)
            return f"{got} {'rst' if rst else 'fin'}"

        return shot

    warm_plan = rng.choices(phases, weights=weights, k=max(len(phases), int(settings.disconnects * settings.warmup)))
    await run_pool(len(warm_plan), settings.disconnect_concurrency, shot_for(warm_plan), deadline_s=300)
    base = await baseline(guard, stack)
    outcomes, elapsed = await run_pool(settings.disconnects, settings.disconnect_concurrency, shot_for(plan),
                                       deadline_s=1200)
    done = settings.disconnects - outcomes.get("not-run", 0)
    by_phase: Counter[str] = Counter()
    for key, n in outcomes.items():
        phase = key.split(" ")[0]
        by_phase[phase if phase in phases else "other"] += n
    reached = sum(by_phase[p] for p in phases)
    run.figures.update(disconnects=done, seconds=round(elapsed, 1), per_s=round(done / elapsed),
                       by_phase=dict(by_phase), outcomes=dict(outcomes.most_common(30)))
    run.check("disconnects done", done >= settings.disconnects, f"{done:,} in {elapsed:.0f} s")
    run.check("every phase reached", all(by_phase[p] > 0 for p in phases) and reached >= 0.95 * done,
              f"{reached:,} of {done:,} reached their phase",
              ", ".join(f"{k}={v}" for k, v in outcomes.most_common() if k.split(" ")[0] not in phases)[:300])
    await settle(guard, stack)
    return base


# ------------------------------------------------------------------------- slowloris


async def slowloris_run(stack: ChaosStack, settings: ChaosSettings, run: RunResult) -> None:
    login_timeout = settings.slowloris_login_timeout
    guard = stack.guard("slowloris", settings, tls=True, login_timeout=login_timeout)
    guard.start()
    loop = asyncio.get_running_loop()
    stop_at = 0.0
    outcomes: Counter[str] = Counter()
    closed_after: list[float] = []
    drip_times: list[float] = []
    tls_records_sent = [0]

    async def dripper(i: int) -> str:
        """Half complete a login one byte at a time; half never finish and must be closed."""
        finishing = i % 2 == 0
        if finishing:
            packet = startup_for(CHAOS_ROLE, CHAOS_DB, "slow")
            interval = login_timeout * 0.3 / len(packet)
            give_up = stop_at
        else:
            packet = struct.pack("!I", 9000) + struct.pack("!I", PROTOCOL_3_0) + b"user\x00" + b"a" * 8990
            interval = 0.1
            # Drip until pgguard closes the connection, or well past client_login_timeout.
            give_up = loop.time() + login_timeout + 10.0
        conn = await Conn.open(guard.port, nodelay=True)
        opened = loop.time()
        try:
            for pos in range(len(packet)):
                if loop.time() > give_up:
                    return "harness-stopped" if finishing else "still-open"
                if not await conn.send(packet[pos : pos + 1]) or _peer_closed(conn.sock):
                    closed_after.append(loop.time() - opened)
                    return "closed-by-pgguard" if not finishing else "finisher:closed-by-pgguard"
                if pos < len(packet) - 1:
                    # The drip itself. Reading here instead (wait_for per byte) costs the
                    # harness too much CPU with hundreds of drippers and stretches the drip.
                    await asyncio.sleep(interval)
            if finishing:
                drip_times.append(loop.time() - opened)
                await conn.read_until(lambda b: has_ready(b) or first_error(b) is not None, 20)
                if has_ready(conn.buf):
                    await conn.send(TERMINATE)
                    return "served"
                return "finisher:" + conn.outcome()
            return "still-open"
        finally:
            conn.close(rst=True)

    async def tls_dripper(i: int) -> str:
        records = one_byte_records(big_hello())
        conn = await Conn.open(guard.port, nodelay=True)
        try:
            for rec in records:
                if loop.time() > stop_at:
                    return "harness-stopped"
                if not await conn.send(rec) or _peer_closed(conn.sock):
                    # client_login_timeout fired first: fine, the CPU per record is the point.
                    return "closed-by-pgguard"
                tls_records_sent[0] += 1
                await asyncio.sleep(interval)  # the drip itself, not a sync
            await conn.read_until(lambda b: len(b) > 0, 5)
            return "tls-answered" if conn.buf[:1] == b"\x16" else "tls:" + conn.outcome()
        finally:
            conn.close(rst=True)

    # Warm-up: a few of each.
    stop_at = loop.time() + 30
    await run_pool(max(2, int(settings.slowloris_clients * settings.warmup)), 1000, dripper, deadline_s=30)
    base = await baseline(guard, stack)

    cpu0 = guard.cpu()
    stop_at = loop.time() + settings.slowloris_seconds
    probe_task = asyncio.ensure_future(_probe_during(guard, delay=min(1.0, settings.slowloris_seconds / 2)))
    outcomes, elapsed = await run_pool(settings.slowloris_clients, settings.slowloris_clients, dripper,
                                       deadline_s=settings.slowloris_seconds + 30)
    plain_cpu = guard.cpu() - cpu0
    probe_ok, probe_s = await probe_task
    run.figures.update(slow_clients=settings.slowloris_clients, seconds=round(elapsed, 1),
                       outcomes=dict(outcomes), pgguard_cpu_s=round(plain_cpu, 2),
                       cpu_ms_per_slow_client=round(plain_cpu * 1000 / settings.slowloris_clients, 2),
                       normal_client_during_s=round(probe_s, 3),
                       max_close_after_s=round(max(closed_after, default=0.0), 2),
                       finisher_drip_s_max=round(max(drip_times, default=0.0), 2))
    run.check("normal client served during slowloris", probe_ok, f"{probe_s:.2f} s")
    stragglers = outcomes.get("still-open", 0)
    run.check("stalled clients closed at client_login_timeout", stragglers == 0 and
              max(closed_after, default=0.0) <= login_timeout + 5.0,
              f"{len(closed_after)} closed, max after {max(closed_after, default=0.0):.1f} s "
              f"(timeout {login_timeout:g}), {stragglers} still open")
    finishers = settings.slowloris_clients // 2 + settings.slowloris_clients % 2
    run.check("slow but complete logins served", outcomes.get("served", 0) == finishers,
              f"{outcomes.get('served', 0)} of {finishers}")

    # TLS drip: direct TLS, the ClientHello as one-byte records, one every interval, until it
    # is all sent or client_login_timeout closes the connection (the number of separate reads
    # pgguard makes is what a quadratic sniffer pays for, so the drip must not be too fast).
    n = settings.tls_drip_clients
    n_records = len(one_byte_records(big_hello()))
    interval = settings.tls_drip_interval_s
    tls_records_sent[0] = 0
    idle0 = guard.cpu()
    stop_at = loop.time() + login_timeout + 10.0
    tls_outcomes, tls_elapsed = await run_pool(n, n, tls_dripper, deadline_s=login_timeout + 20.0)
    tls_cpu = guard.cpu() - idle0
    per_client = tls_cpu / max(1, n)
    sent = max(1, tls_records_sent[0])
    per_record = tls_cpu / sent
    run.figures.update(tls_drip_clients=n, tls_drip_records_each=n_records, tls_drip_interval_ms=round(interval * 1000, 2),
                       tls_drip_seconds=round(tls_elapsed, 1), tls_drip_records_sent=sent,
                       tls_drip_outcomes=dict(tls_outcomes), tls_drip_cpu_s=round(tls_cpu, 2),
                       tls_drip_cpu_ms_per_client=round(per_client * 1000, 1),
                       tls_drip_cpu_us_per_record=round(per_record * 1e6, 1))
    # Linear sniffing costs well under 250 us of CPU a record (measured: 20-80 us, handshake
    # included); quadratic sniffing costs more with every record.
    bound = 250e-6
    run.check("TLS drip costs linear CPU", per_record <= bound,
              f"{per_record * 1e6:.0f} us CPU per 1-byte record ({sent:,} records, {per_client * 1000:.0f} ms "
              f"per client; bound {bound * 1e6:.0f} us)")
    await final_checks(run, guard, stack, base, rss_bound_mib=16)


def _peer_closed(sock: socket.socket) -> bool:
    """True when the peer has closed (EOF or reset); a non-blocking peek, data left unread."""
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def _probe_during(guard: Guard, delay: float) -> tuple[bool, float]:
    await asyncio.sleep(delay)  # let the attack build up first
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    ok, _ = await served(guard)
    return ok, loop.time() - t0


# ---------------------------------------------------------------------- server faults


async def faulted_client(port: int) -> str:
    """Log in (queueing if need be), run a long query, and report how the session ended.

    ``ok-...``: logged in, then ended by an ErrorResponse (or still open at the end);
    ``turned-away:E:...``: never logged in, got an ErrorResponse; ``turned-away:eof``: never
    logged in and got a bare EOF (no ErrorResponse), which PostgreSQL never does to a client
    it turns away.
    """
    conn = await Conn.open(port)
    try:
        await conn.send(startup_for(CHAOS_ROLE, CHAOS_DB, "faulted"))
        await conn.read_until(lambda b: has_ready(b) or first_error(b) is not None, 60)
        if not has_ready(conn.buf):
            return "turned-away:" + conn.outcome()
        conn.buf.clear()
        await conn.send(query_message("SELECT pg_sleep(60)"))
        await conn.read_until(lambda b: first_error(b) is not None, 60)
        return "logged-in:" + conn.outcome()
    finally:
        conn.close(rst=True)


async def _wait_pg_up(stack: ChaosStack, timeout: float = 60.0) -> bool:
    async def up() -> bool:
        return await asyncio.to_thread(stack.pg.psql, "SELECT 1") == "1"

    ok, _ = await await_condition(up, timeout)
    return ok


async def _wait_active(stack: ChaosStack, n: int, timeout: float = 30.0) -> bool:
    async def active() -> bool:
        out = await asyncio.to_thread(
            stack.pg.psql,
            f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{CHAOS_ROLE}' AND state = 'active'")
        return int(out) >= n

    ok, _ = await await_condition(active, timeout)
    return ok


async def faults_run(stack: ChaosStack, settings: ChaosSettings, run: RunResult) -> None:
    guard = stack.guard("faults", settings, tls=False, login_timeout=5.0)
    guard.start()
    limit = max(2, settings.fault_clients // 2)
    await guard.console(f"SET LIMIT ROLE {CHAOS_ROLE} = {limit}")
    outcomes: Counter[str] = Counter()
    by_fault: dict[str, dict[str, int]] = {}

    async def round_of(fault: str) -> None:
        tasks = [asyncio.ensure_future(faulted_client(guard.port)) for _ in range(settings.fault_clients)]
        try:
            if not await _wait_active(stack, limit):
                outcomes["setup:sessions-not-active"] += 1

            async def queued() -> bool:
                return int((await guard.stats()).get("clients_waiting", "0")) >= settings.fault_clients - limit

            await await_condition(queued, 10)
            if fault == "pg_terminate_backend":
                await asyncio.to_thread(stack.pg.terminate, [CHAOS_ROLE])
            elif fault == "sigkill_backend":
                pid = await asyncio.to_thread(
                    stack.pg.psql,
                    f"SELECT pid FROM pg_stat_activity WHERE usename = '{CHAOS_ROLE}' AND state = 'active' LIMIT 1")
                if pid.isdigit():
                    os.kill(int(pid), signal.SIGKILL)
                if not await _wait_pg_up(stack):
                    outcomes["setup:server-did-not-recover"] += 1
                await asyncio.to_thread(stack.pg.terminate, [CHAOS_ROLE])  # those admitted after recovery
            elif fault == "pg_ctl_stop_fast":
                await asyncio.to_thread(stack.pg_ctl, "-m", "fast", "-w", "-t", "60", "stop")
                await asyncio.to_thread(stack.pg_ctl, "-w", "-t", "60", "-l", str(stack.pg.log_path), "start")
                if not await _wait_pg_up(stack):
                    outcomes["setup:server-did-not-restart"] += 1
                await asyncio.to_thread(stack.pg.terminate, [CHAOS_ROLE])
            # The queued clients are admitted as the first ones go: end them too, sweep by
            # sweep, each once someone is running its query (bounded).
            for _ in range(4 * settings.fault_clients):
                pending = [t for t in tasks if not t.done()]
                if not pending:
                    break
                await _wait_active(stack, min(len(pending), limit), timeout=5)
                await asyncio.to_thread(stack.pg.terminate, [CHAOS_ROLE])
                await asyncio.wait(pending, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        tally = by_fault.setdefault(fault, {})
        for r in results:
            key = r if isinstance(r, str) else f"harness:{type(r).__name__}"
            outcomes[key] += 1
            tally[key] = tally.get(key, 0) + 1

    # Warm-up: logins and one terminate.
    warm = [asyncio.ensure_future(faulted_client(guard.port)) for _ in range(2)]
    await _wait_active(stack, 2)
    await asyncio.to_thread(stack.pg.terminate, [CHAOS_ROLE])
    await asyncio.gather(*warm, return_exceptions=True)
    base = await baseline(guard, stack)
    t0 = time.perf_counter()
    for _ in range(settings.fault_rounds):
        for fault in ("pg_terminate_backend", "sigkill_backend", "pg_ctl_stop_fast"):
            await round_of(fault)
    run.figures.update(rounds=settings.fault_rounds, clients_per_round=settings.fault_clients, limit=limit,
                       seconds=round(time.perf_counter() - t0, 1), by_fault=by_fault)
    bare = {k: v for k, v in outcomes.items() if k.startswith("turned-away:") and not k.startswith("turned-away:E:")}
    run.check("every client turned away got an ErrorResponse", not bare,
              f"{sum(bare.values())} bare EOF/reset", ", ".join(f"{k}={v}" for k, v in bare.items()))
    setup = {k: v for k, v in outcomes.items() if k.startswith(("setup:", "harness:"))}
    run.check("faults injected as planned", not setup, ", ".join(f"{k}={v}" for k, v in setup.items()) or "yes")
    await final_checks(run, guard, stack, base, rss_bound_mib=16)


# --------------------------------------------------------------------------- fd limit


# How pgguard may say it ran out of descriptors or refused a client past its total cap.
FD_LOG: Final = re.compile(
    r"emfile|enfile|too many open files|client_connections|too.many.clients|fd_limit|accept_fail",
    re.IGNORECASE,
)


async def fdlimit_run(stack: ChaosStack, settings: ChaosSettings, run: RunResult) -> None:
    guard = stack.guard("fdlimit", settings, tls=False, login_timeout=30.0, nofile=settings.fd_nofile)
    guard.start()
    loop = asyncio.get_running_loop()
    release = asyncio.Event()

    async def holder(i: int) -> str:
        """A queued client (role waiter) that stays until released; reports what pgguard said."""
        conn = await Conn.open(guard.port)
        try:
            await conn.send(startup_for(WAIT_ROLE, CHAOS_DB, "fdlimit"))
            reader = asyncio.ensure_future(conn.read_until(lambda b: len(b) > 0, 120))
            waiter = asyncio.ensure_future(release.wait())
            await asyncio.wait([reader, waiter], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                return "held"
            return conn.outcome()
        finally:
            conn.close(rst=True)

    warm = [asyncio.ensure_future(holder(i)) for i in range(10)]

    async def ten_queued() -> bool:
        return (await guard.stats()).get("clients_waiting") == "10"

    await await_condition(ten_queued, 10)
    release.set()
    await asyncio.gather(*warm, return_exceptions=True)
    release.clear()
    base = await baseline(guard, stack)
    log_before = len(guard.log_text())

    tasks = [asyncio.ensure_future(holder(i)) for i in range(settings.fd_clients)]

    async def saturated() -> bool:
        done = sum(t.done() for t in tasks)
        return done + guard.fds() >= settings.fd_nofile - 2 or done >= settings.fd_clients - settings.fd_nofile

    await await_condition(saturated, 15)
    cpu0, t0 = guard.cpu(), loop.time()
    # At the limit: a normal client, and pgguard's CPU over a quiet second (no accept spin).
    at_limit_ok, at_limit_why = await served(guard)
    await asyncio.sleep(1.0)  # a window to measure CPU in, not a synchronisation
    busy = (guard.cpu() - cpu0) / (loop.time() - t0)
    fds_at_limit = guard.fds()
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    outcomes = Counter(r if isinstance(r, str) else f"harness:{type(r).__name__}" for r in results)
    log_text = guard.log_text()[log_before:]
    logged = len(FD_LOG.findall(log_text))
    silent = outcomes.get("eof", 0) + outcomes.get("reset", 0)
    refused = sum(v for k, v in outcomes.items() if k.startswith("E:53300"))
    run.figures.update(nofile=settings.fd_nofile, clients=settings.fd_clients, fds_at_limit=fds_at_limit,
                       outcomes=dict(outcomes), fd_log_lines=logged, cpu_share_at_limit=round(busy, 3),
                       normal_client_at_limit=at_limit_why)
    run.check("clients past the fd limit refused or kept, never dropped silently", silent == 0,
              f"{silent} dropped without a word, {refused} got 53300, {outcomes.get('held', 0)} held")
    run.check("fd-limit refusals logged", logged > 0 or refused == 0 and silent == 0, f"{logged} log lines")
    run.check("no busy loop at the fd limit", busy < 0.5, f"{busy:.0%} of a core")
    await final_checks(run, guard, stack, base, rss_bound_mib=16)


# ----------------------------------------------------------------------------- memory


async def memory_run(stack: ChaosStack, settings: ChaosSettings, run: RunResult) -> None:
    guard = stack.guard("memory", settings, tls=True, login_timeout=5.0)
    guard.start()
    name_bytes = settings.memory_name_bytes

    def name_shot(prefix: str) -> Callable[[int], Awaitable[str]]:
        async def shot(i: int) -> str:
            user = f"{prefix}{i:08d}".ljust(name_bytes, "n")
            conn = await Conn.open(guard.port, rst=True)
            try:
                await conn.send(startup_for(user, CHAOS_DB))
                await conn.read_until(lambda b: first_error(b) is not None, 10)
                return conn.outcome()
            finally:
                conn.close(rst=True)

        return shot

    async def tls_rst(i: int) -> str:
        conn = await Conn.open(guard.port, rst=True)
        try:
            await conn.send(struct.pack("!II", 8, SSL_REQUEST_CODE))
            await conn.read_until(lambda b: len(b) > 0, 10)
            return "S" if conn.buf[:1] == b"S" else conn.outcome()
        finally:
            conn.close(rst=True)

    # Warm-up at full concurrency, long enough for the allocator's high-water mark to settle.
    warm_names = max(256, int(settings.memory_names * settings.warmup))
    warm_tls = max(1_000, int(settings.memory_tls_rsts * settings.warmup))
    await run_pool(warm_names, 128, name_shot("warm"), deadline_s=300)
    await run_pool(warm_tls, 64, tls_rst, deadline_s=300)
    base = await baseline(guard, stack)
    names, names_s = await run_pool(settings.memory_names, 128, name_shot("refused"), deadline_s=1200)
    await settle(guard, stack)
    rss_names = guard.rss()
    rsts, rsts_s = await run_pool(settings.memory_tls_rsts, 64, tls_rst, deadline_s=600)
    await settle(guard, stack, timeout=10)
    rss_tls = guard.rss()
    names_growth = (rss_names - base.rss_kib) / 1024
    tls_growth = (rss_tls - rss_names) / 1024
    run.figures.update(
        distinct_names=settings.memory_names, name_bytes=name_bytes, names_seconds=round(names_s, 1),
        names_outcomes=dict(names), names_rss_growth_mib=round(names_growth, 2),
        names_bytes_per_name=round((rss_names - base.rss_kib) * 1024 / settings.memory_names),
        tls_rsts=settings.memory_tls_rsts, tls_seconds=round(rsts_s, 1), tls_outcomes=dict(rsts),
        tls_rss_growth_mib=round(tls_growth, 2),
        tls_bytes_per_rst=round((rss_tls - rss_names) * 1024 / settings.memory_tls_rsts),
    )
    run.check("distinct refused names all got 53300", names.get("E:53300", 0) == settings.memory_names,
              f"{names.get('E:53300', 0):,} of {settings.memory_names:,}")
    # Nothing a refused client leaves may grow pgguard past the bound (a bounded cache of names
    # may fill up to its cap; the small modes cannot tell such a cache from a leak).
    bound = settings.memory_bound_mib
    run.check("RSS after distinct refused names", names_growth <= bound,
              f"+{names_growth:.1f} MiB for {settings.memory_names:,} names of {name_bytes} B (bound {bound:g})")
    run.check("RSS after SSLRequest-then-RST", tls_growth <= bound,
              f"+{tls_growth:.1f} MiB for {settings.memory_tls_rsts:,} connections (bound {bound:g})")
    await final_checks(run, guard, stack, base, rss_bound_mib=bound)


RUNS: Final[dict[str, Callable[[ChaosStack, ChaosSettings, RunResult], Awaitable[None]]]] = {
    "fuzz": fuzz_run,
    "disconnects": disconnects_run,
    "slowloris": slowloris_run,
    "faults": faults_run,
    "fdlimit": fdlimit_run,
    "memory": memory_run,
    "reuse": reuse_run,
}


# ----------------------------------------------------------------------------- driver


def _table(results: list[RunResult]) -> str:
    rows = [("run", "check", "result", "value")]
    for r in results:
        if r.error:
            rows.append((r.name, "run completed", "FAIL", r.error[:100]))
        for c in r.checks:
            rows.append((r.name, c.name, "PASS" if c.passed else "FAIL", c.value[:100]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def _run_all(stack: ChaosStack, settings: ChaosSettings, names: list[str]) -> list[RunResult]:
    results: list[RunResult] = []
    for name in names:
        run = RunResult(name)
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(RUNS[name](stack, settings, run), RUN_BUDGET_S[settings.mode])
        except Exception as exc:  # the run could not finish: reported as a failure, the rest go on
            import traceback

            run.error = f"{type(exc).__name__}: {exc}" if str(exc) else f"{type(exc).__name__} (run budget {RUN_BUDGET_S[settings.mode]:.0f} s)"
            traceback.print_exc()
        finally:
            stack.stop_guards()
        run.seconds = round(time.perf_counter() - t0, 1)
        failed = [c.name for c in run.checks if not c.passed]
        print(f"  ({run.seconds:.1f} s) " + ("all checks pass" if run.passed else f"FAILED: {', '.join(failed) or run.error}"),
              flush=True)
        for line in run.log_problems[:3]:
            print(f"    log: {line[:200]}")
        results.append(run)
    return results


def main_chaos(args: Any) -> int:
    """``python -m benchmarks chaos``: run, print the table, write JSON; 1 when a check failed."""
    names = list(RUNS) if not args.only else args.only.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        print(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}", file=sys.stderr)
        return 2
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    settings = ChaosSettings.for_mode(mode)
    machine = machine_info()
    tree = args.pgguard_tree.resolve() if args.pgguard_tree else None
    if tree is not None and not (tree / "pgguard" / "__init__.py").exists():
        print(f"--pgguard-tree {tree}: no pgguard/ package there", file=sys.stderr)
        return 2
    print(f"pgguard chaos, {mode} run, {machine['date']}, pgguard from {tree or REPO}; runs: {', '.join(names)}",
          flush=True)
    started = time.perf_counter()
    try:
        import uvloop

        runner: Callable[..., Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    with ChaosStack(tree, log_level=args.log_level) as stack:
        results = runner(_run_all(stack, settings, names))
    elapsed = time.perf_counter() - started
    machine.update(elapsed_s=round(elapsed, 1), mode=mode, pgguard_tree=str(tree or REPO))
    if tree is not None:
        # machine_info's pgguard_commit is this checkout's (the harness); record the tree's too.
        done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
        machine["pgguard_tree_commit"] = done.stdout.strip() or "unknown"
    print()
    print(_table(results))
    for r in results:
        if r.log_problems:
            print(f"\n{r.name}: first lines of pgguard's log that are problems ({r.figures.get('log_problem_lines')}):")
            for line in r.log_problems[:5]:
                print(f"  {line[:300]}")
    out: Path = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"chaos-{str(machine['date']).replace(':', '')}-{mode}.json"
    path.write_text(json.dumps({
        "machine": machine,
        "settings": dataclasses.asdict(settings),
        "passed": all(r.passed for r in results),
        "runs": [dataclasses.asdict(r) | {"passed": r.passed} for r in results],
    }, indent=2, default=str) + "\n")
    failed = sum(not c.passed for r in results for c in r.checks) + sum(bool(r.error) for r in results)
    print(f"\nwrote {path}\n{failed} check(s) failed; total {elapsed:.0f} s")
    return 1 if failed else 0
