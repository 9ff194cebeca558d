"""A throwaway redis-server on a free loopback port, for the cluster-mode tests and benchmarks.

Theory
------
A `RedisServer` owns one temporary directory (its working directory and log file) and one
``redis-server`` child process, started with persistence off (``save ""``, no AOF), so a
restart always comes back empty, exactly like a production Redis without persistence after
a crash. ``start()`` returns once the server answers ``PING``; ``stop()`` ends it (SIGTERM,
SIGKILL if it lingers) and removes the directory. ``kill()`` is SIGKILL with the directory
kept, ``pause()``/``resume()`` are SIGSTOP/SIGCONT (a hung Redis that keeps its data), and ``restart()`` starts a new server on the *same* port, so clients configured with
the old URL reconnect to it: that is the outage the cluster tests need.

Port: like `PostgresCluster`, ``free_port()`` may race another process; if the server exits
at start saying it could not bind, another port is tried a bounded number of times (not on
``restart()``, which must keep its port).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Final

from .cluster import free_port

__all__ = ["REDIS_SERVER_ENV", "RedisError", "RedisServer", "find_redis_server"]

REDIS_SERVER_ENV: Final = "PGGUARD_REDIS_SERVER"
_DEFAULT_PATH: Final = "/usr/bin/redis-server"  # Debian's redis-server package
_HOST: Final = "127.0.0.1"
# A loopback redis-server is ready in a few milliseconds; 20 s covers a loaded CI machine.
_START_TIMEOUT_S: Final = 20.0
_STOP_TIMEOUT_S: Final = 10.0
_PORT_ATTEMPTS: Final = 3
_POLL_INTERVAL_S: Final = 0.01


class RedisError(RuntimeError):
    """The throwaway redis-server could not be found, started or stopped; says why."""


def find_redis_server() -> str | None:
    """``$PGGUARD_REDIS_SERVER``, Debian's /usr/bin/redis-server, or the one on PATH; else None."""
    for candidate in (os.environ.get(REDIS_SERVER_ENV), _DEFAULT_PATH, shutil.which("redis-server")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class RedisServer:
    """A disposable, non-persistent redis-server on loopback; a context manager."""

    host: Final[str] = _HOST

    def __init__(self, *, binary: str | None = None) -> None:
        """Find the binary now (raise `RedisError` if there is none); start nothing yet."""
        found = binary or find_redis_server()
        if found is None:
            raise RedisError(
                f"redis-server not found (install Debian's redis-server package or set ${REDIS_SERVER_ENV})"
            )
        self._binary = found
        self._dir: Path | None = None
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisServer {self.host}:{self._port} {'running' if self.running else 'stopped'}>"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The redis-server's process id while it runs (the benchmarks read its CPU time)."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisError("the redis-server was never started")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``: the same across `kill` / `restart`."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        if self._dir is None:
            raise RedisError("the redis-server was never started")
        return self._dir / "redis.log"

    def start(self) -> None:
        """Start on a free port and wait for PING; no-op if running. Raises `RedisError`."""
        if self.running:
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="pgguard-redis-"))
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self._port = free_port(self.host)
            try:
                self._spawn()
                break
            except RedisError:
                if attempt == _PORT_ATTEMPTS or "bind" not in self._log_tail().lower():
                    self.stop()
                    raise
        atexit.register(self.stop)

    def restart(self) -> None:
        """Start again on the same port (empty: nothing was persisted); kill first if running."""
        if self._port is None or self._dir is None:
            raise RedisError("restart() needs a server that was started before")
        self.kill()
        self._spawn()

    def kill(self) -> None:
        """SIGKILL the server (an outage); the port and directory are kept for `restart`."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(_STOP_TIMEOUT_S)
        self._proc = None

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open but nothing answers (a hung or
        partitioned Redis that keeps its data). `resume` undoes it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its directory; idempotent."""
        atexit.unregister(self.stop)
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(_STOP_TIMEOUT_S)
        self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- internals -----------------------------------------------------------------------

    def _spawn(self) -> None:
        assert self._dir is not None and self._port is not None
        argv = [
            self._binary,
            "--bind", self.host,
            "--port", str(self._port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--logfile", str(self._dir / "redis.log"),
            "--daemonize", "no",
            "--protected-mode", "no",
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._pings():
            if self._proc.poll() is not None:
                self._proc = None
                raise RedisError(f"redis-server exited at start:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RedisError(f"redis-server did not answer PING in {_START_TIMEOUT_S}s")
            time.sleep(_POLL_INTERVAL_S)

    def _pings(self) -> bool:
        assert self._port is not None
        try:
            with socket.create_connection((self.host, self._port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except (OSError, RedisError):
            return ""
