"""The supervisor-worker channel of ``[server] workers``: framed JSON over a real socketpair,
both ends in this process (the processes themselves are tested in tests/cluster/test_workers.py)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from pgguard import workers
from pgguard.workers import Channel, ChannelClosed, WorkerSpec


async def _echo(message: dict[str, Any]) -> dict[str, Any]:
    if message["op"] == "big":
        return {"text": "x" * 5000}
    if message["op"] == "boom":
        raise RuntimeError("boom")
    return {"echo": message.get("value")}


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[Channel, Channel, list[dict[str, Any]]]]:
    a_sock, b_sock = socket.socketpair()
    notices: list[dict[str, Any]] = []
    ar, aw = await asyncio.open_unix_connection(sock=a_sock)
    br, bw = await asyncio.open_unix_connection(sock=b_sock)
    a = Channel(ar, aw, handle=_echo)
    b = Channel(br, bw, handle=_echo, notice=notices.append)
    tasks = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
    try:
        yield a, b, notices
    finally:
        a.close()
        b.close()
        await asyncio.gather(*tasks)


async def test_requests_are_answered_both_ways_and_notices_delivered() -> None:
    async with pair() as (a, b, notices):
        replies = await asyncio.gather(*(a.request("echo", value=i) for i in range(20)))
        assert [r["echo"] for r in replies] == list(range(20))
        assert (await b.request("echo", value="é\udcff"))["echo"] == "é\udcff"  # escaped names survive
        await a.notify("started", pid=1)
        await asyncio.wait_for(_until(lambda: notices), 5)
        assert notices == [{"op": "started", "pid": 1}]


@pytest.mark.log_errors("channel_request_failed")
async def test_a_failing_handler_answers_an_error_and_the_channel_goes_on() -> None:
    async with pair() as (a, _b, _):
        reply = await a.request("boom")
        assert reply["error"]["sqlstate"] == "XX000"
        assert (await a.request("echo", value=1))["echo"] == 1


async def test_a_reply_over_the_frame_bound_becomes_an_error(monkeypatch) -> None:
    monkeypatch.setattr(workers, "MAX_FRAME", 1000)
    async with pair() as (a, _b, _):
        reply = await a.request("big")
        assert reply["error"]["sqlstate"] == "54000"
        assert (await a.request("echo", value=2))["echo"] == 2


@pytest.mark.log_errors("channel_error")
async def test_an_oversized_frame_closes_the_channel_and_fails_waiting_requests() -> None:
    a_sock, b_sock = socket.socketpair()
    ar, aw = await asyncio.open_unix_connection(sock=a_sock)
    a = Channel(ar, aw, handle=_echo)
    reading = asyncio.create_task(a.run())
    waiting = asyncio.create_task(a.request("echo", value=1))
    # b never answers; whether the request was sent before the frame or not, it fails
    b_sock.sendall(struct.pack(">I", workers.MAX_FRAME + 1))
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(waiting, 5)
    await asyncio.wait_for(reading, 5)
    assert a.closed
    with pytest.raises(ChannelClosed):
        await a.request("echo")
    b_sock.close()


async def test_the_peer_closing_fails_waiting_requests() -> None:
    a_sock, b_sock = socket.socketpair()
    ar, aw = await asyncio.open_unix_connection(sock=a_sock)
    a = Channel(ar, aw, handle=_echo)
    reading = asyncio.create_task(a.run())
    waiting = asyncio.create_task(a.request("echo"))
    b_sock.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(waiting, 5)
    await asyncio.wait_for(reading, 5)


def test_worker_spec_round_trips() -> None:
    spec = WorkerSpec(index=1, count=4, fd=7, listen=("127.0.0.1:6432",), configured=("127.0.0.1:0",))
    assert WorkerSpec.loads(spec.dumps()) == spec


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.01)
