"""The native relay (pgguard._relay) on socketpairs: framing, back-pressure, closes, take-back.

No PostgreSQL here: each test plays both the client and the server on the far ends of two
socketpairs, to produce what a real server cannot be made to send on cue (a message split
across writes, a stall mid-message, an RST). The relay runs in its own thread, so every
wait is a blocking read with a timeout or a select on the relay's eventfd, never a sleep.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

_relay = pytest.importorskip("pgguard._relay")

TIMEOUT = 10.0
TERMINATE = b"X\x00\x00\x00\x04"
FATAL = b"E\x00\x00\x00\x0cSFATAL\x00\x00"


def msg(tag: bytes, body: bytes = b"") -> bytes:
    return tag + struct.pack("!I", len(body) + 4) + body


def rfq(status: bytes) -> bytes:
    return msg(b"Z", status)


class Pair:
    """A relayed session: ``client`` and ``server`` are the far ends the test plays."""

    def __init__(self, relay: Any, status: int = ord("I")) -> None:
        self.relay = relay
        self.client, near_c = socket.socketpair()
        self.server, near_b = socket.socketpair()
        for s in (self.client, self.server):
            s.settimeout(TIMEOUT)
        self.session = relay.add(os.dup(near_c.fileno()), os.dup(near_b.fileno()), self, status=status)
        near_c.close()  # the relay holds its own descriptors
        near_b.close()

    def read(self, sock: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            assert chunk, f"closed after {out!r}"
            out += chunk
        return out


def events(relay: Any, count: int) -> list[tuple[Any, int, int, bool]]:
    """Wait for ``count`` events from the relay."""
    got: list[tuple[Any, int, int, bool]] = []
    while len(got) < count:
        ready, _, _ = select.select([relay.fileno()], [], [], TIMEOUT)
        assert ready, f"no event after {got}"
        got += relay.events()
    return got


@pytest.fixture
def relay() -> Iterator[Any]:
    r = _relay.Relay(bufsize=4096)
    yield r
    r.close()
    r.events()  # give back the references of sessions closed by close()


def test_bytes_flow_both_ways_and_are_counted(relay: Any) -> None:
    p = Pair(relay)
    query = msg(b"Q", b"select 1\x00")
    p.client.sendall(query)
    assert p.read(p.server, len(query)) == query
    assert p.session.status == 0  # a query is running
    reply = msg(b"C", b"SELECT 1\x00") + rfq(b"I")
    p.server.sendall(reply)
    assert p.read(p.client, len(reply)) == reply
    assert (p.session.bytes_in, p.session.bytes_out) == (len(query), len(reply))
    assert p.session.status == ord("I")


def test_status_follows_ready_for_query_split_anywhere(relay: Any) -> None:
    p = Pair(relay)
    stream = msg(b"T", b"x" * 30) + msg(b"D", b"y" * 50) + msg(b"C", b"SELECT 1\x00") + rfq(b"T")
    query = msg(b"Q", b"begin; select 1\x00")
    p.client.sendall(query)
    p.read(p.server, len(query))
    for i in range(len(stream)):  # one byte at a time: every split point
        p.server.sendall(stream[i : i + 1])
        assert p.read(p.client, 1) == stream[i : i + 1]
        expected = ord("T") if i == len(stream) - 1 else 0
        assert p.session.status == expected, i


def test_async_messages_keep_the_session_idle(relay: Any) -> None:
    p = Pair(relay, status=ord("I"))
    unasked = msg(b"A", b"\x00\x00\x00\x01chan\x00hi\x00") + msg(b"N", b"Mnote\x00\x00") + msg(b"S", b"a\x00b\x00")
    p.server.sendall(unasked)
    p.read(p.client, len(unasked))
    assert p.session.status == ord("I")
    p.client.sendall(TERMINATE)  # a goodbye is not a query
    p.read(p.server, 5)
    assert p.session.status == ord("I")


def test_client_fin_is_reported_and_the_server_side_stays_open(relay: Any) -> None:
    p = Pair(relay)
    p.client.close()
    [(ctx, kind, detail, final)] = events(relay, 1)
    assert (ctx, kind, detail, final) == (p, _relay.CLIENT_CLOSED, 0, False)
    assert p.read(p.server, 5) == TERMINATE  # the relay says goodbye for the client
    p.server.sendall(b"late bytes are drained")
    p.server.close()
    assert events(relay, 1) == [(p, _relay.BACKEND_CLOSED, 0, True)]
    assert relay.sessions == 0


def test_a_client_that_said_goodbye_gets_no_second_terminate(relay: Any) -> None:
    p = Pair(relay)
    p.client.sendall(TERMINATE)
    p.client.close()
    assert events(relay, 1)[0][1] == _relay.CLIENT_CLOSED
    p.session.close_backend()
    got = b""
    while chunk := p.server.recv(100):
        got += chunk
    assert got == TERMINATE
    assert events(relay, 1)[0][1:] == (_relay.BACKEND_CLOSED, _relay.REQUESTED, True)


def test_tcp_rst_from_the_client_is_an_error() -> None:
    """Over TCP an abortive close (SO_LINGER 0) is an RST: the relay reports ECONNRESET."""
    relay = _relay.Relay(bufsize=4096)
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    near_c, _ = listener.accept()
    server, near_b = socket.socketpair()
    try:
        session = relay.add(os.dup(near_c.fileno()), os.dup(near_b.fileno()), "ctx")
        near_c.close()
        near_b.close()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        [(_, kind, detail, final)] = events(relay, 1)
        assert (kind, detail, final) == (_relay.CLIENT_CLOSED, 104, False)  # ECONNRESET
        session.abort_backend()
        events(relay, 1)
    finally:
        relay.close()
        relay.events()
        server.close()
        listener.close()


def test_server_fin_is_reported_and_pending_bytes_reach_the_client(relay: Any) -> None:
    p = Pair(relay)
    goodbye = msg(b"E", b"SFATAL\x00C57P01\x00\x00")
    p.server.sendall(goodbye)
    p.server.close()
    assert events(relay, 1) == [(p, _relay.BACKEND_CLOSED, 0, False)]
    p.session.close_client()  # what pgguard does: flush, then close
    assert p.read(p.client, len(goodbye)) == goodbye
    assert p.client.recv(1) == b""
    assert events(relay, 1) == [(p, _relay.CLIENT_CLOSED, _relay.REQUESTED, True)]


def test_back_pressure_bounds_what_the_relay_buffers(relay: Any) -> None:
    """A client that stops reading stops the relay reading the server: the server's writes
    block once the socket buffers and the relay's 4 KiB are full; nothing is lost."""
    p = Pair(relay)
    p.server.setblocking(False)
    sent = bytearray()
    block = bytes(range(256)) * 64
    while len(sent) < 64 * 1024 * 1024:
        try:
            n = p.server.send(block)
        except BlockingIOError:
            writable = select.select([], [p.server], [], 1.0)[1]
            if not writable:
                break  # blocked: the relay has stopped reading
            continue
        sent += block[:n]
    assert len(sent) < 64 * 1024 * 1024, "the relay buffered without bound"
    buffered = p.session.bytes_out  # relayed so far: what the client's socket and the relay hold
    assert buffered <= len(sent)
    got = p.read(p.client, len(sent))
    assert got == bytes(sent)
    assert p.session.bytes_out == len(sent)


