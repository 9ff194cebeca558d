"""``[server] workers = N``: a supervisor process runs N pgguard processes behind one port (SO_REUSEPORT).

Theory
------
``pgguard run`` with ``workers > 1`` becomes a *supervisor*. It serves no client. The workers
enforce one set of limits: without ``[cluster]`` the supervisor owns the one Gate and every
admission asks it over the worker's channel (``host.SharedGate`` here, ``host.HostAdmission``
in each worker: see host.py); with ``[cluster]`` they share the limits through Redis, as
separate pgguards do.

- It first binds every ``[server] listen`` address itself, with SO_REUSEPORT and without
  listening: a taken address is the same clean "cannot start" as without workers, port 0 is
  resolved once (every worker gets the same port), and the bound socket keeps the address
  reserved while a worker restarts. A socket that never listens is not in the kernel's
  SO_REUSEPORT group, so no client is ever queued on it.
- It starts N workers: the same interpreter re-executed (``python -m pgguard run -c FILE
  --worker SPEC``, never a fork of a running loop), each in its own session (a terminal's
  Ctrl-C reaches the supervisor only, which forwards it), each handed one end of a
  socketpair as its *channel*. A worker is an ordinary ``server.Server`` that listens with
  SO_REUSEPORT (the kernel spreads new clients over the workers), is named
  ``<[cluster] instance>-w<i>`` in the store with ``[cluster]`` (default names,
  hostname:pid, are distinct anyway), numbers its clients i+1, i+1+N, ... (ids unique on the host), logs with a
  ``worker=i`` field, and opens no ``[metrics] listen`` of its own.
- The channel carries length-prefixed JSON frames (at most ``MAX_FRAME`` bytes): requests
  ``{"id", "op", ...}``, replies ``{"re", ...}``, notices ``{"op", ...}``. A worker sends
  ``started`` once it serves; the supervisor asks a worker for its exposition text
  (``metrics``), its readiness (``ready``) and to run a console command (``command``); a
  worker asks the supervisor to run a console statement on every worker (``console``).
  Without ``[cluster]`` the admission frames of host.py travel on it too: ``arrive`` is
  answered synchronously (no task), and small frames sent in one loop iteration are written
  together (``send_now``), as the reader parses every whole frame of one read.
- One console: the console is reached on the listen port, so a console session lands on
  whichever worker the kernel picked. That worker authenticates it as usual and passes each
  command to the supervisor, which runs it on every live worker and merges the answers: a
  command with rows (SHOW ..., INJECT) returns every worker's rows with a last column
  ``worker``; a command without rows (SET, PAUSE, RESUME, RELOAD, KILL, CLEAR) succeeds if
  it succeeded on at least one worker (KILL CLIENT finds the one worker holding the id), else
  fails with the first worker's error. SHOW HELP and SHOW CONFIG are answered by the worker
  itself (the same on every worker). RELOAD also re-reads the supervisor's own copy; without
  ``[cluster]``, SET / RESET LIMIT, SET POLICY, PAUSE and RESUME that succeeded on the workers
  are applied once to the supervisor's Gate too (RELOAD through the re-read).
- One ``/metrics``: the supervisor serves ``[metrics] listen``; a scrape collects every
  live worker's exposition and serves each sample once per worker with a ``worker`` label
  (HELP and TYPE once per family), plus the supervisor's own ``pgguard_workers``,
  ``pgguard_workers_alive`` and ``pgguard_worker_restarts_total`` (without ``[cluster]``
  also ``pgguard_worker_slots_held`` and ``pgguard_worker_lost_waiters_total``). ``/healthz`` is 200 while
  every worker runs; ``/readyz`` while every worker is ready (and nothing drains).
- Signals: SIGTERM or SIGINT is forwarded to every worker as SIGTERM (each drains as a
  single pgguard does); the supervisor waits ``shutdown_timeout`` + ``DRAIN_MARGIN`` and
  then kills what is left. A second signal is forwarded too (every worker stops at once).
  The exit code is 0 only when every worker exited 0 after one signal. SIGHUP re-reads the
  supervisor's file and is forwarded (every worker reloads).
- A worker that exits on its own is logged (``event=worker_exited``) and started again after
  ``BACKOFF_FIRST`` seconds, doubling up to ``BACKOFF_MAX`` (back to the first after
  ``BACKOFF_RESET`` seconds of service); its leases in the store expire within ``lease_ttl``;
  without ``[cluster]`` its waiters are cancelled and its slots held in the supervisor's Gate
  until its server sessions have ended (host.py).
  Before it serves, a worker asks the supervisor for ``state``: the supervisor asks a live
  worker for its ``snapshot`` (PAUSE, SET POLICY, fault rules: ``Control.runtime_state``),
  which the new worker takes (without ``[cluster]`` with the shared Gate's SET LIMIT values,
  so that it shows them); at the first start nobody serves and there is nothing to copy.
  A worker that fails before it ever served at start stops the whole supervisor with its
  exit code (a configuration the worker refuses is not retried forever). A worker whose
  supervisor is gone (its channel closed) drains and exits.

Size: about 1050 lines, kept as one job on purpose: the process model of workers mode, both
sides of the channel (each side's requests are the other's handlers) and the supervisor's
merged console and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import re
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from . import config as config_mod
from . import proxy, wire
from .admin import AdminSession, execute
from .config import Config
from .console import Command, Host, Result, find, parse_name
from .errors import AdminCommandError, ConfigError, ProtocolViolation
from .host import SharedGate
from .limits import Policy
from .log import log, log_event
from .metrics import MetricsServer, ProbeServer
from .notify import CHILD_ENV, STATUS_EVERY, from_env
from .rules import FaultSpecError
from .server import Server, StopRequest, run_loop, serve

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "MAX_FRAME",
    "WORKER_METRIC_NAMES",
    "Channel",
    "WorkerSpec",
    "merge_exposition",
    "run_supervisor",
    "run_worker",
]

# A frame carries a console result or one worker's exposition: SHOW CLIENTS of 100,000
# clients is about 15 MB of JSON. Past this a reply is replaced by an error, not sent.
MAX_FRAME: Final = 32 * 1024 * 1024
# Bound on one round trip over a channel (a scrape, a command on one worker); a worker's
# console request waits for the slowest worker plus this margin.
RPC_TIMEOUT: Final = 10.0
CONSOLE_TIMEOUT: Final = RPC_TIMEOUT + 5.0
# Restart backoff of a worker that exited on its own: first delay, cap, and the service
# time after which the next failure starts from the first delay again.
BACKOFF_FIRST: Final = 0.5
BACKOFF_MAX: Final = 10.0
BACKOFF_RESET: Final = 30.0
# Past shutdown_timeout, time for workers to close their sessions and leave the store
# (close_timeout, one Redis call) before the supervisor kills them.
DRAIN_MARGIN: Final = 10.0
# Time a starting worker has to serve (load, bind, join the store) before it counts as failed.
START_TIMEOUT: Final = 60.0

WORKER_METRIC_NAMES: Final = (
    "pgguard_workers",
    "pgguard_workers_alive",
    "pgguard_worker_restarts_total",
)

# Console commands a worker answers alone: the same on every worker (SHOW HELP, SHOW
# CONFIG) or no-ops (BEGIN/COMMIT..., which have no syntax line).
_LOCAL_SYNTAX: Final = frozenset({"SHOW HELP", "SHOW CONFIG", ""})
_HEADER: Final = struct.Struct(">I")
_READ_CHUNK: Final = 256 * 1024


class ChannelClosed(Exception):
    """The peer process is gone (or sent something that is not a frame)."""


# ------------------------------------------------------------------- channel


class Channel:
    """Framed JSON requests, replies and notices over one socketpair end, both ways."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
        notice: Callable[[dict[str, Any]], None] = lambda msg: None,
        immediate: Callable[[dict[str, Any]], dict[str, Any] | None] = lambda msg: None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._handle = handle
        self._notice = notice
        # A request answered synchronously, without a task (host.py's arrive: one per login);
        # None: not one of those, ``handle`` answers it.
        self._immediate = immediate
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._callbacks: dict[int, Callable[[dict[str, Any] | None], None]] = {}
        self._outbox: list[bytes] = []  # frames of send_now, written together by _flush
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    async def request(self, op: str, timeout: float = RPC_TIMEOUT, **fields: Any) -> dict[str, Any]:
        """The peer's reply to ``op``; raises ChannelClosed or TimeoutError."""
        if self.closed:
            raise ChannelClosed
        rid = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            await self._send({"id": rid, "op": op, **fields})
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._pending.pop(rid, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: a close during the send is ChannelClosed above

    async def notify(self, op: str, **fields: Any) -> None:
        await self._send({"op": op, **fields})

    def send_now(self, message: dict[str, Any]) -> bool:
        """Queue one small frame, written with the others of this loop iteration in one call
        (False: the channel is closed). A peer that stops reading while more than MAX_FRAME
        waits for it is treated as gone."""
        if self.closed:
            return False
        data = json.dumps(message, separators=(",", ":")).encode()
        self._outbox.append(_HEADER.pack(len(data)) + data)
        if len(self._outbox) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        return True

    def _flush(self) -> None:
        out, self._outbox = self._outbox, []
        if self.closed or not out:
            return
        self._writer.write(b"".join(out))
        if self._writer.transport.get_write_buffer_size() > MAX_FRAME:
            log_event(logging.ERROR, "channel_error", reason="peer not reading")
            self.close()

    def call(self, op: str, on_reply: Callable[[dict[str, Any] | None], None], **fields: Any) -> bool:
        """Send request ``op`` now; ``on_reply`` gets the reply, or None if the channel closes
        first. False (and no call of ``on_reply``) when it is closed already."""
        if self.closed:
            return False
        rid = next(self._ids)
        self._callbacks[rid] = on_reply
        if not self.send_now({"id": rid, "op": op, **fields}):
            self._callbacks.pop(rid, None)
            return False
        return True

    async def _send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        if len(data) > MAX_FRAME:
            raise ValueError(f"message of {len(data)} bytes is over the channel's {MAX_FRAME}")
        if self.closed:
            raise ChannelClosed
        try:
            self._writer.write(_HEADER.pack(len(data)) + data)
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            self.close()
            raise ChannelClosed from exc

    async def run(self) -> None:
        """Read frames until the peer closes; then fail whatever still waits for a reply."""
        buffer = bytearray()
        try:
            while True:
                # Every whole frame that has arrived, from one read: under load (one frame per
                # login each way) a wake-up serves many frames.
                chunk = await self._reader.read(_READ_CHUNK)
                if not chunk:
                    return
                buffer += chunk
                for message in _frames(buffer):
                    if message is None:
                        return
                    self._dispatch(message)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass  # closed, or garbage (ValueError: not JSON): the channel is over either way
        finally:
            self.close()

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "re" in message:
            callback = self._callbacks.pop(message["re"], None)
            if callback is not None:
                self._safely(callback, message)
                return
            future = self._pending.get(message["re"])
            if future is not None and not future.done():
                future.set_result(message)
        elif "id" in message:
            reply = self._immediate(message)
            if reply is not None:
                self.send_now({"re": message["id"], **reply})
                return
            task = asyncio.get_running_loop().create_task(self._answer(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._safely(self._notice, message)

    @staticmethod
    def _safely(callback: Callable[[dict[str, Any]], None], message: dict[str, Any]) -> None:
        try:
            callback(message)
        except Exception:  # the boundary of one frame: log it, keep the channel
            log.exception("event=channel_frame_failed op=%s", message.get("op"))

    async def _answer(self, message: dict[str, Any]) -> None:
        try:
            reply = await self._handle(message)
        except Exception as exc:  # the boundary of one request: answer, never kill the channel
            log.exception("event=channel_request_failed op=%s", message.get("op"))
            reply = {"error": {"sqlstate": "XX000", "message": f"pgguard internal error: {exc}"}}
        try:
            try:
                await self._send({"re": message["id"], **reply})
            except ValueError as exc:  # too large
                await self._send({"re": message["id"], "error": {"sqlstate": "54000", "message": str(exc)}})
        except ChannelClosed:
            pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ChannelClosed())
        callbacks, self._callbacks = self._callbacks, {}
        for callback in callbacks.values():
            try:
                callback(None)
            except Exception:  # the boundary of one request: log it, answer the others
                log.exception("event=channel_frame_failed op=closed")
        for task in self._tasks:
            task.cancel()
        self._writer.close()


def _frames(buffer: bytearray) -> Iterator[dict[str, Any] | None]:
    """The whole frames at the start of ``buffer`` (taken out of it, in one cut at the end);
    None for one that is over MAX_FRAME or not an object (the channel ends). Raises
    ValueError on bad JSON."""
    at = 0
    try:
        while len(buffer) - at >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, at)
            if size > MAX_FRAME:
                log_event(logging.ERROR, "channel_error", reason=f"frame of {size} bytes")
                yield None
                return
            end = at + _HEADER.size + size
            if len(buffer) < end:
                return
            message = json.loads(bytes(buffer[at + _HEADER.size : end]))
            at = end
            yield message if isinstance(message, dict) else None
    finally:
        del buffer[:at]


def _error_of(reply: dict[str, Any]) -> AdminCommandError | None:
    error = reply.get("error")
    if error is None:
        return None
    return AdminCommandError(
        str(error.get("sqlstate", "XX000")), str(error.get("message", "")), detail=error.get("detail")
    )


def _error_reply(exc: AdminCommandError) -> dict[str, Any]:
    return {"error": {"sqlstate": exc.sqlstate, "message": exc.message, "detail": exc.detail}}


# -------------------------------------------------------------------- worker


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What the supervisor tells a worker on its command line (``--worker``, JSON)."""

    index: int
    count: int
    fd: int
    listen: tuple[str, ...]  # the supervisor's resolved [server] listen (port 0 made concrete)
    configured: tuple[str, ...]  # [server] listen as the file said it

    def dumps(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, text: str) -> WorkerSpec:
        data = json.loads(text)
        return cls(
            index=int(data["index"]),
            count=int(data["count"]),
            fd=int(data["fd"]),
            listen=tuple(data["listen"]),
            configured=tuple(data["configured"]),
        )


def _worker_config(spec: WorkerSpec) -> Callable[[Config], Config]:
    """What a worker makes of a config it reads (at start and on every reload)."""

    def prepare(cfg: Config) -> Config:
        server = cfg.server
        if server.listen == spec.configured:
            server = dataclasses.replace(server, listen=spec.listen)
        cluster = cfg.cluster
        if cluster is not None and cluster.instance is not None:
            cluster = dataclasses.replace(cluster, instance=f"{cluster.instance}-w{spec.index}")
        return dataclasses.replace(cfg, server=server, cluster=cluster)

    return prepare


class _Delegate:
    """The console session a command runs under on each worker: its audit line names the
    user and is logged only by the workers where the command succeeded."""

    def __init__(self, host: Host, user: str, client: str) -> None:
        self.host: Host = host
        self.user = user
        self.client = client
        self.audits: list[tuple[str, dict[str, object]]] = []

    def audit(self, action: str, **fields: object) -> None:
        self.audits.append((action, fields))

    def log_audits(self) -> None:
        for action, fields in self.audits:
            log_event(
                logging.INFO, "admin_command", action=action, user=self.user, client=self.client, **fields
            )


class _WorkerConsole:
    """A worker's console ``Runner``: commands go to the supervisor, which runs them everywhere."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def columns(self, cmd: Command) -> tuple[str, ...]:
        if cmd.syntax in _LOCAL_SYNTAX or not cmd.columns:
            return cmd.columns
        return (*cmd.columns, "worker")

    async def run(self, session: AdminSession, cmd: Command, m: re.Match[str]) -> Result:
        if cmd.syntax in _LOCAL_SYNTAX:
            return execute(session, cmd, m)
        try:
            reply = await self.channel.request(
                "console", CONSOLE_TIMEOUT, statement=m.string, user=session.user, client=session.peer
            )
        except (ChannelClosed, TimeoutError):
            raise AdminCommandError("57P03", "the pgguard supervisor did not answer") from None
        error = _error_of(reply)
        if error is not None:
            raise error
        return Result(str(reply["tag"]), [tuple(row) for row in reply.get("rows", ())])


class _WorkerService:
    """What a worker answers on its channel: console commands, its exposition, its readiness."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.probe = MetricsServer(server.control, "", 0)  # never started: render and probe only

    async def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        if op == "command":
            try:
                cmd, m = find(str(message["statement"]))
                session = _Delegate(self.server, str(message["user"]), str(message["client"]))
                result = execute(session, cmd, m)
            except AdminCommandError as exc:
                return _error_reply(exc)
            session.log_audits()
            return {"tag": result.tag, "rows": [list(row) for row in result.rows]}
        if op == "metrics":
            body, _ = self.probe.render("")
            return {"text": body.decode()}
        if op == "ready":
            return {"reason": await self.probe.not_ready()}
        if op == "reload":  # the supervisor's SIGHUP: re-read the file, answer when done
            return {"ok": self.server.reload()}
        if op == "status":  # the supervisor's STATUS= for the service manager
            counts = self.server.control.counts()
            return {"sessions": counts.sessions_active, "waiting": counts.clients_waiting}
        if op == "snapshot":  # a restarted worker copies this one's run-time state
            return {"state": self.server.control.runtime_state()}
        if op == "cancel":  # another worker received a CancelRequest with a key it does not hold
            try:
                packet = wire.parse_cancel_request(bytes.fromhex(str(message["packet"])))
            except (ValueError, ProtocolViolation):
                return {"mine": False}
            return {"mine": self.server.control.cancel_mine(packet)}
        return {"error": {"sqlstate": "XX000", "message": f"unknown op {op!r}"}}


async def _serve_worker(cfg: Config, spec: WorkerSpec) -> int:
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=spec.fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    prepare = _worker_config(spec)
    server = Server(prepare(cfg), loop=loop)
    server.reuse_port = True
    server.serve_metrics = False  # the supervisor serves [metrics] listen for every worker
    server.prepare_config = prepare
    service = _WorkerService(server)
    notices: dict[str, Callable[[dict[str, Any]], None]] = {}

    def notice(message: dict[str, Any]) -> None:
        handler = notices.get(str(message.get("op")))
        if handler is not None:
            handler(message)

    channel = Channel(reader, writer, handle=service.handle, notice=notice)
    server.console_runner = _WorkerConsole(channel)
    if cfg.cluster is None:  # the supervisor's Gate decides for every worker (host.py)
        host = server.control.attach_host(
            channel.call, lambda op, **fields: channel.send_now({"op": op, **fields})
        )
        notices.update(admitted=host.admitted, expired=host.expired, free=host.free)

    async def cancel_elsewhere(packet: bytes) -> bool:
        reply = await channel.request("cancel", packet=packet.hex())
        return bool(reply.get("mine"))

    server.control.cancel_elsewhere = cancel_elsewhere
    reading = loop.create_task(channel.run())
    await _copy_runtime_state(server, channel)

    watching: list[asyncio.Task[None]] = []

    def started(server: Server, stop: StopRequest) -> None:
        async def watch_channel() -> None:
            with contextlib.suppress(ChannelClosed):
                await channel.notify("started", pid=os.getpid())
            await asyncio.wait({reading})
            stop("supervisor_gone")  # the supervisor died or closed the channel: drain, exit

        watching.append(loop.create_task(watch_channel()))

    try:
        return await serve(server.config, server=server, started=started)
    finally:
        for task in watching:
            task.cancel()
        channel.close()
        reading.cancel()


async def _copy_runtime_state(server: Server, channel: Channel) -> None:
    """Before serving, take a live worker's PAUSE, SET POLICY and fault rules (a worker
    restarted after a crash would otherwise come back without them). At the first start, or
    when no worker answers, there is nothing to copy."""
    try:
        reply = await channel.request("state")
    except (ChannelClosed, TimeoutError):
        return
    state = reply.get("state")
    if not state:
        return
    try:
        server.control.restore_runtime_state(state)
    except (KeyError, TypeError, ValueError, FaultSpecError) as exc:
        log_event(logging.WARNING, "runtime_state_not_restored", error=repr(exc))


def run_worker(cfg: Config, spec: WorkerSpec) -> int:
    """Run worker ``spec.index`` of a supervisor until drained; the process exit code."""
    proxy.number_clients(spec.index + 1, spec.count)
    return run_loop(_serve_worker(cfg, spec))


# ---------------------------------------------------------------- supervisor


@dataclass(eq=False)
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    serving: bool = False  # said "started" and has not exited since
    ever_served: bool = False
    started_at: float = 0.0
    code: int | None = None  # the last exit code
    restarts: int = 0


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def reserve(listen: tuple[str, ...]) -> tuple[list[socket.socket], tuple[str, ...]]:
    """Bind every address (SO_REUSEPORT, not listening); the sockets and the addresses with
    port 0 replaced by the port it got. Raises OSError when an address is taken."""
    sockets: list[socket.socket] = []
    resolved: list[str] = []
    try:
        for item in listen:
            host, port = config_mod.parse_address(item)
            infos = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
            )
            seen: set[tuple[Any, ...]] = set()
            for family, kind, proto, _, addr in infos:
                if (family, addr) in seen:
                    continue
                seen.add((family, addr))
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((addr[0], port, *addr[2:]))
                port = sock.getsockname()[1]  # port 0: every family and worker shares the first one
            resolved.append(f"{item.rpartition(':')[0]}:{port}")
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets, tuple(resolved)


class _SupervisorCollector(Collector):
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        sup = self.supervisor
        yield GaugeMetricFamily(
            "pgguard_workers", "Worker processes configured ([server] workers).", value=len(sup.workers)
        )
        yield GaugeMetricFamily(
            "pgguard_workers_alive", "Worker processes serving now.",
            value=sum(1 for w in sup.workers if w.serving),
        )  # fmt: skip
        restarts = CounterMetricFamily(
            "pgguard_worker_restarts", "Workers started again after exiting on their own.",
            labels=["worker"],
        )  # fmt: skip
        for w in sup.workers:
            restarts.add_metric([str(w.index)], w.restarts)
        yield restarts
        shared = sup.shared
        if shared is not None:  # without [cluster]: the supervisor's one Gate (host.py)
            yield GaugeMetricFamily(
                "pgguard_worker_slots_held",
                "Slots of exited workers held until their server sessions end.", value=shared.held,
            )  # fmt: skip
            yield CounterMetricFamily(
                "pgguard_worker_lost_waiters",
                "Queued clients gone with the worker that held their socket.", value=shared.lost_waiters,
            )  # fmt: skip


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge_exposition(texts: list[tuple[int, str]]) -> list[Metric]:
    """Families of several workers' text expositions, each sample labelled ``worker``,
    each family once (in order of first appearance)."""
    merged: dict[str, Metric] = {}
    for index, text in texts:
        for family in text_string_to_metric_families(text):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                into.add_sample(sample.name, {**sample.labels, "worker": str(index)}, sample.value)
    return list(merged.values())


class _SupervisorMetrics(ProbeServer):
    """``[metrics] listen`` in workers mode: every worker's metrics, labelled, and the supervisor's."""

    def __init__(self, supervisor: Supervisor, host: str, port: int) -> None:
        super().__init__(host, port)
        self.supervisor = supervisor
        self.own = _SupervisorCollector(supervisor)

    async def exposition(self, accept: str) -> tuple[bytes, str]:
        replies = await self.supervisor.ask_all("metrics")
        texts = [(i, str(r["text"])) for i, r in replies if "text" in r]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(merge_exposition(texts)))
        registry.register(self.own)
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type

    async def not_healthy(self) -> str | None:
        return self.supervisor.not_serving()

    async def not_ready(self) -> str | None:
        sup = self.supervisor
        if sup.stopping.is_set():
            return "draining"
        reason = sup.not_serving()
        if reason is not None:
            return reason
        for index, reply in await sup.ask_all("ready"):
            if "error" in reply:
                return f"worker {index}: did not answer"
            if reply.get("reason"):
                return f"worker {index}: {reply['reason']}"
        return None


class Supervisor:
    """The parent of ``[server] workers`` processes (see the module docstring)."""

    def __init__(self, config: Config, log_level: str) -> None:
        self.config = config
        self.log_level = log_level
        self.loop = asyncio.get_running_loop()
        self.workers = [_Worker(i) for i in range(config.server.workers)]
        self.stopping = asyncio.Event()
        self.signals = 0
        self.listen: tuple[str, ...] = ()
        self.metrics: _SupervisorMetrics | None = None
        self._reserved: list[socket.socket] = []
        self._failed: asyncio.Future[int] = self.loop.create_future()
        self._serving_all = asyncio.Event()
        # The service manager hears the supervisor only (workers get no $NOTIFY_SOCKET):
        # READY once every worker serves, RELOADING/READY around a reload of all, STOPPING.
        self.notifier = from_env()
        self._status = "starting"
        self._tasks: set[asyncio.Task[None]] = set()
        # Without [cluster]: the one Gate of every worker (host.py); with it, Redis is.
        self.shared: SharedGate | None = None
        if config.cluster is None:
            self.shared = SharedGate(
                config.rules(), config.backend, self.loop, notify=self._notify_worker,
                workers=config.server.workers, pooled=config.reuse_anywhere,
            )  # fmt: skip

    # --------------------------------------------------------------- lifecycle

    async def run(self) -> int:
        """Bind, start the workers, serve until a signal; the exit code. Raises OSError when
        an address (listen, metrics) is taken."""
        self._reserved, self.listen = reserve(self.config.server.listen)
        try:
            listen = self.config.metrics.listen
            if listen is not None:
                host, port = config_mod.parse_address(listen)
                self.metrics = _SupervisorMetrics(self, host, port)
                await self.metrics.start()
            return await self._run()
        finally:
            if self.metrics is not None:
                await self.metrics.close()
            for sock in self._reserved:
                sock.close()
            if self.shared is not None:
                self.shared.close()

    async def _run(self) -> int:
        loop = self.loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        keepers = [loop.create_task(self._keep(w)) for w in self.workers]
        try:
            code = await self._wait_started()
            if code is None and self._serving_all.is_set():
                log_event(
                    logging.INFO, "workers_started", workers=len(self.workers),
                    listen=",".join(self.listen),
                    metrics="{}:{}".format(*self.metrics.address) if self.metrics and self.metrics.address else "",
                )  # fmt: skip
                self.notifier.ready()
                if self.notifier.enabled:
                    self._spawn(self.notifier.keep(lambda: self._status))
                    self._spawn(self._poll_status())
                await self.stopping.wait()
            else:
                self.stopping.set()
            self._forward(signal.SIGTERM)
            clean = await self._wait_exited(keepers)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for task in (*keepers, *self._tasks):
                task.cancel()
            self.notifier.close()
        if code is not None:
            log_event(logging.ERROR, "stop", clean=False, reason="a worker failed to start")
            return code
        clean = clean and self.signals == 1 and all(w.code == 0 for w in self.workers)
        log_event(logging.INFO, "stop", clean=clean)
        return 0 if clean else 1

    async def _wait_started(self) -> int | None:
        """None once every worker serves; the exit code of one that failed first."""
        serving = self.loop.create_task(self._serving_all.wait())
        stopping = self.loop.create_task(self.stopping.wait())
        waits: set[asyncio.Future[Any]] = {serving, stopping, self._failed}
        try:
            done, _ = await asyncio.wait(waits, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            serving.cancel()
            stopping.cancel()
        if self._failed.done():
            return self._failed.result()
        if not done:
            log_event(logging.ERROR, "worker_failed", reason=f"not serving after {START_TIMEOUT:.0f}s")
            return 1
        return None

    async def _wait_exited(self, keepers: list[asyncio.Task[None]]) -> bool:
        """Until every worker has exited, bounded by shutdown_timeout + DRAIN_MARGIN (then
        the rest are killed); True when none had to be."""
        timeout = self.config.server.shutdown_timeout + DRAIN_MARGIN
        _, pending = await asyncio.wait(keepers, timeout=timeout)
        if not pending:
            return True
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                log_event(logging.WARNING, "worker_killed", worker=w.index, reason="drain took too long")
                w.proc.kill()
        await asyncio.wait(pending, timeout=DRAIN_MARGIN)
        return False

    def _on_stop(self, signum: int) -> None:
        self.signals += 1
        action = "drain" if self.signals == 1 else "stop"
        log_event(logging.INFO, "signal", name=signal.Signals(signum).name, action=action)
        if self.signals == 1:
            self.notifier.stopping()
        self.stopping.set()
        if self.signals > 1:
            self._forward(signal.SIGTERM)  # a worker's second signal: stop at once

    def _on_hangup(self) -> None:
        log_event(logging.INFO, "signal", name="SIGHUP", action="reload")
        self.notifier.reloading()
        self.reload()
        self._spawn(self._reload_workers())

    async def _reload_workers(self) -> None:
        """Every serving worker reloads over its channel (READY=1 once all have answered); one
        still starting gets SIGHUP (it may have read the file before the change)."""
        for w in self.workers:
            if not w.serving and w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGHUP)
        await self.ask_all("reload")
        if not self.stopping.is_set():
            self.notifier.ready()

    async def _poll_status(self) -> None:
        """Every STATUS_EVERY seconds: the workers' sessions and waiting clients, summed."""
        while True:
            replies = await self.ask_all("status")
            sessions = sum(int(r.get("sessions", 0)) for _, r in replies)
            waiting = sum(int(r.get("waiting", 0)) for _, r in replies)
            serving = sum(1 for w in self.workers if w.serving)
            self._status = f"sessions={sessions} waiting={waiting} workers={serving}/{len(self.workers)}"
            await asyncio.sleep(STATUS_EVERY)  # a period, not a synchronisation

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _forward(self, signum: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                try:
                    w.proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def reload(self) -> bool:
        """Re-read the supervisor's copy of the file (what it uses: workers, listen, metrics)."""
        try:
            new = config_mod.load(self.config.path)
        except ConfigError as exc:
            log_event(logging.ERROR, "reload_failed", file=exc.file, key=exc.key, error=exc.problem)
            return False
        old, self.config = self.config, new
        if self.shared is not None:
            self.shared.reconfigure(new.rules(), new.backend, pooled=new.reuse_anywhere)
        for key, moved in (
            ("server.workers", new.server.workers != old.server.workers),
            ("server.listen", new.server.listen != old.server.listen),
            ("metrics.listen", new.metrics != old.metrics),
            ("log.format", new.log != old.log),
        ):
            if moved:
                log_event(logging.WARNING, "reload_needs_restart", key=key)
        return True

    # ----------------------------------------------------------------- workers

    async def _keep(self, w: _Worker) -> None:
        """Run worker ``w`` until the supervisor stops, restarting it when it exits on its own."""
        delay = BACKOFF_FIRST
        while not self.stopping.is_set():
            try:
                code = await self._run_worker(w)
            except Exception as exc:  # the boundary of one worker's life: could not even start it
                log_event(logging.ERROR, "worker_spawn_failed", worker=w.index, error=repr(exc))
                code = 1
            w.code = code
            if self.stopping.is_set():
                return
            fields: dict[str, object] = {"worker": w.index, "code": code}
            if code < 0:
                fields["signal"] = _signal_name(-code)
            log_event(logging.WARNING, "worker_exited", **fields)
            if not w.ever_served:
                if not self._failed.done():
                    self._failed.set_result(code if code > 0 else 1)
                return
            if time.monotonic() - w.started_at >= BACKOFF_RESET:
                delay = BACKOFF_FIRST
            log_event(logging.INFO, "worker_restart", worker=w.index, delay=delay)
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            delay = min(delay * 2, BACKOFF_MAX)
            w.restarts += 1

    async def _run_worker(self, w: _Worker) -> int:
        """Start worker ``w``, serve its channel until it exits; its exit code."""
        parent, child = socket.socketpair()
        try:
            spec = WorkerSpec(
                index=w.index,
                count=len(self.workers),
                fd=child.fileno(),
                listen=self.listen,
                configured=self.config.server.listen,
            )
            env = {k: v for k, v in os.environ.items() if k not in CHILD_ENV}  # only the supervisor notifies
            # The worker imports this very pgguard, wherever the supervisor was started from.
            package_root = str(Path(__file__).resolve().parent.parent)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pgguard", "run", "-c", self.config.path,
                "--log-level", self.log_level, "--worker", spec.dumps(),
                pass_fds=(child.fileno(),), start_new_session=True, env=env,
            )  # fmt: skip
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        w.proc, w.started_at, w.code = proc, time.monotonic(), None
        reader, writer = await asyncio.open_unix_connection(sock=parent)

        def notice(message: dict[str, Any]) -> None:
            if message.get("op") == "started":
                w.serving = w.ever_served = True
                log_event(logging.INFO, "worker_started", worker=w.index, pid=proc.pid)
                if all(x.serving for x in self.workers):
                    self._serving_all.set()

        shared = self.shared
        if shared is not None:
            host_notice = notice

            def notice(message: dict[str, Any]) -> None:
                if not shared.notice(w.index, message):
                    host_notice(message)

            channel = Channel(
                reader, writer, handle=self._handle, notice=notice,
                immediate=lambda message: shared.handle(w.index, message),
            )  # fmt: skip
        else:
            channel = Channel(reader, writer, handle=self._handle, notice=notice)
        w.channel = channel
        reading = self.loop.create_task(channel.run())
        try:
            code = await proc.wait()
        finally:
            w.serving = False
            channel.close()
            reading.cancel()
            if shared is not None:
                shared.worker_gone(w.index)
        return code

    def _notify_worker(self, index: int, message: dict[str, Any]) -> bool:
        """A notice of the shared Gate to worker ``index``; False when it is not running."""
        channel = self.workers[index].channel
        return channel is not None and channel.send_now(message)

    def not_serving(self) -> str | None:
        """Why not every worker serves now (or None)."""
        for w in self.workers:
            if not w.serving:
                return f"worker {w.index} is not running"
        return None

    async def ask_all(self, op: str, **fields: Any) -> list[tuple[int, dict[str, Any]]]:
        """Every serving worker's reply to ``op`` (an error reply for one that did not answer)."""

        async def ask(w: _Worker) -> tuple[int, dict[str, Any]]:
            channel = w.channel
            try:
                if channel is None:
                    raise ChannelClosed
                return w.index, await channel.request(op, **fields)
            except (ChannelClosed, TimeoutError):
                message = f"worker {w.index} did not answer"
                return w.index, {"error": {"sqlstate": "57P03", "message": message}}

        return list(await asyncio.gather(*(ask(w) for w in self.workers if w.serving)))

    # ------------------------------------------------------------------ console

    async def _handle(self, message: dict[str, Any]) -> dict[str, Any]:
        """A worker's request: ``console`` (run a statement on every worker) or ``cancel``
        (a CancelRequest whose key the asking worker does not hold: every worker is asked, the
        one holding the session forwards it; ``mine`` says whether one did)."""
        if message.get("op") == "cancel":
            replies = await self.ask_all("cancel", packet=message.get("packet", ""))
            return {"mine": any(reply.get("mine") for _, reply in replies)}
        if message.get("op") == "state":  # a starting worker: a live one's run-time state, if any
            for w in self.workers:
                if w.serving and w.channel is not None:
                    with contextlib.suppress(ChannelClosed, TimeoutError):
                        reply = await w.channel.request("snapshot")
                        if "state" in reply:
                            state = reply["state"]
                            if self.shared is not None and isinstance(state, dict):
                                state = {**state, "limits": self.shared.runtime_limits()}
                            return {"state": state}
            return {"state": None}
        if message.get("op") != "console":
            return {"error": {"sqlstate": "XX000", "message": f"unknown op {message.get('op')!r}"}}
        statement = str(message.get("statement", ""))
        try:
            cmd, _ = find(statement)
            reload = cmd.syntax == "RELOAD"
            if reload:
                self.notifier.reloading()
                self.reload()
            try:
                replies = await self.ask_all(
                    "command", statement=statement, user=message.get("user", ""), client=message.get("client", "")
                )
                merged = self._merge(cmd, replies)
                if self.shared is not None:
                    self._apply_shared(self.shared, statement)
            finally:
                if reload and not self.stopping.is_set():
                    self.notifier.ready()
            return merged
        except AdminCommandError as exc:
            return _error_reply(exc)

    @staticmethod
    def _apply_shared(shared: SharedGate, statement: str) -> None:
        """A console command that succeeded on the workers, once on the shared Gate: what
        changes a limit, a policy or PAUSE (RELOAD re-read the file before the workers)."""
        cmd, m = find(statement)
        syntax = cmd.syntax
        if syntax.startswith("SET LIMIT "):
            kind = syntax.split()[2].lower()
            name = parse_name(m["name"]) if kind != "total" else ""
            shared.set_limit(kind, name, int(m["value"]))
        elif syntax.startswith("RESET LIMIT"):
            shared.reset_limit((m["kind"] or "total").lower(), parse_name(m["name"]) if m["name"] else "")
        elif syntax.startswith("SET POLICY"):
            shared.set_policy(parse_name(m["name"]), Policy(m["value"].lower()))
        elif syntax == "PAUSE":
            shared.pause()
        elif syntax == "RESUME":
            shared.resume()

    @staticmethod
    def _merge(cmd: Command, replies: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        """One answer from every worker's (see the module docstring); raises AdminCommandError."""
        if not replies:
            raise AdminCommandError("57P03", "no pgguard worker is running")
        ok = [(i, r) for i, r in replies if "error" not in r]
        if not ok:
            error = _error_of(replies[0][1])
            assert error is not None
            raise error
        tag = str(ok[0][1]["tag"])
        if not cmd.columns:
            return {"tag": tag, "rows": []}
        rows = [[*row, str(i)] for i, r in ok for row in r.get("rows", ())]
        return {"tag": tag, "rows": rows}


def run_supervisor(cfg: Config, log_level: str) -> int:
    """Run ``[server] workers`` processes until drained; the exit code. Raises OSError when
    an address is taken (before any worker starts)."""

    async def main() -> int:
        return await Supervisor(cfg, log_level).run()

    return run_loop(main())
