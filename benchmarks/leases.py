"""``python -m benchmarks.leases [--n N]``: round-trip cost of the cluster lease store on loopback.

Starts a throwaway redis-server and times, under uvloop, one call at a time: PING (the floor:
redis-py plus loopback), acquire (3 limits), release, heartbeat; then a storm: 1,000
concurrent acquires from 3 stores against a role limit of 20 (throughput, peak use). Not a
test: numbers depend on the machine and its load, so it prints them with the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
import uvloop

from pgguard.leases import Claim, Lease, LeaseStore
from pgguard.limits import Limit
from pgguard.testing.redis import RedisServer

CLAIMS = [Claim(Limit.TOTAL, "", -1), Claim(Limit.ROLE, "app", -1), Claim(Limit.DATABASE, "db", -1)]


def _summary(name: str, samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"{name:<22} p50 {statistics.median(ms):6.3f} ms  p99 {p99:6.3f} ms  (n={len(ms)})"


async def _timed(n: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t)
    return out


async def main(url: str, n: int) -> None:
    raw = aioredis.Redis.from_url(url)
    store = LeaseStore(url, instance="bench", prefix="bench", lease_ttl=3600)
    await store.start(background=False)
    for _ in range(200):  # warm up: connections, script cache
        await raw.ping()
        lease = await store.acquire(CLAIMS)
        assert isinstance(lease, Lease)
        await store.release(lease)
    print(_summary("PING (redis-py)", await _timed(n, raw.ping)))
    acquired: list[Lease] = []

    async def acquire() -> None:
        lease = await store.acquire(CLAIMS)
        assert isinstance(lease, Lease)
        acquired.append(lease)

    print(_summary("acquire (3 limits)", await _timed(n, acquire)))
    leases = iter(list(acquired))
    print(_summary("release", await _timed(n, lambda: store.release(next(leases)))))
    pair = await _timed(n, lambda: _acquire_release(store))
    print(_summary("acquire + release", pair))
    print(_summary("heartbeat", await _timed(n, store.heartbeat)))
    # with 1,000 other leases held (HVALS sums per instance, not per lease: should not move)
    held = [await store.acquire(CLAIMS) for _ in range(1000)]
    print(_summary("acquire+release @1000", await _timed(n, lambda: _acquire_release(store))))
    for lease in held:
        await store.release(lease)  # type: ignore[arg-type]
    stats = await raw.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {})
    print(f"inside Redis: {evalsha.get('usec_per_call', '?')} us per script call (INFO commandstats)")
    await store.close()
    await raw.aclose()

    fleet = [LeaseStore(url, instance=f"s{k}", prefix="storm", lease_ttl=3600) for k in range(3)]
    for s in fleet:
        await s.start(background=False)
    claims = [Claim(Limit.TOTAL, "", -1), Claim(Limit.ROLE, "app", 20), Claim(Limit.DATABASE, "db", -1)]
    t = time.perf_counter()
    results = await asyncio.gather(*(fleet[k % 3].acquire(claims) for k in range(1000)))
    elapsed = time.perf_counter() - t
    granted = sum(isinstance(r, Lease) for r in results)
    peak = (await fleet[0].usage([(Limit.ROLE, "app")]))[0].used
    print(
        f"storm: 1000 concurrent acquires over 3 stores in {elapsed * 1000:.0f} ms "
        f"({1000 / elapsed:.0f}/s), granted {granted}, role use in Redis {peak} (limit 20)"
    )
    for s in fleet:
        await s.close()

    # The same storm with subscribers: refusals after the first come from the refusal cache.
    fleet = [LeaseStore(url, instance=f"c{k}", prefix="cached", lease_ttl=3600) for k in range(3)]
    for s in fleet:
        await s.start()
    t = time.perf_counter()
    results = await asyncio.gather(*(fleet[k % 3].acquire(claims) for k in range(1000)))
    elapsed = time.perf_counter() - t
    granted = sum(isinstance(r, Lease) for r in results)
    cached = sum(s.stats.cached_blocks for s in fleet)
    print(
        f"storm with subscribers: {elapsed * 1000:.0f} ms ({1000 / elapsed:.0f}/s), granted "
        f"{granted}, {cached} refusals without a round trip"
    )
    t = time.perf_counter()
    for _ in range(5000):
        await fleet[0].acquire(claims)
    print(f"cached refusal: {(time.perf_counter() - t) / 5000 * 1e6:.1f} us each")
    for s in fleet:
        await s.close()


async def _acquire_release(store: LeaseStore) -> None:
    lease = await store.acquire(CLAIMS)
    assert isinstance(lease, Lease)
    await store.release(lease)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="calls per measurement")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    with RedisServer() as server:
        uvloop.run(main(server.url, args.n))


if __name__ == "__main__":
    cli()
