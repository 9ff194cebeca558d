"""listen.py: the Acceptor sees a failed accept, keeps the pending connection and serves it later.

The kernel cannot be made to fail one accept(2) on cue inside this process without starving
the test itself of descriptors, so the listening socket here is a real one whose ``accept``
raises EMFILE a chosen number of times first (the subprocess test in
tests/integration/test_hardening.py lowers a real pgguard's limit with prlimit instead).
"""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from pgguard import listen


class _FailingListener(socket.socket):
    """A listening socket whose first ``failures`` accepts fail with EMFILE."""

    failures = 0

    def accept(self) -> tuple[socket.socket, object]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


class _Greeter(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"hi")  # type: ignore[attr-defined]
        transport.close()


def _run(failures: int, loop_kind: str) -> tuple[bytes, list[int]]:
    async def main() -> tuple[bytes, list[int]]:
        loop = asyncio.get_running_loop()
        sock = _FailingListener(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        sock.failures = failures
        errors: list[int] = []
        acceptor = listen.Acceptor(loop, sock, _Greeter, lambda exc: errors.append(exc.errno or 0))
        try:
            reader, writer = await asyncio.open_connection(*sock.getsockname())
            data = await asyncio.wait_for(reader.read(), 10)
            writer.close()
        finally:
            acceptor.close()
        return data, errors

    if loop_kind == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    return asyncio.run(main())


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
@pytest.mark.parametrize("failures", [0, 1, 3])
def test_a_failed_accept_is_reported_and_the_connection_served_after_the_pause(
    failures: int, loop_kind: str
) -> None:
    data, errors = _run(failures, loop_kind)
    assert data == b"hi"  # not closed without a word: served once accept works again
    assert errors == [errno.EMFILE] * failures


def test_bind_names_the_address_it_could_not_take() -> None:
    taken = listen.bind("127.0.0.1", 0)
    try:
        port = taken[0].getsockname()[1]
        with pytest.raises(OSError, match="error while attempting to bind on address") as info:
            listen.bind("127.0.0.1", port)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        for sock in taken:
            sock.close()
