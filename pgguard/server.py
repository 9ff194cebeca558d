"""The process: listeners, configuration reloads, drain and stop, signals, and the control plane's servers.

A ``Server`` binds ``[server] listen``, accepts on those sockets itself (``listen.Acceptor``:
the event loop's own accept drops connections without a word when descriptors run out) and
hands every accepted socket to a
``proxy.ClientConnection`` whose host is the ``control.Control`` (the one owner of the gate).
It loads the configuration and the TLS files (again on SIGHUP or RELOAD: a bad file keeps the
old ones), starts the console hand-off, ``/metrics`` and the catalog mirror, and on
SIGTERM/SIGINT drains: queued clients get 57P03, live sessions get ``shutdown_timeout`` to
finish, then 57P01 (a second signal stops at once).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
from collections.abc import Callable
from typing import Any

from . import config as config_mod
from . import relay, tls
from .admin import AdminSession, Runner, check_admin_config
from .backend import Backend
from .config import Config
from .control import Control, Stats, raise_fd_limit
from .errors import ConfigError
from .listen import Acceptor, bind
from .log import log_event
from .notify import Notifier, from_env
from .proxy import ClientConnection

__all__ = ["Server", "Stats", "StopRequest", "run", "run_loop", "serve", "new_event_loop"]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is importable, asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Server:
    """A running pgguard: its listeners, its control layer, its control-plane servers."""

    def __init__(self, config: Config, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.config = config
        self.loop = loop or asyncio.get_running_loop()
        # Client-side TLS context (None: clients get "N") and how to reach the server; built
        # from the files now and again on every reload, so a renewed certificate is picked up.
        client_tls, backend_tls = tls.load(config)
        self.control = Control(config, Backend(config.backend, backend_tls, self.loop), self.loop)
        self.control.client_tls = client_tls
        self.control.open_console = self._open_console
        self.addresses: list[tuple[str, int]] = []
        self.reload_error: str | None = None
        self.metrics: Any = None  # metrics.MetricsServer, imported only when configured
        self.mirror: Any = None  # mirror.CatalogMirror, likewise
        self._listeners: list[Acceptor] = []
        self._stopped = asyncio.Event()
        # Set before start by a worker of ``[server] workers`` (workers.py): listen with
        # SO_REUSEPORT beside its siblings, leave [metrics] listen to the supervisor, adjust
        # every config read on reload the way its first was, run console commands everywhere.
        self.reuse_port = False
        self.serve_metrics = True
        self.prepare_config: Callable[[Config], Config] | None = None
        self.console_runner: Runner | None = None
        # The service manager's notifications (systemd Type=notify): READY from ``serve``,
        # RELOADING/READY around ``reload``, STOPPING from ``drain``; a no-op one unless
        # ``serve`` is given one (``run``: from $NOTIFY_SOCKET; workers never notify).
        self.notifier = Notifier(None)

    # Read-only views for in-process callers (pgguard.testing, the demo); changes go
    # through ``control``.

    @property
    def stats(self) -> Stats:
        return self.control.stats

    @property
    def clients(self) -> dict[int, ClientConnection]:
        return self.control.clients

    @property
    def draining(self) -> bool:
        return self.control.draining

    @property
    def started_at(self) -> float:
        return self.control.started_at

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind every ``[server] listen`` address; port 0 picks a free one (see ``addresses``)."""
        self.loop.set_exception_handler(self._loop_exception)
        relay.start(self.config.server.relay, self.loop)
        control = self.control
        try:
            for item in self.config.server.listen:
                host, port = config_mod.parse_address(item)
                for sock in bind(host, port, reuse_port=self.reuse_port):
                    self._listeners.append(
                        Acceptor(
                            self.loop, sock, lambda: ClientConnection(control), control.accept_failed
                        )
                    )
                    addr = sock.getsockname()
                    self.addresses.append((addr[0], addr[1]))
        except BaseException:
            for listener in self._listeners:
                listener.close()
            raise
        log_event(
            logging.INFO,
            "start",
            listen=",".join(f"{h}:{p}" for h, p in self.addresses),
            backend=control.backend.address,
            max_client_connections=control.max_clients,
        )
        check_admin_config(self.config, log_event)
        listen = self.config.metrics.listen
        if listen is not None and self.serve_metrics:
            from .metrics import MetricsServer

            host, port = config_mod.parse_address(listen)
            self.metrics = MetricsServer(control, host, port)
            await self.metrics.start()
            log_event(logging.INFO, "metrics", listen="{}:{}".format(*self.metrics.address))
        await self._start_mirror()
        await control.start_cluster()
        control.start()

    def reload(self, new: Config | None = None) -> bool:
        """Re-read the config file (or apply ``new``); a bad file keeps the old config."""
        self.notifier.reloading()
        try:
            return self._reload(new)
        finally:
            self.notifier.ready()

    def status(self) -> str:
        """One line for the service manager's STATUS=: sessions and waiting clients now."""
        counts = self.control.counts()
        return f"sessions={counts.sessions_active} waiting={counts.clients_waiting}"

    def _reload(self, new: Config | None) -> bool:
        stats = self.control.stats
        try:
            if new is None:
                new = config_mod.load(self.config.path)
            if self.prepare_config is not None:
                new = self.prepare_config(new)
            client_tls, backend_tls = tls.load(new)  # an unreadable certificate keeps the old
        except ConfigError as exc:
            log_event(logging.ERROR, "reload_failed", file=exc.file, key=exc.key, error=exc.problem)
            stats.reload_failures += 1
            self.reload_error = exc.message
            return False
        changed = [
            name
            for name in ("server", "backend", "limits", "roles", "databases", "faults", "tls")
            if getattr(new, name) != getattr(self.config, name)
        ]
        old, self.config = self.config, new
        control = self.control
        control.client_tls = client_tls
        control.backend = Backend(new.backend, backend_tls, self.loop)
        control.apply_config(new)
        log_event(logging.INFO, "reload", file=new.path, changed=",".join(changed) or "nothing")
        stats.reloads += 1
        self.reload_error = None
        check_admin_config(new, log_event)
        for key, moved in (
            ("server.listen", new.server.listen != old.server.listen),
            ("metrics.listen", new.metrics != old.metrics and self.serve_metrics),
            ("log.format", new.log != old.log),
        ):
            if moved:  # bound sockets stay as they are until a restart
                log_event(logging.WARNING, "reload_needs_restart", key=key)
        if _mirror_keys(new) != _mirror_keys(old):
            control.spawn(self._restart_mirror())
        return True

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting, answer waiters 57P03, let sessions finish, then close them.

        Returns True when every session ended by itself within ``timeout``
        (default ``[server] shutdown_timeout``).
        """
        if timeout is None:
            timeout = self.config.server.shutdown_timeout
        self.notifier.stopping()
        for listener in self._listeners:
            listener.close()
        control = self.control
        control.shut()
        clean = True
        try:
            async with asyncio.timeout(timeout):
                await control.wait_idle()
        except TimeoutError:
            clean = False
            log_event(logging.WARNING, "drain_timeout", sessions=len(control.clients))
            control.terminate_all()  # PostgreSQL's fast-shutdown FATAL 57P01
        await self.close()
        return clean

    async def close(self) -> None:
        """Stop at once: close listeners, every client and backend; cancel dials."""
        for listener in self._listeners:
            listener.close()
        control = self.control
        control.abort_all()
        control.close()
        await control.close_cluster()
        for closing in (self.metrics, self.mirror):
            if closing is not None:
                await closing.close()
        self.metrics = self.mirror = None
        if self.loop.get_exception_handler() == self._loop_exception:
            self.loop.set_exception_handler(None)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Loop-level errors: fd exhaustion the loop reports (an accept pgguard does not make
        itself, e.g. a library's server) is counted and logged without a traceback."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            self.control.fd_exhausted("accept", exc)
            return
        loop.default_exception_handler(context)

    # ---------------------------------------------------------- control plane

    def _open_console(self, client: ClientConnection, early: bytes) -> None:
        """Move a client that asked for database "pgguard" to an ``AdminSession``.

        The session is never counted against a limit; it leaves the client registry (so a
        drain does not wait for it) and is a console session until its socket closes.
        """
        transport = client.transport
        assert transport is not None and client.startup is not None
        session = AdminSession(
            self,
            transport,
            client.startup,
            client_id=client.id,
            peer=client.peer,
            connected_at=client.connected_at,
            runner=self.console_runner,
        )
        self.control.console_opened(client, session)
        transport.set_protocol(session)
        session.begin(early)

    async def _start_mirror(self) -> None:
        limits, dsn = self.config.limits, self.config.backend.monitor_dsn
        if limits.mirror_catalog and dsn:
            from .mirror import CatalogMirror

            self.mirror = CatalogMirror(self.control, dsn, limits.mirror_interval)
            await self.mirror.start()

    async def _restart_mirror(self) -> None:
        mirror, self.mirror = self.mirror, None
        if mirror is not None:
            await mirror.close()
        if not self.config.limits.mirror_catalog:
            self.control.apply_catalog({}, {})
        await self._start_mirror()


def _mirror_keys(c: Config) -> tuple[object, ...]:
    return (c.limits.mirror_catalog, c.limits.mirror_interval, c.backend.monitor_dsn)


StopRequest = Callable[[str], None]


async def serve(
    config: Config,
    *,
    server: Server | None = None,
    started: Callable[[Server, StopRequest], None] | None = None,
    notifier: Notifier | None = None,
) -> int:
    """Run until drained by a signal. Returns the process exit code.

    ``server`` (default: a new one for ``config``) is started here; then ``started`` gets
    it and a function that asks for the same drain as SIGTERM (a second call stops at once),
    with a reason for the log. ``notifier`` (see notify.py) hears READY, RELOADING, STOPPING,
    WATCHDOG and STATUS.
    """
    loop = asyncio.get_running_loop()
    if server is None:
        server = Server(config, loop=loop)
    if notifier is not None:
        server.notifier = notifier
    await server.start()
    keeping = loop.create_task(server.notifier.keep(server.status))
    stop = asyncio.Event()
    signals = 0

    def request(reason: str, event: str = "stop_requested") -> None:
        nonlocal signals
        signals += 1
        action = "drain" if signals == 1 else "stop"
        if event == "signal":
            log_event(logging.INFO, event, name=reason, action=action)
        else:
            log_event(logging.INFO, event, reason=reason, action=action)
        if signals == 1:
            stop.set()
        else:
            server.control.spawn(server.close())

    def on_stop(signum: int) -> None:
        request(signal.Signals(signum).name, "signal")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    if started is not None:
        started(server, request)
    server.notifier.ready()  # after the handlers: a SIGHUP from now on reloads, never kills
    try:
        await stop.wait()
        drain = loop.create_task(server.drain())
        stopped = loop.create_task(server.wait_stopped())
        await asyncio.wait({drain, stopped}, return_when=asyncio.FIRST_COMPLETED)
        clean = signals == 1 and drain.done() and drain.result()
        for task in (drain, stopped):
            task.cancel()  # after a second signal the drain is abandoned
    finally:
        keeping.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log_event(logging.INFO, "stop", clean=clean)
    return 0 if clean else 1


def run(config: Config) -> int:
    """Run pgguard in this process on a fresh (uv)loop until it is drained; it notifies the
    service manager named by ``$NOTIFY_SOCKET``, if any (systemd Type=notify)."""
    return run_loop(serve(config, notifier=from_env()))


def run_loop(main: Any) -> int:
    """Run coroutine ``main`` (returning an exit code) on a fresh (uv)loop, files limit raised."""
    raise_fd_limit()
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        result: int = loop.run_until_complete(main)
        return result
    finally:
        try:
            _finish_tasks(loop)
        finally:
            loop.close()


def _finish_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Let tasks still pending (a close cancelled by another close after a second signal, a
    Redis call) run their cancellation before the loop closes, as ``asyncio.run`` does, so
    none is destroyed pending (a log line with a traceback)."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
