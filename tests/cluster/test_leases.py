"""The Redis lease store (pgguard/leases.py) against a real redis-server: exactness, expiry,
renewal, re-registration after an outage, release notification, concurrency."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis.asyncio as aioredis

from pgguard import config as config_mod
from pgguard.errors import RedisUnavailable
from pgguard.leases import (
    Blocked,
    Claim,
    ClusterEvent,
    Lease,
    LeaseStore,
    LimitChanged,
    Released,
    Renewal,
    Restored,
    StateChanged,
    local_share,
)
from pgguard.limits import Limit
from pgguard.testing.redis import RedisServer
from pgguard.testing.wait import await_until

if TYPE_CHECKING:  # the fixture's type; conftest modules are not importable by name
    from conftest import StoreFactory

ROLE, DB, TOTAL = Limit.ROLE, Limit.DATABASE, Limit.TOTAL
WORKER = Path(__file__).with_name("storm_worker.py")


def claims(role: int = -1, db: int = -1, total: int = -1, *, r: str = "app", d: str = "db") -> list[Claim]:
    """PostgreSQL's order: total, role, database."""
    return [Claim(TOTAL, "", total), Claim(ROLE, r, role), Claim(DB, d, db)]


async def used(store: LeaseStore, *limits: tuple[Limit, str]) -> list[int]:
    return [row.used for row in await store.usage(limits)]


ALL = ((TOTAL, ""), (ROLE, "app"), (DB, "db"))


# -- exactness -------------------------------------------------------------------------------


async def test_acquire_takes_a_slot_on_every_limit_and_release_gives_them_back(
    stores: StoreFactory,
) -> None:
    a = await stores()
    lease = await a.acquire(claims(role=2, db=5, total=10))
    assert isinstance(lease, Lease)
    assert await used(a, *ALL) == [1, 1, 1]
    assert [x.id for x in a.leases] == [lease.id]
    await a.release(lease)
    assert await used(a, *ALL) == [0, 0, 0]
    assert a.leases == []


async def test_acquire_is_all_or_nothing_and_names_the_first_full_limit(
    stores: StoreFactory,
) -> None:
    a = await stores()
    b = await stores()
    assert isinstance(await a.acquire(claims(role=1, db=5, total=10)), Lease)
    blocked = await b.acquire(claims(role=1, db=5, total=10))
    assert blocked == Blocked(ROLE, "app", 1, 1)
    assert await used(a, *ALL) == [1, 1, 1]  # nothing taken on total or database
    # Another role of the same database: the database limit blocks, named with its use.
    assert isinstance(await b.acquire(claims(role=1, db=2, r="other")), Lease)
    assert await b.acquire(claims(role=5, db=2, r="third")) == Blocked(DB, "db", 2, 2)
    # The total is checked first, as in PostgreSQL.
    assert await b.acquire(claims(role=0, db=0, total=2, r="x")) == Blocked(TOTAL, "", 2, 2)


async def test_limit_zero_admits_nobody_and_unlimited_admits_everyone(stores: StoreFactory) -> None:
    a = await stores()
    assert await a.acquire(claims(role=0)) == Blocked(ROLE, "app", 0, 0)
    leases = [await a.acquire(claims()) for _ in range(50)]
    assert all(isinstance(x, Lease) for x in leases)
    assert await used(a, *ALL) == [50, 50, 50]


async def test_release_is_idempotent(stores: StoreFactory) -> None:
    a = await stores()
    b = await stores()
    one = await a.acquire(claims(role=2))
    two = await b.acquire(claims(role=2))
    assert isinstance(one, Lease) and isinstance(two, Lease)
    await a.release(one)
    await a.release(one)
    await a.release("no-such-lease")
    await a.release(two.id)  # b's lease id is unknown to a: a no-op, not b's slot
    assert await used(a, *ALL) == [1, 1, 1]


async def test_force_takes_slots_over_the_limit(stores: StoreFactory) -> None:
    """Exempt roles: counted (others see them), never refused."""
    a = await stores()
    assert isinstance(await a.acquire(claims(total=1)), Lease)
    assert isinstance(await a.acquire(claims(total=1), force=True), Lease)
    assert await used(a, (TOTAL, "")) == [2]
    assert await a.acquire(claims(total=1)) == Blocked(TOTAL, "", 1, 2)


