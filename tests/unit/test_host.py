"""The supervisor's side of host admission (host.SharedGate), driven frame by frame in one
process: which worker hears what, and what a dead worker's slots do. The processes, the
channel and a real server are in tests/cluster/test_workers_host.py."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pgguard.config import BackendConfig
from pgguard.host import SharedGate, local_backend
from pgguard.limits import RoleRule, Rules
from pgguard.testing.wait import await_until

RULES = Rules(roles={"app": RoleRule(max_connections=1, queue_timeout=60.0)})


def _gate(
    alive: dict[int, bool], sent: list[tuple[int, dict[str, Any]]], backend: BackendConfig, rules: Rules = RULES
) -> SharedGate:
    def notify(worker: int, message: dict[str, Any]) -> bool:
        if not alive.get(worker, True):
            return False
        sent.append((worker, message))
        return True

    return SharedGate(rules, backend, asyncio.get_running_loop(), notify=notify)


def _arrive(gate: SharedGate, worker: int, cid: int) -> dict[str, Any]:
    reply = gate.handle(worker, {"op": "arrive", "c": cid, "r": "app", "d": "db"})
    assert reply is not None
    return reply


async def test_a_release_admits_the_oldest_waiter_on_whichever_worker_it_waits() -> None:
    sent: list[tuple[int, dict[str, Any]]] = []
    gate = _gate({}, sent, BackendConfig())
    first = _arrive(gate, 0, 1)
    assert first["k"] == "a"
    assert [_arrive(gate, w, c)["k"] for w, c in ((1, 2), (0, 3), (1, 4))] == ["q", "q", "q"]
    gate.notice(0, {"op": "release", "t": first["t"]})
    assert [(w, m["op"], m["c"]) for w, m in sent] == [(1, "admitted", 2)]
    gate.notice(1, {"op": "leave", "c": 4})  # left: skipped
    gate.notice(0, {"op": "release", "t": first["t"]})  # twice, or from the wrong worker: no-op
    gate.notice(0, {"op": "release", "t": sent[0][1]["t"]})
    assert len(sent) == 1
    gate.notice(1, {"op": "release", "t": sent[0][1]["t"]})
    assert [(w, m["c"]) for w, m in sent] == [(1, 2), (0, 3)]
    assert gate.gate.total_waiting == 0 and gate.gate.total_active == 1
    gate.close()


async def test_a_slot_given_to_a_worker_that_is_gone_passes_on() -> None:
    alive: dict[int, bool] = {}
    sent: list[tuple[int, dict[str, Any]]] = []
    gate = _gate(alive, sent, BackendConfig())
    first = _arrive(gate, 0, 1)
    _arrive(gate, 1, 2)
    _arrive(gate, 0, 3)
    alive[1] = False  # died; worker_gone not called yet
    gate.notice(0, {"op": "release", "t": first["t"]})
    assert [(w, m["c"]) for w, m in sent] == [(0, 3)]
    assert gate.gate.total_active == 1
    gate.close()


async def test_queue_timeout_is_told_to_the_waiters_worker_with_the_53300_rejection() -> None:
    sent: list[tuple[int, dict[str, Any]]] = []
    rules = Rules(roles={"app": RoleRule(max_connections=1, queue_timeout=0.05)})
    gate = _gate({}, sent, BackendConfig(), rules)
    _arrive(gate, 0, 1)
    _arrive(gate, 1, 2)
    await await_until(lambda: bool(sent), timeout=10, what="the waiter to time out")
    worker, message = sent[0]
    assert worker == 1 and message["op"] == "expired" and message["c"] == 2
    assert message["j"][:4] == ["role_max_connections", "app", 1, "queue_timeout"]
    gate.close()


async def test_a_dead_workers_waiters_are_gone_and_its_slots_wait_for_the_grace() -> None:
    """A remote server (not loopback) and no pid: the slot comes back after close_timeout."""
    sent: list[tuple[int, dict[str, Any]]] = []
    alive = {0: True}
    backend = BackendConfig(host="192.0.2.1", close_timeout=0.1)
    gate = _gate(alive, sent, backend)
    _arrive(gate, 0, 1)
    _arrive(gate, 0, 2)  # dies with worker 0
    _arrive(gate, 1, 3)
    alive[0] = False
    gate.worker_gone(0)
    assert gate.lost_waiters == 1 and gate.held == 1
    assert sent == []  # still held: the server may still count the session
    await await_until(lambda: gate.held == 0, timeout=10, what="the grace to end")
    assert [(w, m["op"], m["c"]) for w, m in sent] == [(1, "admitted", 3)]
    gate.close()


async def test_a_dead_workers_slot_is_held_while_its_local_server_process_lives(tmp_path) -> None:
    """A local server: the reported pid is watched (a pidfd). A process named postgres
    stands in for the server process (a real one: tests/cluster/test_workers_host.py)."""
    sent: list[tuple[int, dict[str, Any]]] = []
    gate = _gate({0: False}, sent, BackendConfig(host="127.0.0.1", close_timeout=60.0))
    assert local_backend(gate.backend)
    fake = tmp_path / "postgres"  # its comm: the name it was executed by
    fake.symlink_to(shutil.which("sleep"))
    proc = subprocess.Popen([str(fake), "60"])
    try:
        comm = Path(f"/proc/{proc.pid}/comm")
        await await_until(lambda: comm.read_text().strip() == "postgres", timeout=10, what="the exec")
        first = _arrive(gate, 0, 1)
        gate.notice(0, {"op": "pid", "t": first["t"], "p": proc.pid})
        _arrive(gate, 1, 2)
        gate.worker_gone(0)
        assert gate.held == 1
        assert sent == []
        proc.kill()
        await await_until(lambda: gate.held == 0, timeout=10, what="the held slot to come back")
        assert [(w, m["c"]) for w, m in sent] == [(1, 2)]
    finally:
        proc.kill()
        proc.wait()
        gate.close()
