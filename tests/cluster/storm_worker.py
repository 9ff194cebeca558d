"""A separate OS process for test_two_processes_storming_never_exceed_the_limit.

argv: redis URL, key prefix, instance name, role limit, acquires. Prints "ready" once
registered, waits for a line on stdin, fires all acquires at once, prints how many were
granted, then holds its leases until stdin closes and leaves.
"""

from __future__ import annotations

import asyncio
import sys

from pgguard.leases import Claim, Lease, LeaseStore
from pgguard.limits import Limit


async def main(url: str, prefix: str, instance: str, limit: int, tries: int) -> None:
    store = LeaseStore(url, instance=instance, prefix=prefix, timeout=5.0)
    await store.start(background=False)
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    claims = [Claim(Limit.TOTAL, "", -1), Claim(Limit.ROLE, "app", limit), Claim(Limit.DATABASE, "db", -1)]
    results = await asyncio.gather(*(store.acquire(claims) for _ in range(tries)))
    print(sum(isinstance(r, Lease) for r in results), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    await store.close()


if __name__ == "__main__":
    url, prefix, instance, limit, tries = sys.argv[1:6]
    asyncio.run(main(url, prefix, instance, int(limit), int(tries)))