async def test_runtime_limit_wins_everywhere_and_is_published(stores: StoreFactory) -> None:
    events: list[ClusterEvent] = []
    a = await stores()
    b = await stores(events=events, background=True)
    await a.set_limit(ROLE, "app", 1)
    assert isinstance(await b.acquire(claims(role=10)), Lease)
    assert await b.acquire(claims(role=10)) == Blocked(ROLE, "app", 1, 1)
    await await_until(
        lambda: LimitChanged(ROLE, "app", 1) in events, timeout=10, what="LimitChanged at b"
    )
    assert await a.runtime_limits() == {(ROLE, "app"): 1}
    await a.set_limit(ROLE, "app", None)

    async def b_admitted() -> bool:  # once b heard the change (its refusal cache)
        return isinstance(await b.acquire(claims(role=10)), Lease)

    await await_until(b_admitted, timeout=10, what="b to hear the limit removed")
    await a.set_limit(TOTAL, "", 7)
    await a.clear_limits()
    assert await a.runtime_limits() == {}


# -- liveness --------------------------------------------------------------------------------


async def test_dead_instance_slots_return_within_lease_ttl(stores: StoreFactory) -> None:
    """``a`` stops renewing (as if SIGKILLed): ``b`` gets its slots once lease_ttl passed."""
    events: list[ClusterEvent] = []
    a = await stores(lease_ttl=1.0)
    b = await stores(events=events, background=True)
    for _ in range(2):
        assert isinstance(await a.acquire(claims(role=2)), Lease)
    assert isinstance(await b.acquire(claims(role=2)), Blocked)
    died = a.renewed_at  # its last renewal (registration): the lease runs lease_ttl from there
    assert died is not None

    async def b_gets_a_slot() -> bool:
        return isinstance(await b.acquire(claims(role=2)), Lease)

    await await_until(b_gets_a_slot, timeout=15, what="a's slots to expire", interval=0.05)
    assert time.monotonic() - died >= 0.99  # not before the lease ran out (ms rounding)
    assert await used(b, (ROLE, "app")) == [1]
    await await_until(
        lambda: any(isinstance(e, Released) and e.reason == "expired" for e in events),
        timeout=10,
        what="an expired event at b",
    )
    assert a.instance not in [row.instance for row in await b.instances()]


async def test_heartbeat_keeps_leases_past_lease_ttl(stores: StoreFactory) -> None:
    a = await stores(lease_ttl=2.0)
    b = await stores()
    assert isinstance(await a.acquire(claims(role=1)), Lease)
    start = time.monotonic()
    while time.monotonic() - start < 4.5:  # over two TTLs of renewing every 0.2 s
        assert await a.heartbeat() is Renewal.OK
        await asyncio.sleep(0.2)  # the passage of time under test, not a synchronisation
    assert await b.acquire(claims(role=1)) == Blocked(ROLE, "app", 1, 1)
    assert a.leases_valid


async def test_background_heartbeat_renews(stores: StoreFactory) -> None:
    a = await stores(lease_ttl=2.0, background=True)
    b = await stores()
    assert isinstance(await a.acquire(claims(role=1)), Lease)
    first = a.renewed_at
    await await_until(
        lambda: a.renewed_at is not None and first is not None and a.renewed_at > first + 2.5,
        timeout=15,
        what="renewals for longer than lease_ttl",
    )
    assert await b.acquire(claims(role=1)) == Blocked(ROLE, "app", 1, 1)


