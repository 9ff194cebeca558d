"""The service manager's notification protocol (systemd ``Type=notify``): datagrams to ``$NOTIFY_SOCKET``.

The protocol is one AF_UNIX datagram per notification, newline-separated ``KEY=value``
assignments (see sd_notify(3)); no library is needed. ``$NOTIFY_SOCKET`` is a filesystem path
or, starting with ``@``, a name in the abstract namespace (the ``@`` stands for a leading NUL
byte). Without the variable every call is a no-op, so ``pgguard run`` behaves the same outside
systemd. What pgguard sends and when:

- ``READY=1`` once it listens and serves (with ``[server] workers``: once every worker serves);
- ``RELOADING=1`` with ``MONOTONIC_USEC=<CLOCK_MONOTONIC in microseconds>`` before a reload
  (SIGHUP or the console's RELOAD), then ``READY=1`` when it is done (also when the new file
  was refused: the old configuration stays in force and pgguard keeps serving);
- ``STOPPING=1`` when the drain begins;
- ``WATCHDOG=1`` every ``$WATCHDOG_USEC / 2`` when ``$WATCHDOG_USEC`` is set and
  ``$WATCHDOG_PID`` is unset or this process's pid: sent from the event loop, so a loop that
  stops turning stops the pings;
- ``STATUS=`` with the sessions and waiting clients, sent when the text changes (checked once a
  second, or every half watchdog period when that is shorter).

A send that fails (the manager is gone, its queue full) is logged once and otherwise ignored:
notifications never stop pgguard from serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Final

from .log import log_event

__all__ = ["Notifier", "from_env", "monotonic_usec", "CHILD_ENV", "STATUS_EVERY"]

# The variables a child process (a worker) must not inherit: only the main process notifies.
CHILD_ENV: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# Seconds between STATUS checks (a STATUS datagram goes out only when the text changed).
STATUS_EVERY: Final = 1.0


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # sd_notify ignores anything else too (vsock addresses are not supported here)


class Notifier:
    """One process's notifications to its service manager (``address`` None: all no-ops)."""

    def __init__(self, address: str | bytes | None, watchdog: float | None = None) -> None:
        self.address = address
        # Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None.
        self.watchdog = watchdog
        self._sock: socket.socket | None = None
        self._failed = False
        self._status = ""

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; True when it was sent (or nothing to do)."""
        if self.address is None:
            return True
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(assignments).encode("utf-8", "backslashreplace"), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log_event(logging.WARNING, "notify_failed", socket=os.fsdecode(self.address), error=exc.strerror or str(exc))
            return False
        return True

    def ready(self) -> None:
        self.send("READY=1", f"STATUS={self._status}" if self._status else "STATUS=serving")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=draining")

    def status(self, text: str) -> None:
        """``STATUS=text``, sent only when it differs from the last one sent."""
        if text != self._status:
            self._status = text
            self.send(f"STATUS={text}")

    async def keep(self, status: Callable[[], str]) -> None:
        """Until cancelled: WATCHDOG=1 every ``watchdog`` seconds, ``status()`` as STATUS= on change."""
        if self.address is None:
            return
        tick = STATUS_EVERY if self.watchdog is None else min(STATUS_EVERY, self.watchdog)
        loop = asyncio.get_running_loop()
        next_ping = loop.time()
        while True:
            if self.watchdog is not None and loop.time() >= next_ping:
                self.send("WATCHDOG=1")
                next_ping = loop.time() + self.watchdog
            self.status(status())
            await asyncio.sleep(tick)  # a period, not a synchronisation

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def from_env(env: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
    """The notifier ``$NOTIFY_SOCKET`` / ``$WATCHDOG_USEC`` / ``$WATCHDOG_PID`` describe."""
    env = os.environ if env is None else env
    address = _address(env.get("NOTIFY_SOCKET", ""))
    watchdog: float | None = None
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    mine = not owner or owner == str(os.getpid() if pid is None else pid)
    if usec.isdigit() and int(usec) > 0 and mine:
        watchdog = int(usec) / 1e6 / 2
    return Notifier(address, watchdog)
