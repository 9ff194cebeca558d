"""The service manager's end of ``$NOTIFY_SOCKET`` for tests: a datagram socket that records every notification."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pgguard.testing.wait import await_until

__all__ = ["NotifySocket", "notify_socket"]


class NotifySocket:
    """Every datagram received on ``address`` (the value for ``$NOTIFY_SOCKET``), as a dict
    of its ``KEY=value`` assignments, in order of arrival."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.messages: list[dict[str, str]] = []

    async def receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            lines = data.decode("utf-8", "replace").split("\n")
            self.messages.append(dict(line.split("=", 1) for line in lines if "=" in line))

    def index(self, key: str, value: str | None = None, after: int = -1) -> int:
        """Position of the first message after ``after`` holding ``key`` (= ``value``), or -1."""
        for i, m in enumerate(self.messages):
            if i > after and key in m and (value is None or m[key] == value):
                return i
        return -1

    async def wait_for(self, key: str, value: str | None = None, *, after: int = -1, timeout: float = 30.0) -> int:
        """Wait (bounded) for a message after ``after`` holding ``key`` (= ``value``); its position."""
        await await_until(
            lambda: self.index(key, value, after) >= 0, timeout=timeout,
            what=f"a notification {key}={value or '...'} after #{after} (got {self.messages})",
        )  # fmt: skip
        return self.index(key, value, after)


@asynccontextmanager
async def notify_socket(abstract: bool = True) -> AsyncIterator[NotifySocket]:
    """A bound AF_UNIX datagram socket, receiving in the background until the block ends:
    in the abstract namespace (``@name``) or at a short filesystem path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    directory = None
    if abstract:
        name = f"pgguard-notify-{uuid.uuid4().hex}"
        sock.bind(b"\0" + name.encode())
        address = "@" + name
    else:
        directory = tempfile.mkdtemp(prefix="pgn", dir="/tmp")  # AF_UNIX paths are short (108)
        address = os.path.join(directory, "notify")
        sock.bind(address)
    ns = NotifySocket(sock, address)
    receiving = asyncio.get_running_loop().create_task(ns.receive())
    try:
        yield ns
    finally:
        receiving.cancel()
        sock.close()
        if directory is not None:
            os.unlink(address)
            os.rmdir(directory)
