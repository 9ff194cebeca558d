"""Fixtures for cluster mode: lease stores on a real redis-server (never a fake).

``redis_server`` (the plugin's, session-scoped) serves most tests, each under its own key
prefix so they cannot see each other. ``own_redis`` is a private server for the tests that
kill, pause or restart it. ``stores`` builds `LeaseStore`s and closes them after the test.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

import pytest

from pgguard.leases import ClusterEvent, LeaseStore
from pgguard.testing.redis import RedisServer, find_redis_server

_names = itertools.count(1)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server for this test alone (outage tests kill, pause and restart it)."""
    if find_redis_server() is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    with RedisServer() as server:
        yield server


class StoreFactory(Protocol):
    async def __call__(
        self,
        url: str | None = None,
        *,
        events: list[ClusterEvent] | None = None,
        background: bool = False,
        **kwargs: Any,
    ) -> LeaseStore: ...


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def stores(redis_server: RedisServer, prefix: str) -> AsyncIterator[StoreFactory]:
    """``await stores(events=list, background=False, lease_ttl=..., ...)``: a started store
    on the session's Redis (or ``url``), named ``i1``, ``i2``, ... under the test's prefix."""
    made: list[LeaseStore] = []

    async def make(
        url: str | None = None,
        *,
        events: list[ClusterEvent] | None = None,
        background: bool = False,
        **kwargs: Any,
    ) -> LeaseStore:
        kwargs.setdefault("instance", f"i{next(_names)}")
        kwargs.setdefault("timeout", 2.0)
        store = LeaseStore(
            url or redis_server.url,
            prefix=prefix,
            on_event=None if events is None else events.append,
            **kwargs,
        )
        made.append(store)
        await store.start(background=background)
        return store

    yield make
    for store in made:
        await store.close()