async def test_expired_instance_reregisters_what_fits_and_reports_the_rest(
    stores: StoreFactory,
) -> None:
    """``a`` missed its renewals past lease_ttl and ``b`` took the slots: ``a``'s renewal
    answers EXPIRED and the sessions that no longer fit are named for the shell to close."""
    events: list[ClusterEvent] = []
    a = await stores(lease_ttl=1.0, events=events)
    b = await stores()
    mine = [await a.acquire(claims(role=3)) for _ in range(2)]
    assert all(isinstance(x, Lease) for x in mine)

    async def b_holds_two() -> bool:
        await b.acquire(claims(role=3))
        return len(b.leases) == 2

    await await_until(b_holds_two, timeout=15, what="b to take a's expired slots", interval=0.05)
    assert await a.heartbeat() is Renewal.EXPIRED
    restored = [e for e in events if isinstance(e, Restored)]
    assert len(restored) == 1 and restored[0].cause is Renewal.EXPIRED
    kept = [x.id for x in a.leases]
    assert len(kept) == 1 and set(restored[0].lost) == {x.id for x in mine} - set(kept)
    assert restored[0].over == ()
    assert await used(a, (ROLE, "app")) == [3]  # never above the limit


# -- outages ---------------------------------------------------------------------------------


async def test_reregister_after_redis_restart_restores_counts_exactly(
    own_redis: RedisServer, stores: StoreFactory
) -> None:
    events: list[ClusterEvent] = []
    a = await stores(own_redis.url, events=events)
    b = await stores(own_redis.url)
    for _ in range(3):
        await a.acquire(claims(role=5))
    await b.acquire(claims(role=5, r="other"))
    dropped = await a.acquire(claims(role=5))
    await a.release(dropped)
    own_redis.restart()  # empty: no persistence
    assert await a.heartbeat() is Renewal.RESET
    # b has not renewed yet: its next acquire finds the store reset and re-registers first.
    assert isinstance(await b.acquire(claims(role=5, r="other")), Lease)
    assert await used(a, (TOTAL, ""), (ROLE, "app"), (ROLE, "other")) == [5, 3, 2]
    restored = [e for e in events if isinstance(e, Restored)]
    assert [(e.cause, e.over, e.lost) for e in restored] == [(Renewal.RESET, (), ())]
    assert await b.heartbeat() is Renewal.OK


async def test_forced_reregister_reports_a_limit_left_over_its_value(
    own_redis: RedisServer, stores: StoreFactory
) -> None:
    """Sessions admitted locally during an outage are re-inserted, none dropped; a limit now
    above its value is reported (the bounded over-limit of on_redis_failure = local)."""
    events: list[ClusterEvent] = []
    a = await stores(own_redis.url, events=events, timeout=1.0)
    b = await stores(own_redis.url, timeout=1.0)
    await a.acquire(claims(role=2))
    own_redis.kill()
    with pytest.raises(RedisUnavailable):
        await a.acquire(claims(role=2))
    assert not a.up and StateChanged(False, a.down_reason) in events
    began = time.monotonic()
    with pytest.raises(RedisUnavailable):  # down: fails at once, no round trip
        await a.acquire(claims(role=2))
    assert time.monotonic() - began < 1.0
    assert a.fallback_limit(2) == 1 and a.live_instances == 2
    a.adopt(claims(role=2))  # admitted under on_redis_failure = local
    with pytest.raises(RedisUnavailable):
        await b.acquire(claims(role=2))
    b.adopt(claims(role=2))
    own_redis.restart()
    assert await a.heartbeat() is Renewal.RESET
    assert await b.heartbeat() is Renewal.RESET
    assert a.up and b.up
    assert await used(a, (ROLE, "app")) == [3]
    last = [e for e in events if isinstance(e, Restored)][-1]
    assert last.lost == ()
    # a re-registered first (2 of 2: not over); b's made it 3 of 2, reported at b.
    assert await a.acquire(claims(role=2)) == Blocked(ROLE, "app", 2, 3)


async def test_release_while_redis_hangs_is_retried_by_the_heartbeat(
    own_redis: RedisServer, stores: StoreFactory
) -> None:
    a = await stores(own_redis.url, timeout=1.0)
    lease = await a.acquire(claims(role=1))
    own_redis.pause()
    try:
        await a.release(lease)  # times out; never raises
        assert not a.up
        with pytest.raises(RedisUnavailable):
            await a.heartbeat()
    finally:
        own_redis.resume()

    async def renewed() -> bool:
        try:
            return await a.heartbeat() is Renewal.OK
        except RedisUnavailable:
            return False

    await await_until(renewed, timeout=10, what="a heartbeat after SIGCONT")
    assert a.up
    assert await used(a, (ROLE, "app")) == [0]
    assert isinstance(await a.acquire(claims(role=1)), Lease)