def test_take_back_at_a_boundary_is_written_at_once(relay: Any) -> None:
    p = Pair(relay)
    p.session.send_client(FATAL)
    p.session.close_client()
    assert p.read(p.client, len(FATAL)) == FATAL
    assert p.client.recv(1) == b""
    assert events(relay, 1)[0][1:3] == (_relay.CLIENT_CLOSED, _relay.REQUESTED)
    p.session.abort_backend()
    events(relay, 1)


def test_take_back_mid_message_completes_the_message_first(relay: Any) -> None:
    p = Pair(relay)
    row = msg(b"D", b"r" * 100)
    p.server.sendall(row[:40])
    assert p.read(p.client, 40) == row[:40]  # the client has part of the row
    p.session.send_client(FATAL)
    p.session.close_client()
    p.server.sendall(row[40:] + msg(b"D", b"after") + rfq(b"I"))
    assert p.read(p.client, len(row) - 40 + len(FATAL)) == row[40:] + FATAL
    assert p.client.recv(1) == b""  # what the server sent after the row is dropped
    events(relay, 1)
    p.session.abort_backend()
    events(relay, 1)


def split_messages(data: bytes) -> list[bytes]:
    """Whole messages only: a trailing fragment fails the test."""
    out = []
    while data:
        assert len(data) >= 5, data
        end = 1 + struct.unpack("!I", data[1:5])[0]
        assert len(data) >= end, f"a partial {data[:1]!r} message of {len(data)} bytes"
        out.append(data[:end])
        data = data[end:]
    return out


def test_take_back_behind_a_slow_client_still_lands_on_a_boundary(relay: Any) -> None:
    """The client reads nothing while the server streams rows and stops mid-row; whatever
    part of that row the relay holds or has sent, the client gets whole messages, then the
    FATAL, then end of file."""
    p = Pair(relay)
    rows = b"".join(msg(b"D", b"%06d" % i * 10) for i in range(2000))  # 130 KB
    partial = msg(b"D", b"z" * 500)
    p.server.setblocking(False)
    view = memoryview(rows + partial[:200])
    while view:
        try:
            view = view[p.server.send(view) :]
        except BlockingIOError:
            break  # every buffer is full: the rest is sent after the take-back
    p.session.send_client(FATAL)
    p.session.close_client()
    rest = bytes(view) + partial[200:] + msg(b"D", b"after")
    p.server.setblocking(True)
    sender = threading.Thread(target=p.server.sendall, args=(rest,))
    sender.start()
    got = bytearray()
    while chunk := p.client.recv(1 << 16):
        got += chunk
    sender.join(TIMEOUT)
    messages = split_messages(bytes(got))
    assert messages[-1] == FATAL
    assert b"".join(messages[:-1]) == (rows + partial)[: len(got) - len(FATAL)]
    events(relay, 1)
    p.session.abort_backend()
    events(relay, 1)


