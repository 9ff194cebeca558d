"""A lean PostgreSQL load generator: raw protocol 3.0 over asyncio protocols, one process.

Run as ``python -m benchmarks.loadgen MODE JSON`` (the harness does this); it prints one JSON
object per line on stdout. It speaks just enough of the protocol for connection-level load:
StartupMessage (no password: the throwaway cluster trusts loopback), read until
ReadyForQuery or an ErrorResponse, an optional simple Query, Terminate. It is deliberately
independent of ``pgguard.wire``: the thing under test does not build the load.

Modes
-----
``hammer``  ``workers`` connections in flight, each: connect, StartupMessage, read the first
            ErrorResponse or ReadyForQuery, close with RST (so no TIME_WAIT eats the ephemeral
            ports), open the next. Counts 53300 answers per second, for ``duration`` seconds or
            ``max_count`` connections. Plain sockets and epoll, no event loop (see ``hammer``).
``storm``   ``clients`` connections at once (at most ``connect_inflight`` TCP handshakes in
            flight), each: StartupMessage, wait (queued at the proxy), first server byte,
            ReadyForQuery, ``select 1`` (or ``extra.query``: the surge row's ``select
            pg_sleep(0.05)``), Terminate. Reports outcomes and the time from the
            StartupMessage to the first server byte (admission wait plus backend startup).
``hold``    open ``clients`` connections and send each a StartupMessage (answering SCRAM with
            ``extra.password``, as ``burst``); with
            ``until = "ready"`` wait for each ReadyForQuery (idle sessions), with
            ``until = "sent"`` wait for nothing (queued clients). Print ``{"event": "ready"}``,
            keep them open until a line arrives on stdin, then close them all.
``burst``   like ``storm``, but armed first: the process prints ``{"event": "armed"}``, waits
            for a line on stdin (so several load processes start their clients at the same
            moment), then opens ``clients`` connections at once. Each is timed from its
            connect call to the answer of ``select 1`` (``time.monotonic``, comparable between
            processes of one host); ``extra.password`` answers SCRAM-SHA-256 (a client of its
            own, below). Reports the first start and last answer, so the harness can compute
            the makespan over every process, and each served client's time.
``serial``  ``clients`` connections one at a time: connect, StartupMessage, ReadyForQuery,
            Terminate; reports the time from connect to ReadyForQuery (admission latency),
            per port when ``extra.ports`` names several (taken in turn).

Nothing here sleeps to synchronise; every wait is bounded by ``deadline`` seconds.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import resource
import select
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

PROTOCOL_3_0: Final = 196608
TERMINATE: Final = b"X\x00\x00\x00\x04"
SELECT_1: Final = b"Q\x00\x00\x00\x0dselect 1\x00"
_HEADER: Final = struct.Struct("!cI")
# SO_LINGER {on, 0 s}: close() sends RST instead of FIN, leaving no TIME_WAIT socket behind.
_LINGER_RST: Final = struct.pack("ii", 1, 0)


def startup_message(user: str, database: str, application_name: str = "pgguard-bench") -> bytes:
    body = struct.pack("!I", PROTOCOL_3_0)
    for key, value in (("user", user), ("database", database), ("application_name", application_name)):
        body += key.encode() + b"\x00" + value.encode() + b"\x00"
    body += b"\x00"
    return struct.pack("!I", len(body) + 4) + body


def sqlstate_of(body: bytes) -> str:
    for part in body.split(b"\x00"):
        if part[:1] == b"C":
            return part[1:].decode("ascii", "replace")
    return "?????"


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _Session(asyncio.Protocol):
    """One client connection driven by the messages it receives.

    ``outcome`` ends as ``served`` (query answered), ``ready`` (hold mode), ``admitted``
    (hammer mode, not rejected), ``rejected`` (53300 before any AuthenticationOk: a proxy),
    ``rejected_after_auth`` (53300 from the server itself), ``error:SQLSTATE``, ``closed`` (the server hung up without an error) or stays
    ``None`` while unfinished.
    """

    __slots__ = (
        "startup", "query", "until", "done", "transport", "buf", "outcome",
        "t_sent", "t_first", "t_done", "readies", "loop", "authed", "scram", "sql",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, startup: bytes, *, query: bool, until: str, sql: bytes = SELECT_1
    ) -> None:
        self.loop = loop
        self.startup = startup
        self.query = query
        self.sql = sql  # the simple Query sent after ReadyForQuery when ``query``
        self.until = until  # "first" (hammer), "ready" (hold), "served" (storm), "sent"
        self.done: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.outcome: str | None = None
        self.t_sent = 0.0
        self.t_first = 0.0
        self.t_done = 0.0
        self.readies = 0
        self.authed = False  # an AuthenticationOk arrived: a server, not a proxy, is answering
        self.scram: _Scram | None = None  # set to answer SCRAM-SHA-256 (burst mode)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport: no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        self.t_sent = self.loop.time()
        transport.write(self.startup)
        if self.until == "sent":
            self._finish("sent", close=False)

    def data_received(self, data: bytes) -> None:
        if not self.t_first:
            self.t_first = self.loop.time()
        buf = self.buf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 5:
            tag, length = _HEADER.unpack_from(buf, pos)
            stop = pos + 1 + length
            if stop > end:
                break
            if tag == b"E":
                code = sqlstate_of(bytes(buf[pos + 5 : stop]))
                if code == "53300":
                    # PostgreSQL authenticates before it checks limits; pgguard does not.
                    self._finish("rejected_after_auth" if self.authed else "rejected")
                else:
                    self._finish("error:" + code)
                return
            if tag == b"R":
                code = int.from_bytes(buf[pos + 5 : pos + 9], "big")
                if code == 0:
                    self.authed = True
                elif self.scram is not None and code in (10, 11):
                    self.transport.write(self.scram.answer(code, bytes(buf[pos + 9 : stop])))  # type: ignore[union-attr]
            if tag == b"Z":
                self.readies += 1
                if self.until == "first":
                    self._finish("admitted")
                    return
                if self.until == "ready":
                    self._finish("ready", close=False)
                elif self.readies == 1 and self.query:
                    self.transport.write(self.sql)  # type: ignore[union-attr]
                else:
                    self._finish("served")
                    return
            pos = stop
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.outcome is None:
            self._finish("closed", close=False)
        elif not self.done.done():
            self.done.set_result(None)

    def _finish(self, outcome: str, *, close: bool = True) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.t_done = self.loop.time()
        if close and self.transport is not None:
            if outcome in ("served", "admitted"):
                self.transport.write(TERMINATE)
                self.transport.close()
            else:
                self.abort()
        if not self.done.done():
            self.done.set_result(None)

    def abort(self) -> None:
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
        transport.abort()


class _Scram:
    """The client side of SCRAM-SHA-256 without channel binding, as libpq answers it."""

    __slots__ = ("password", "nonce", "first_bare")
    # PBKDF2 per (password, salt, iterations): the load should cost the target, not us.
    _salted: dict[tuple[bytes, bytes, int], bytes] = {}

    def __init__(self, password: str) -> None:
        self.password = password.encode()
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.first_bare = f"n=,r={self.nonce}"

    def answer(self, code: int, body: bytes) -> bytes:
        if code == 10:  # AuthenticationSASL: the mechanisms; answer with client-first
            first = ("n,," + self.first_bare).encode()
            payload = b"SCRAM-SHA-256\x00" + len(first).to_bytes(4, "big") + first
            return b"p" + (len(payload) + 4).to_bytes(4, "big") + payload
        server_first = body.decode()
        fields = dict(part.split("=", 1) for part in server_first.split(","))
        salt, iterations = base64.b64decode(fields["s"]), int(fields["i"])
        key = (self.password, salt, iterations)
        salted = self._salted.get(key)
        if salted is None:
            salted = self._salted[key] = hashlib.pbkdf2_hmac("sha256", self.password, salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        without_proof = f"c=biws,r={fields['r']}"
        message = f"{self.first_bare},{server_first},{without_proof}".encode()
        signature = hmac.digest(hashlib.sha256(client_key).digest(), message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        final = f"{without_proof},p={base64.b64encode(proof).decode()}".encode()
        return b"p" + (len(final) + 4).to_bytes(4, "big") + final


@dataclass
class _Spec:
    host: str
    port: int
    user: str
    database: str
    clients: int = 1
    workers: int = 1
    duration: float = 5.0
    max_count: int = 1_000_000
    connect_inflight: int = 256
    deadline: float = 120.0
    until: str = "ready"
    extra: dict[str, Any] = field(default_factory=dict)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    values = sorted(values)
    n = len(values)
    return {
        "p50": values[min(n - 1, int(0.50 * n))],
        "p99": values[min(n - 1, int(0.99 * n))],
        "max": values[-1],
    }


async def _connect(loop: asyncio.AbstractEventLoop, spec: _Spec, session: _Session) -> str | None:
    try:
        await loop.create_connection(lambda: session, spec.host, spec.port)
    except OSError as exc:
        session.outcome = "connect:" + (exc.strerror or type(exc).__name__)
        return session.outcome
    return None


def hammer(spec: _Spec) -> dict[str, Any]:
    """Connection churn as cheap as Python allows: blocking connect, epoll for the answers.

    On loopback a blocking connect() returns once the kernel has queued the connection for
    accept, without waiting for the server process, so it costs one syscall; asyncio's
    create_connection costs several times more Python per connection, and at thousands of
    connections per second the load generator, not the server, would be measured.
    """
    startup = startup_message(spec.user, spec.database)
    addr = (spec.host, spec.port)
    poller = select.epoll()
    live: dict[int, tuple[socket.socket, bytearray]] = {}
    outcomes: Counter[str] = Counter()
    started = time.monotonic()
    stop_at = started + spec.duration
    budget = spec.max_count

    def open_one() -> None:
        nonlocal budget
        budget -= 1
        sock = socket.socket(socket.AF_INET6 if ":" in spec.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        sock.settimeout(spec.deadline)
        try:
            sock.connect(addr)
            sock.sendall(startup)
        except OSError as exc:
            outcomes["connect:" + (exc.strerror or type(exc).__name__)] += 1
            sock.close()
            return
        sock.setblocking(False)
        live[sock.fileno()] = (sock, bytearray())
        poller.register(sock.fileno(), select.EPOLLIN)

    def done(fd: int, outcome: str) -> None:
        sock, _ = live.pop(fd)
        poller.unregister(fd)
        if outcome == "admitted":
            try:
                sock.send(TERMINATE)
            except OSError:
                pass
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 0, 0))
        sock.close()
        outcomes[outcome] += 1
        if budget > 0 and time.monotonic() < stop_at:
            open_one()

    for _ in range(spec.workers):
        open_one()
    last_event = time.monotonic()
    while live:
        events = poller.poll(1.0)
        now = time.monotonic()
        if not events:
            if now - last_event > spec.deadline:
                outcomes["hung"] += len(live)
                for fd in list(live):
                    live.pop(fd)[0].close()
            continue
        last_event = now
        for fd, _ in events:
            sock, buf = live[fd]
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                done(fd, "closed")
                continue
            buf += data
            outcome = _first_answer(buf)
            if outcome is not None:
                done(fd, outcome)
    elapsed = time.monotonic() - started
    poller.close()
    rejected = outcomes["rejected"] + outcomes["rejected_after_auth"]
    return {
        "mode": "hammer",
        "elapsed": elapsed,
        "outcomes": dict(outcomes),
        "rejected_per_s": rejected / elapsed if elapsed else 0.0,
    }


def _first_answer(buf: bytearray) -> str | None:
    """What the messages so far say: rejected, rejected_after_auth, error:X, admitted, or None."""
    pos, end, authed = 0, len(buf), False
    while end - pos >= 5:
        tag, length = _HEADER.unpack_from(buf, pos)
        stop = pos + 1 + length
        if stop > end:
            return None
        if tag == b"E":
            code = sqlstate_of(bytes(buf[pos + 5 : stop]))
            if code == "53300":
                return "rejected_after_auth" if authed else "rejected"
            return "error:" + code
        if tag == b"R":
            authed = True
        elif tag == b"Z":
            return "admitted"
        pos = stop
    return None


async def storm(spec: _Spec) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    startup = startup_message(spec.user, spec.database)
    gate = asyncio.Semaphore(spec.connect_inflight)
    sql = SELECT_1
    if "query" in spec.extra:
        text = str(spec.extra["query"]).encode() + b"\x00"
        sql = b"Q" + struct.pack("!I", len(text) + 4) + text
    sessions = [_Session(loop, startup, query=True, until="served", sql=sql) for _ in range(spec.clients)]
    open_now = 0
    peak_open = 0

    async def one(session: _Session) -> None:
        nonlocal open_now, peak_open
        async with gate:
            failed = await _connect(loop, spec, session)
        if failed is not None:
            return
        open_now += 1
        peak_open = max(peak_open, open_now)
        try:
            await session.done
        finally:
            open_now -= 1

    started = loop.time()
    tasks = [loop.create_task(one(s)) for s in sessions]
    _, pending = await asyncio.wait(tasks, timeout=spec.deadline)
    for task in pending:
        task.cancel()
    for s in sessions:
        if s.outcome is None:
            s.outcome = "hung"
            s.abort()
    elapsed = loop.time() - started
    outcomes = Counter(s.outcome for s in sessions)
    waits = [s.t_first - s.t_sent for s in sessions if s.t_first and s.t_sent]
    served_waits = [s.t_first - s.t_sent for s in sessions if s.outcome == "served"]
    # StartupMessage to the answer of ``select 1``: comparable between a proxy that answers
    # AuthenticationOk before it has a server session (PgBouncer) and one that answers after.
    served_done = [s.t_done - s.t_sent for s in sessions if s.outcome == "served"]
    return {
        "mode": "storm",
        "clients": spec.clients,
        "elapsed": elapsed,
        "outcomes": dict(outcomes),
        "peak_open": peak_open,
        "first_byte_wait": _percentiles(waits),
        "served_wait": _percentiles(served_waits),
        "served_done": _percentiles(served_done),
    }


async def burst(spec: _Spec) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    startup = startup_message(spec.user, spec.database)
    password = spec.extra.get("password")
    gate = asyncio.Semaphore(spec.connect_inflight)
    sessions = [_Session(loop, startup, query=True, until="served") for _ in range(spec.clients)]
    starts = [0.0] * spec.clients
    ends = [0.0] * spec.clients

    async def one(i: int, session: _Session) -> None:
        if password is not None:
            session.scram = _Scram(password)
        starts[i] = time.monotonic()  # not loop.time(): uvloop's clock has millisecond steps
        async with gate:
            failed = await _connect(loop, spec, session)
        if failed is None:
            await session.done
        ends[i] = time.monotonic()

    print(json.dumps({"event": "armed"}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    tasks = [loop.create_task(one(i, s)) for i, s in enumerate(sessions)]
    _, pending = await asyncio.wait(tasks, timeout=spec.deadline)
    for task in pending:
        task.cancel()
    for s in sessions:
        if s.outcome is None:
            s.outcome = "hung"
            s.abort()
    served = [i for i, s in enumerate(sessions) if s.outcome == "served"]
    return {
        "mode": "burst",
        "clients": spec.clients,
        "outcomes": dict(Counter(s.outcome for s in sessions)),
        "first_start": min(starts),
        "last_end": max((ends[i] for i in served), default=0.0),
        "served_times": [round(ends[i] - starts[i], 6) for i in served],
    }


async def hold(spec: _Spec) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    startup = startup_message(spec.user, spec.database)
    gate = asyncio.Semaphore(spec.connect_inflight)
    sessions = [_Session(loop, startup, query=False, until=spec.until) for _ in range(spec.clients)]
    password = spec.extra.get("password")

    async def one(session: _Session) -> None:
        if password is not None:
            session.scram = _Scram(password)
        async with gate:
            if await _connect(loop, spec, session) is not None:
                return
        await session.done

    tasks = [loop.create_task(one(s)) for s in sessions]
    _, pending = await asyncio.wait(tasks, timeout=spec.deadline)
    for task in pending:
        task.cancel()
    outcomes = Counter(s.outcome or "hung" for s in sessions)
    print(json.dumps({"event": "ready", "outcomes": dict(outcomes)}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    for s in sessions:
        if s.transport is not None and not s.transport.is_closing():
            if s.outcome == "ready":
                s.transport.write(TERMINATE)
            s.transport.close()
    return {"mode": "hold", "event": "closed", "outcomes": dict(outcomes)}


async def serial(spec: _Spec) -> dict[str, Any]:
    """``clients`` connections one after the other: connect, StartupMessage, ReadyForQuery,
    Terminate. Reports the time from the connect call to ReadyForQuery (admission latency).
    With ``extra = {"ports": [p1, p2, ...]}`` the connections go to each port in turn (so
    every target sees the same moments of the machine's load) and the report is per port."""
    loop = asyncio.get_running_loop()
    startup = startup_message(spec.user, spec.database)
    ports: list[int] = list(spec.extra.get("ports", [spec.port]))
    outcomes: dict[int, Counter[str]] = {port: Counter() for port in ports}
    ready: dict[int, list[float]] = {port: [] for port in ports}
    started = loop.time()
    for _ in range(spec.clients):
        for port in ports:
            session = _Session(loop, startup, query=False, until="first")
            target = _Spec(spec.host, port, spec.user, spec.database, deadline=spec.deadline)
            t0 = time.perf_counter()  # not loop.time(): uvloop's clock has millisecond steps
            if await _connect(loop, target, session) is None:
                try:
                    await asyncio.wait_for(session.done, spec.deadline)
                except TimeoutError:
                    session.outcome = "hung"
                    session.abort()
            t1 = time.perf_counter()
            outcomes[port][session.outcome or "hung"] += 1
            if session.outcome == "admitted":
                ready[port].append(t1 - t0)
    per_port = {
        str(port): {
            "outcomes": dict(outcomes[port]),
            "ready": _percentiles(ready[port]),
            "ready_mean": sum(ready[port]) / len(ready[port]) if ready[port] else 0.0,
        }
        for port in ports
    }
    first = per_port[str(ports[0])]
    return {"mode": "serial", "clients": spec.clients, "elapsed": loop.time() - started, **first, "ports": per_port}


MODES: Final = {"storm": storm, "burst": burst, "hold": hold, "serial": serial}


def main(argv: list[str]) -> int:
    mode, raw = argv[0], json.loads(argv[1])
    spec = _Spec(**raw)
    nofile = raise_nofile()
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    t0 = time.perf_counter()
    if mode == "hammer":
        result = hammer(spec)
    else:
        result = loop.run_until_complete(MODES[mode](spec))
    result["wall"] = time.perf_counter() - t0
    result["nofile"] = nofile
    print(json.dumps(result), flush=True)
    loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