async def test_acquire_whose_reply_was_lost_leaks_no_slot(
    own_redis: RedisServer, stores: StoreFactory
) -> None:
    """An acquire that times out may have been applied by Redis; the next heartbeat
    releases that lease id (a no-op if it was not)."""
    a = await stores(own_redis.url, timeout=1.0)
    own_redis.pause()
    try:
        with pytest.raises(RedisUnavailable):
            await a.acquire(claims(role=1))
    finally:
        own_redis.resume()  # the queued EVALSHA now runs and takes a slot nobody knows about

    async def renewed() -> bool:
        try:
            return await a.heartbeat() is Renewal.OK
        except RedisUnavailable:
            return False

    await await_until(renewed, timeout=10, what="a heartbeat after SIGCONT")
    assert await used(a, (ROLE, "app")) == [0]
    assert a.leases == []


# -- notification ----------------------------------------------------------------------------


async def test_release_wakes_another_instances_subscriber(stores: StoreFactory) -> None:
    woken = asyncio.Event()
    seen: list[Released] = []

    def on_event(event: ClusterEvent) -> None:
        if isinstance(event, Released):
            seen.append(event)
            woken.set()

    a = await stores()
    b = await stores(background=True)
    b._on_event = on_event  # the factory's events list is not needed here
    lease = await a.acquire(claims(role=1))
    assert isinstance(await b.acquire(claims(role=1)), Blocked)  # the role's limit is wanted now
    await a.release(lease)
    async with asyncio.timeout(10):
        await woken.wait()
    assert seen[0].instance == a.instance and seen[0].reason == "released"
    assert seen[0].limits == ((ROLE, "app"),)  # only the limit someone was refused on


async def test_a_release_nobody_waits_for_is_not_announced(stores: StoreFactory) -> None:
    events: list[ClusterEvent] = []
    a = await stores()
    b = await stores(events=events, background=True)
    await a.release(await a.acquire(claims(role=1)))  # nobody refused: no message
    lease = await a.acquire(claims(role=1))
    assert isinstance(await b.acquire(claims(role=1)), Blocked)
    await a.release(lease)  # announced, and the mark is cleared
    await await_until(lambda: any(isinstance(e, Released) for e in events), timeout=10, what="the release")
    await a.release(await a.acquire(claims(role=1)))  # not wanted again: no message
    lease = await a.acquire(claims(role=1))
    assert isinstance(await b.acquire(claims(role=1)), Blocked)
    await a.release(lease)
    await await_until(
        lambda: sum(isinstance(e, Released) for e in events) >= 2, timeout=10, what="the second release"
    )
    assert sum(isinstance(e, Released) and e.reason == "released" for e in events) == 2


async def test_subscriber_comes_back_after_a_redis_restart(
    own_redis: RedisServer, stores: StoreFactory
) -> None:
    events: list[ClusterEvent] = []
    a = await stores(own_redis.url)
    b = await stores(own_redis.url, events=events, background=True, lease_ttl=1.5)
    own_redis.restart()
    await await_until(lambda: b.up and b._subscribed.is_set(), timeout=15, what="b to resubscribe")
    await await_until(
        lambda: any(isinstance(e, Restored) for e in events), timeout=15, what="b re-registered"
    )
    lease = await a.acquire(claims(role=1))
    assert isinstance(await b.acquire(claims(role=1)), Blocked)
    await a.release(lease)
    await await_until(
        lambda: any(isinstance(e, Released) and e.instance == a.instance for e in events),
        timeout=10,
        what="a's release seen by b after the restart",
    )


# -- concurrency -----------------------------------------------------------------------------


async def test_concurrent_acquires_from_several_stores_never_exceed_the_limit(
    stores: StoreFactory,
) -> None:
    fleet = [await stores() for _ in range(4)]
    tries = [s.acquire(claims(role=10, db=12, total=11)) for s in fleet for _ in range(60)]
    results = await asyncio.gather(*tries)
    assert sum(isinstance(r, Lease) for r in results) == 10
    assert await used(fleet[0], *ALL) == [10, 10, 10]
    await asyncio.gather(*(s.release(x) for s in fleet for x in s.leases))
    assert await used(fleet[0], *ALL) == [0, 0, 0]