def test_server_closing_mid_message_still_delivers_the_take_back(relay: Any) -> None:
    p = Pair(relay)
    p.server.sendall(b"D\x00\x00\x00\x64rrr")
    p.read(p.client, 8)
    p.session.send_client(FATAL)
    p.session.close_client()
    p.server.close()  # no boundary will come
    got = b""
    while chunk := p.client.recv(100):
        got += chunk
    assert got == FATAL
    assert sorted(e[1] for e in events(relay, 2)) == [_relay.CLIENT_CLOSED, _relay.BACKEND_CLOSED]


def test_writes_after_close_and_a_closed_relay_are_harmless(relay: Any) -> None:
    p = Pair(relay)
    p.session.abort_client()
    p.session.abort_backend()
    got = events(relay, 2)
    assert [e[3] for e in got] == [False, True]
    p.session.send_backend(TERMINATE)  # both sides gone: ignored
    p.session.close_client()
    relay.close()
    with pytest.raises(RuntimeError):
        p.session.send_backend(TERMINATE)


def test_close_ends_every_live_session() -> None:
    relay = _relay.Relay(bufsize=4096)
    pairs = [Pair(relay) for _ in range(3)]
    relay.close()
    got = relay.events()
    assert sum(1 for e in got if e[3]) == 3
    assert relay.sessions == 0
    for p in pairs:
        assert p.client.recv(1) == b""
        assert p.read(p.server, 5) == TERMINATE and p.server.recv(1) == b""


def _keep_pair(relay: Any) -> tuple[Pair, int]:
    """A keep session ([pool]); returns it and the relay's own descriptor for the server side."""
    p = Pair.__new__(Pair)
    p.relay = relay
    p.client, near_c = socket.socketpair()
    p.server, near_b = socket.socketpair()
    for s in (p.client, p.server):
        s.settimeout(TIMEOUT)
    bfd = os.dup(near_b.fileno())
    p.session = relay.add(os.dup(near_c.fileno()), bfd, p, status=ord("I"), keep=True)
    near_c.close()
    near_b.close()
    return p, bfd


def test_keep_hands_the_idle_server_side_back_and_swallows_the_terminate(relay: Any) -> None:
    p, bfd = _keep_pair(relay)
    query = msg(b"Q", b"select 1\x00")
    p.client.sendall(query)
    assert p.read(p.server, len(query)) == query
    reply = msg(b"C", b"SELECT 1\x00") + rfq(b"I")
    p.server.sendall(reply)
    assert p.read(p.client, len(reply)) == reply
    p.client.sendall(TERMINATE)
    [(ctx, kind, detail, final)] = events(relay, 1)
    assert (ctx, kind, detail, final) == (p, _relay.CLIENT_CLOSED, _relay.RELEASED, True)
    # The server saw no Terminate, and the descriptor is open and ours: it still talks.
    back = socket.socket(fileno=bfd)
    back.settimeout(TIMEOUT)
    back.sendall(b"ping")
    assert p.read(p.server, 4) == b"ping"
    back.close()


def test_keep_lets_a_busy_session_end_as_usual(relay: Any) -> None:
    p, _ = _keep_pair(relay)
    query = msg(b"Q", b"select pg_sleep(1)\x00")
    p.client.sendall(query)
    assert p.read(p.server, len(query)) == query
    p.client.close()  # mid-query: the server gets a Terminate and the relay closes its side
    assert p.read(p.server, len(TERMINATE)) == TERMINATE
    got = events(relay, 1)
    assert got[0][1] == _relay.CLIENT_CLOSED and got[0][2] != _relay.RELEASED
    p.server.close()
    events(relay, 1)


def test_a_client_gone_before_the_hand_over_never_leaves_the_server_side_registered(relay: Any) -> None:
    """A client that resets right at the hand-over (the chaos harness's reuse run): its side
    is read at once, and the server side is handed back (keep) or closed. Both sides join the
    epoll set in the relay thread, so the server side can never be registered after the
    session ended, pointing at a freed session (which crashed the process when the server
    side next had bytes to read)."""
    for i in range(500):
        client, near_c = socket.socketpair()
        server, near_b = socket.socketpair()
        client.close()  # gone before the relay has the session
        bfd = os.dup(near_b.fileno())
        session = relay.add(os.dup(near_c.fileno()), bfd, None, status=ord("I"), keep=i % 2 == 0)
        near_c.close()
        near_b.close()
        got = events(relay, 1)
        assert got[0][1] == _relay.CLIENT_CLOSED
        if got[0][2] == _relay.RELEASED:  # keep: the server side is ours again, open
            back = socket.socket(fileno=bfd)
            server.sendall(b"after")  # bytes the relay must never see
            assert back.recv(5) == b"after"
            back.close()
        else:
            assert server.recv(5) == TERMINATE  # told the client left; closed when the server goes
            server.close()
            assert events(relay, 1)[0][1:] == (_relay.BACKEND_CLOSED, 0, True)
        del session
        server.close()
    assert relay.sessions == 0
