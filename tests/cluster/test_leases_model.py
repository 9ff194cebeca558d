"""Hypothesis: the lease store's Lua scripts on a real Redis against an independent model.

The model keeps, per instance, its leases in acquisition order and whether the store still
counts them; every limit's use is computed from it, never read back. Steps: acquire (forced
or not), release (again, too), run-time limits set and removed, an instance expiring (its
heartbeat score set in the past, as if it had stopped renewing), its next call re-registering
in ``fit`` mode, and Redis losing every key (all instances re-register in ``force`` mode, run-time limits
written back by the first).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pgguard.leases import Blocked, Claim, ClusterEvent, Lease, LeaseStore, Renewal, Restored
from pgguard.limits import Limit
from pgguard.testing.redis import RedisServer

INSTANCES = 3
ROLES = ("r0", "r1")
DATABASES = ("d0", "d1")
_URL: list[str] = []  # set by the test before the machine runs
_limits = st.integers(-1, 3)


@dataclass
class ModelLease:
    id: str
    role: str
    database: str

    @property
    def ids(self) -> tuple[str, str, str]:
        return ("t", f"r:{self.role}", f"d:{self.database}")


@dataclass
class ModelInstance:
    store: LeaseStore
    leases: list[ModelLease] = field(default_factory=list)
    expired: bool = False  # purged in Redis; its next call re-registers what fits
    events: list[ClusterEvent] = field(default_factory=list)


class LeaseMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.prefix = f"m{uuid.uuid4().hex[:10]}"
        self.raw = aioredis.Redis.from_url(_URL[0], decode_responses=True)
        self.instances: list[ModelInstance] = []
        for n in range(INSTANCES):
            inst = ModelInstance(store=None)  # type: ignore[arg-type]
            inst.store = LeaseStore(
                _URL[0], instance=f"n{n}", prefix=self.prefix, lease_ttl=600, timeout=5,
                on_event=inst.events.append,
            )  # fmt: skip
            self.run(inst.store.start(background=False))
            self.instances.append(inst)
        self.probe = LeaseStore(
            _URL[0], instance="probe", prefix=self.prefix, lease_ttl=600, timeout=5
        )
        self.run(self.probe.start(background=False))
        self.config: dict[str, int] = {}
        self.runtime: dict[str, int] = {}

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        for inst in self.instances:
            self.run(inst.store.close())
        self.run(self.probe.close())
        keys = self.run(self.raw.keys(f"{{{self.prefix}}}:*"))
        if keys:
            self.run(self.raw.delete(*keys))
        self.run(self.raw.aclose())
        self.loop.close()

    # ---------------------------------------------------------------- model

    def effective(self, limit_id: str) -> int:
        return self.runtime.get(limit_id, self.config[limit_id])

    def used(self, limit_id: str) -> int:
        return sum(
            limit_id in lease.ids
            for inst in self.instances
            if not inst.expired
            for lease in inst.leases
        )

    def fit_restore(self, inst: ModelInstance) -> set[str]:
        """The model of ``register`` in fit mode: oldest first, while every limit has room."""
        candidates, inst.leases, inst.expired = inst.leases, [], False
        lost = set()
        for lease in candidates:
            if all(self.effective(i) < 0 or self.used(i) < self.effective(i) for i in lease.ids):
                inst.leases.append(lease)
            else:
                lost.add(lease.id)
        return lost

    def claims(self, role: str, database: str) -> list[Claim]:
        return [
            Claim(Limit.TOTAL, "", self.config["t"]),
            Claim(Limit.ROLE, role, self.config[f"r:{role}"]),
            Claim(Limit.DATABASE, database, self.config[f"d:{database}"]),
        ]

    def check_restored(self, inst: ModelInstance, lost: set[str]) -> None:
        restored = [e for e in inst.events if isinstance(e, Restored)]
        assert restored, "the store did not re-register"
        assert restored[-1].cause is Renewal.EXPIRED
        assert set(restored[-1].lost) == lost
        inst.events.clear()

    # ---------------------------------------------------------------- rules

    @initialize(total=_limits, roles=st.tuples(_limits, _limits), dbs=st.tuples(_limits, _limits))
    def limits(self, total: int, roles: tuple[int, int], dbs: tuple[int, int]) -> None:
        self.config = {"t": total}
        self.config.update({f"r:{r}": v for r, v in zip(ROLES, roles, strict=True)})
        self.config.update({f"d:{d}": v for d, v in zip(DATABASES, dbs, strict=True)})

    @rule(
        n=st.integers(0, INSTANCES - 1),
        role=st.sampled_from(ROLES),
        database=st.sampled_from(DATABASES),
        force=st.sampled_from([False, False, False, True]),
    )
    def acquire(self, n: int, role: str, database: str, force: bool) -> None:
        self._acquire(self.instances[n], role, database, force)

    @precondition(lambda self: any(i.expired and i.leases for i in self.instances))
    @rule(data=st.data())
    def others_take_the_expired_slots(self, data: st.DataObject) -> None:
        """Live instances fill the limits an expired one held, so its re-register must drop."""
        dead = data.draw(st.sampled_from([i for i in self.instances if i.expired and i.leases]))
        live = [i for i in self.instances if not i.expired]
        if not live:
            return
        taker = data.draw(st.sampled_from(live))
        for lease in list(dead.leases):
            self._acquire(taker, lease.role, lease.database, False)

    def _acquire(self, inst: ModelInstance, role: str, database: str, force: bool) -> None:
        lost = self.fit_restore(inst) if inst.expired else None
        result = self.run(inst.store.acquire(self.claims(role, database), force=force))
        if lost is not None:
            self.check_restored(inst, lost)
        lease = ModelLease("?", role, database)
        order = [(Limit.TOTAL, ""), (Limit.ROLE, role), (Limit.DATABASE, database)]
        expected: Blocked | None = None
        if not force:
            for (limit, name), limit_id in zip(order, lease.ids, strict=True):
                value, used = self.effective(limit_id), self.used(limit_id)
                if value >= 0 and used >= value:
                    expected = Blocked(limit, name, value, used)
                    break
        if expected is None:
            assert isinstance(result, Lease), result
            lease.id = result.id
            inst.leases.append(lease)
        else:
            assert result == expected

    @rule(data=st.data(), again=st.booleans())
    def release(self, data: st.DataObject, again: bool) -> None:
        holders = [i for i in self.instances if i.leases]
        if not holders:
            return
        inst = data.draw(st.sampled_from(holders))
        lease = data.draw(st.sampled_from(inst.leases))
        inst.leases.remove(lease)
        self.run(inst.store.release(lease.id))
        if again:
            self.run(inst.store.release(lease.id))

    @rule(
        limit_id=st.sampled_from(["t", *(f"r:{r}" for r in ROLES), *(f"d:{d}" for d in DATABASES)]),
        value=st.one_of(st.none(), _limits),
    )
    def set_limit(self, limit_id: str, value: int | None) -> None:
        kind = {"t": Limit.TOTAL, "r": Limit.ROLE, "d": Limit.DATABASE}[limit_id[0]]
        name = limit_id[2:]
        self.run(self.probe.set_limit(kind, name, value))
        if value is None:
            self.runtime.pop(limit_id, None)
        else:
            self.runtime[limit_id] = value

    @rule(n=st.integers(0, INSTANCES - 1))
    def heartbeat(self, n: int) -> None:
        inst = self.instances[n]
        lost = self.fit_restore(inst) if inst.expired else None
        outcome = self.run(inst.store.heartbeat())
        if lost is None:
            assert outcome is Renewal.OK
        else:
            assert outcome is Renewal.EXPIRED
            self.check_restored(inst, lost)

    @precondition(lambda self: any(not i.expired for i in self.instances))
    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        """An instance stops renewing past its lease: the probe's next call purges it."""
        inst = data.draw(st.sampled_from([i for i in self.instances if not i.expired]))
        self.run(self.raw.zadd(f"{inst.store.prefix}:instances", {inst.store.instance: 0}))
        assert self.run(self.probe.heartbeat()) is Renewal.OK
        inst.expired = True

    @rule()
    def redis_loses_everything(self) -> None:
        """A restart without persistence; every instance's heartbeat re-registers (force).
        The probe, which set every run-time limit, comes back first and writes them back."""
        keys = self.run(self.raw.keys(f"{{{self.prefix}}}:*"))
        if keys:
            self.run(self.raw.delete(*keys))
        assert self.run(self.probe.heartbeat()) is Renewal.RESET
        assert self.probe.runtime == {
            ({"t": Limit.TOTAL, "r": Limit.ROLE, "d": Limit.DATABASE}[k[0]], k[2:]): v
            for k, v in self.runtime.items()
        }
        for inst in [*self.instances]:
            assert self.run(inst.store.heartbeat()) is Renewal.RESET
            inst.expired = False  # force: its every lease is back
            inst.events.clear()

    # ---------------------------------------------------------------- invariants

    @invariant()
    def counts_match_the_model(self) -> None:
        if not self.config:
            return
        rows = self.run(
            self.probe.usage(
                [(Limit.TOTAL, "")]
                + [(Limit.ROLE, r) for r in ROLES]
                + [(Limit.DATABASE, d) for d in DATABASES]
            )
        )
        got = {"t": rows[0].used}
        got.update({f"r:{r}": row.used for r, row in zip(ROLES, rows[1:3], strict=True)})
        got.update({f"d:{d}": row.used for d, row in zip(DATABASES, rows[3:], strict=True)})
        assert got == {i: self.used(i) for i in got}
        for inst in self.instances:
            assert [x.id for x in inst.store.leases] == [x.id for x in inst.leases]


def test_lease_store_matches_the_model(redis_server: RedisServer) -> None:
    _URL[:] = [redis_server.url]
    run_state_machine_as_test(
        LeaseMachine,
        settings=settings(max_examples=25, stateful_step_count=40, deadline=None),
    )


@pytest.fixture(autouse=True)
def _no_url_leak() -> None:
    _URL.clear()