@pytest.mark.slow
async def test_two_processes_storming_never_exceed_the_limit(
    redis_server: RedisServer, prefix: str
) -> None:
    limit, each = 15, 40
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), redis_server.url, prefix, f"p{n}", str(limit), str(each)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        granted = []
        for p in procs:
            assert p.stdout is not None
            granted.append(int(p.stdout.readline()))
        assert sum(granted) == limit
        probe = LeaseStore(redis_server.url, instance="probe", prefix=prefix)
        await probe.start(background=False)
        try:
            assert await used(probe, (ROLE, "app")) == [limit]
        finally:
            await probe.close()
    finally:
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in procs:
            assert p.wait(30) == 0


# -- helpers and config ----------------------------------------------------------------------


def test_local_share_is_the_ceiling_of_the_limit_over_live_instances() -> None:
    assert [local_share(20, n) for n in (1, 2, 3, 0)] == [20, 10, 7, 20]
    assert local_share(-1, 3) == -1 and local_share(0, 3) == 0 and local_share(1, 3) == 1


async def test_instances_lists_every_live_instance(stores: StoreFactory) -> None:
    a = await stores(lease_ttl=5.0)
    b = await stores(lease_ttl=5.0)
    await b.acquire(claims())
    rows = {row.instance: row for row in await a.instances()}
    assert set(rows) == {a.instance, b.instance}
    assert rows[b.instance].leases == 1 and 0 < rows[b.instance].expires_in <= 5.0


async def test_closing_a_store_gives_back_its_slots(stores: StoreFactory) -> None:
    a = await stores()
    b = await stores()
    await a.acquire(claims(role=1))
    await a.close()
    assert isinstance(await b.acquire(claims(role=1)), Lease)


def test_cluster_section_defaults_and_validation() -> None:
    assert config_mod.loads("").cluster is None
    c = config_mod.loads('[cluster]\nredis = "rediss://:pw@redis.example:6380/2"').cluster
    assert c is not None
    assert (c.lease_ttl, c.renew_every, c.on_redis_failure, c.timeout) == (10.0, 10.0 / 3, "local", 1.0)
    store = LeaseStore.from_config(c)
    assert store.instance.endswith(f":{os.getpid()}") and store.heartbeat_interval == 10.0 / 3
    with pytest.raises(config_mod.ConfigError, match="cluster.on_redis_failure"):
        config_mod.loads('[cluster]\non_redis_failure = "panic"')
    with pytest.raises(config_mod.ConfigError, match="cluster.heartbeat_interval"):
        config_mod.loads("[cluster]\nlease_ttl = 2.0\nheartbeat_interval = 2.0")


def test_redis_is_not_imported_without_a_cluster_section() -> None:
    code = (
        "import sys; from pgguard import config, server, cli; config.loads(''); "
        "assert 'redis' not in sys.modules, sorted(m for m in sys.modules if 'redis' in m)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


async def test_a_store_started_while_redis_is_away_registers_when_it_answers(
    own_redis: RedisServer, prefix: str
) -> None:
    events: list[ClusterEvent] = []
    own_redis.kill()
    store = LeaseStore(
        own_redis.url, instance="late", prefix=prefix, lease_ttl=3.0, timeout=1.0,
        on_event=events.append,
    )  # fmt: skip
    try:
        with pytest.raises(RedisUnavailable):
            await store.start()
        assert not store.up and events == []
        with pytest.raises(RedisUnavailable):
            await store.acquire(claims())
        store.adopt(claims())  # admitted in fallback meanwhile
        own_redis.restart()
        await await_until(lambda: store.up, timeout=15, what="the heartbeat to register")
        assert StateChanged(True, "re-registered") in events
        assert await used(store, (TOTAL, "")) == [1]
        assert isinstance(await store.acquire(claims()), Lease)
    finally:
        await store.close()


async def test_refusals_while_a_limit_is_full_need_no_round_trip(stores: StoreFactory) -> None:
    """After Redis answered "full", the store refuses locally until a release, a limit change
    or a resync names that limit; the release on another instance reopens it."""
    a = await stores()
    b = await stores(background=True)
    held = await a.acquire(claims(role=1))
    assert isinstance(held, Lease)
    assert await b.acquire(claims(role=1)) == Blocked(ROLE, "app", 1, 1)
    calls = b.stats.calls
    for _ in range(100):
        assert await b.acquire(claims(role=1)) == Blocked(ROLE, "app", 1, 1)
    assert b.stats.calls == calls and b.stats.cached_blocks == 100
    assert isinstance(await b.acquire(claims(role=5, r="other")), Lease)  # other limits: asked
    await a.release(held)

    async def b_admitted() -> bool:
        return isinstance(await b.acquire(claims(role=1)), Lease)

    await await_until(b_admitted, timeout=10, what="b to hear a's release")
    await a.set_limit(ROLE, "app", 2)  # b holds 1 of 1 again: a limit change reopens it too
    await await_until(b_admitted, timeout=10, what="b to hear the limit change")


async def test_an_acquire_cancelled_in_flight_leaks_no_slot(
    own_redis: RedisServer, stores: StoreFactory
) -> None:
    """The client left while its acquire was in flight (Redis hung, so it surely was)."""
    a = await stores(own_redis.url, timeout=5.0)
    own_redis.pause()
    try:
        task = asyncio.create_task(a.acquire(claims(role=1)))
        await await_until(lambda: a.stats.calls >= 2, timeout=10, what="the acquire to be sent")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        own_redis.resume()
    assert await a.heartbeat() is Renewal.OK
    assert await used(a, (ROLE, "app")) == [0]


async def test_runtime_limits_survive_a_redis_restart(
    own_redis: RedisServer, stores: StoreFactory
) -> None:
    """The first instance back writes the run-time limits it knew; a later one reads them."""
    a = await stores(own_redis.url)
    await a.set_limit(ROLE, "app", 1)
    await a.set_limit(TOTAL, "", 9)
    own_redis.restart()
    assert await a.heartbeat() is Renewal.RESET
    b = await stores(own_redis.url)
    assert b.runtime == {(ROLE, "app"): 1, (TOTAL, ""): 9}
    assert await b.runtime_limits() == b.runtime
    await b.acquire(claims(role=50))
    assert await b.acquire(claims(role=50)) == Blocked(ROLE, "app", 1, 1)


# -- the lean connection for acquire and release -----------------------------------------------


def test_lane_is_used_only_for_plain_redis_urls() -> None:
    from pgguard.leases import _Lane

    lane = _Lane.for_url("redis://u%40x:p%3Aw@10.0.0.1:6380/3")
    assert lane is not None
    assert (lane.host, lane.port, lane.db, lane.username, lane.password) == ("10.0.0.1", 6380, 3, "u@x", "p:w")
    assert _Lane.for_url("redis://localhost") is not None
    for url in ("rediss://h:1/0", "unix:///tmp/r.sock", "redis://h:1/0?socket_timeout=2", "redis://h:1/x"):
        assert _Lane.for_url(url) is None, url


async def test_lane_with_password_and_database_and_after_script_flush(own_redis: RedisServer, stores: StoreFactory) -> None:
    raw = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    await raw.config_set("requirepass", "s3cret pass")
    try:
        url = f"redis://:s3cret%20pass@127.0.0.1:{own_redis.port}/3"
        a = await stores(url)
        assert a._lane is not None
        lease = await a.acquire(claims(role=1))
        assert isinstance(lease, Lease)
        assert await a.acquire(claims(role=1)) == Blocked(ROLE, "app", 1, 1)
        authed = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            assert await authed.exists(f"{a.prefix}:c:r:app") == 1  # in database 3
            await authed.script_flush()  # NOSCRIPT next: redis-py loads the script again
            await a.release(lease)
            assert await used(a, (ROLE, "app")) == [0]
            assert isinstance(await a.acquire(claims(role=1)), Lease)
        finally:
            await authed.aclose()
        await a.close()  # while the password is still required
    finally:
        await raw.execute_command("AUTH", "s3cret pass")
        await raw.config_set("requirepass", "")
        await raw.aclose()
