"""Cluster mode's shared slot store: leases on every applicable limit, held in one Redis.

Theory
------
Several pgguards (processes or hosts) enforce one set of limits. Each limit that applies to a
session (the total, the role's, the database's) is a counting semaphore kept in Redis, and
admission takes one slot on *every* applicable limit, all or nothing, in one Lua script, so
Redis's single-threaded script execution is the only serialisation point: no lock, no
read-then-write race between pgguards.

Leases hang off instances, so renewal costs one call per instance, not one per session::

    {P}:epoch              STRING  random token, set by the first instance after Redis starts
                                   empty; a changed or missing epoch means Redis lost its data
    {P}:instances          ZSET    instance -> expiry (ms, Redis's clock: TIME)
    {P}:leases:<instance>  HASH    lease id -> the limit ids it holds, NUL-separated
    {P}:c:<limit id>       HASH    instance -> how many of that limit's slots it holds
    {P}:limits             HASH    limit id -> run-time value (SET LIMIT), wins over config
    {P}:want               HASH    limit id -> 1: some acquire was refused on it since its last
                                   announced release
    {P}:events             channel JSON: released / expired / joined / left / limit / cleared

``{P}`` is ``[cluster] prefix`` in braces (a Redis Cluster hash tag: every key on one slot).
A limit id is ``t`` (max_connections), ``r:<role>`` or ``d:<database>``. A limit's use is the
sum of its ``c:`` hash (one field per instance: a handful of values).

Scripts (each runs atomically; every one that admits first *purges*: an instance whose expiry
is past on Redis's clock loses its leases and counts, and an ``expired`` event is published):

- ``acquire(claims)``: checks epoch and registration, then every claim's use against its
  limit (run-time value if set, else the caller's), in PostgreSQL's order (total, role,
  database); the first full one is returned with its value and use, and nothing is taken.
  Otherwise every count is incremented and the lease recorded. ``force`` takes the slots
  regardless (exempt roles: counted, never limited).
- ``release(leases)``: removes exactly those leases from every limit they hold; unknown ids
  are no-ops, so a release is idempotent and safe to retry. Publishes ``released`` naming
  the freed limits that are *wanted*: an acquire refused on a limit marks it wanted (in the
  same script), and the release that announces it clears the mark. So a release nobody
  waits for costs no message to any instance (each costs a receiving pgguard about as much
  CPU as an admission), while a refused acquire, and the refusal cache built on it, always
  hears the next release of its limit.
- ``heartbeat(pending releases)``: purges, renews this instance's expiry (one ZADD), and
  retries releases that failed earlier; answers the number of live instances.
- ``register(leases, mode)``: (re)creates this instance from the process's own list of live
  sessions: ``force`` inserts them all (after Redis lost its data: no session is dropped, and
  limits over their value are reported), ``fit`` inserts them oldest first while they fit
  (after this instance was expired: its slots may have been given away, and the sessions that
  no longer fit are reported so the shell can close them instead of running over the limit).
- ``set_limit``/``clear_limits``: the run-time layer, stored and published to all instances;
  after Redis lost its data, the first instance to re-register writes back the run-time
  limits it knew.

Invariants (tests/cluster: hypothesis model on a real Redis, storms from tasks and processes):

- no limit's use exceeds its value through ``acquire``; only ``force`` (exempt roles) and a
  ``force`` re-register after Redis lost its data can go over, and the latter is reported;
- a limit's use equals the number of live leases that hold it (the counts are changed only
  together with the lease hash, in the same script);
- a release is exactly once whatever the retries; an acquire whose answer was lost (timeout)
  is released by the next heartbeat, so a lost reply leaks no slot;
- an instance that stops renewing holds nothing ``lease_ttl`` after its last renewal (on
  Redis's clock: no clock-skew assumption between hosts).

Failure modes: every Redis call is bounded by ``[cluster] timeout``; a failure raises
`RedisUnavailable`, marks the store *down* (later acquires fail fast, without a round trip)
and the shell applies ``on_redis_failure`` (``local`` uses `local_share`). While down,
releases are queued and sessions admitted locally are recorded with `adopt`. The heartbeat
task keeps probing; when Redis answers again the instance re-registers (``force``: the local
sessions are the truth) and a `Restored` event reports any limit left over its value. If
the answer is that this instance had expired (Redis stayed up for the others), it
re-registers in ``fit`` mode and `Restored.lost` names the sessions to close.

Release notification: every script that frees slots publishes on ``{P}:events``; a
subscriber task turns messages into `Released` / `LimitChanged` events for the shell, which
retries its waiters. Pub/sub is at most once, so after every (re)subscribe a `Resync` event
tells the shell to retry all its waiters once; queue_timeout still bounds every wait.

Refusal cache: while subscribed, a limit Redis answered full is remembered, and acquires that
need it are refused locally (no round trip) until an event names that limit (release,
expiry, limit change) or the subscription restarts. It is filled only if the subscription
was up before the script was sent and no event arrived before its reply (a release message
may overtake the reply on the other connection), so it can only refuse what Redis would
have refused a moment earlier; it never admits. A run-time limit raised elsewhere therefore
takes effect here when its event arrives (milliseconds), not at the same instant.

This module imports redis-py; import it only when ``[cluster]`` is configured.

Connections: redis-py for everything but the two calls on every session's path, acquire and
release, which go through `_Lane`: one pipelined connection speaking RESP2 itself (EVALSHA;
NOSCRIPT falls back to redis-py, which loads the script), about a fifth of redis-py's CPU per
call on a 2-core VM. Only for ``redis://`` URLs (with password and database); ``rediss://``
and others use redis-py throughout.

Size: about 1,280 lines, one job: the store's protocol, of which some 250 lines are the Lua
scripts, kept beside the Python that builds their arguments and reads their replies (the two
sides of each ARGV layout must change together), 200 the event and value types, and 200 the
lean connection for the hot calls (it speaks the same scripts).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import socket
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from .errors import RedisUnavailable
from .limits import Limit

if TYPE_CHECKING:
    from .config import ClusterConfig

__all__ = [
    "Claim",
    "Lease",
    "Blocked",
    "Overrun",
    "Renewal",
    "InstanceRow",
    "StoreStats",
    "LimitUse",
    "ClusterEvent",
    "Released",
    "LimitChanged",
    "LimitsCleared",
    "Resync",
    "StateChanged",
    "Restored",
    "LeaseStore",
    "local_share",
    "default_instance_name",
    "limit_id",
]

log = logging.getLogger("pgguard.leases")

# Calls in flight to Redis per store: a script takes ~0.1 ms in Redis, so a few connections
# carry thousands of admissions a second. More callers wait locally, and that wait is not
# counted against ``timeout``: only Redis's own slowness marks the store down, not a storm.
_IN_FLIGHT: Final = 16
# Delay before a failed subscriber reconnects (the heartbeat also restarts it on recovery).
_RESUBSCRIBE_DELAY_S: Final = 0.2


def limit_id(limit: Limit, name: str) -> str:
    """The store's id for a limit: ``t``, ``r:<role>`` or ``d:<database>``."""
    if limit is Limit.TOTAL:
        return "t"
    return ("r:" if limit is Limit.ROLE else "d:") + name


def _parse_limit_id(text: str) -> tuple[Limit, str]:
    if text == "t":
        return Limit.TOTAL, ""
    kind, _, name = text.partition(":")
    return (Limit.ROLE if kind == "r" else Limit.DATABASE), name


def local_share(limit: int, live_instances: int) -> int:
    """The fallback limit while Redis is unreachable: ``ceil(limit / live_instances)``.

    Unlimited stays unlimited and 0 stays 0; with ``n`` instances that each apply their share
    the sum is at most ``limit + n - 1``.
    """
    if limit <= 0:
        return limit
    return math.ceil(limit / max(1, live_instances))


def default_instance_name() -> str:
    """``hostname:pid``: unique among live processes, which instance names must be."""
    return f"{socket.gethostname()}:{os.getpid()}"


# -- values ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """One limit a session needs a slot on, with the caller's value for it (-1: unlimited)."""

    limit: Limit
    name: str  # role or database; "" for the total
    value: int

    @property
    def id(self) -> str:
        return limit_id(self.limit, self.name)


@dataclass(frozen=True, slots=True)
class Lease:
    """A session's slots in the store; give it back with `LeaseStore.release`."""

    id: str
    claims: tuple[Claim, ...]


@dataclass(frozen=True, slots=True)
class Blocked:
    """The first full limit (in PostgreSQL's order): its value in force and its use."""

    limit: Limit
    name: str
    value: int
    used: int


@dataclass(frozen=True, slots=True)
class Overrun:
    """A limit left over its value by a forced re-register (reported, bounded by the fallback)."""

    limit: Limit
    name: str
    value: int
    used: int


class Renewal(StrEnum):
    OK = "ok"  # renewed
    EXPIRED = "expired"  # this instance had been purged: its slots may have been given away
    RESET = "reset"  # Redis lost its data (restart without persistence, FLUSHALL)


@dataclass(frozen=True, slots=True)
class InstanceRow:
    """One line of SHOW CLUSTER."""

    instance: str
    expires_in: float  # seconds until its lease lapses (negative: lapsed, not yet purged)
    leases: int


@dataclass(slots=True)
class StoreStats:
    """Counters for metrics: Redis calls made and failed, acquires answered from the full-limit
    cache without a round trip, and the last renewal's round trip in seconds."""

    calls: int = 0
    errors: int = 0
    cached_blocks: int = 0
    renew_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class LimitUse:
    limit: Limit
    name: str
    used: int
    runtime: int | None  # the stored run-time value, if any


@dataclass(frozen=True, slots=True)
class Released:
    """Slots were freed somewhere (``reason``: release, expired, left, joined): retry waiters."""

    instance: str
    limits: tuple[tuple[Limit, str], ...]
    reason: str


@dataclass(frozen=True, slots=True)
class LimitChanged:
    """A run-time limit was set (``value``) or removed (None) by some instance."""

    limit: Limit
    name: str
    value: int | None


@dataclass(frozen=True, slots=True)
class LimitsCleared:
    """Every run-time limit was removed (a reload without keep_runtime, somewhere)."""


@dataclass(frozen=True, slots=True)
class Resync:
    """Notifications may have been missed (subscribed again, re-registered): retry all waiters."""

    reason: str


@dataclass(frozen=True, slots=True)
class StateChanged:
    """The store became unavailable (``up`` False: apply on_redis_failure) or available again."""

    up: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Restored:
    """This instance re-registered its live sessions.

    ``cause`` is the renewal outcome that triggered it (RESET: Redis lost its data; EXPIRED:
    this instance lapsed; OK: back after an outage). ``over`` lists limits now above their
    value; ``lost`` the leases that did not fit after EXPIRED, already forgotten by the store:
    the shell must close those sessions.
    """

    cause: Renewal
    over: tuple[Overrun, ...]
    lost: tuple[str, ...]


ClusterEvent = Released | LimitChanged | LimitsCleared | Resync | StateChanged | Restored


# -- Lua -------------------------------------------------------------------------------------
# ARGV[1] is always the key prefix (with its hash tag). Times are milliseconds on Redis's clock.

_PRELUDE: Final = r"""
local P = ARGV[1]
local I = P .. ':instances'
local EPOCH = P .. ':epoch'
local LIMITS = P .. ':limits'
local CHANNEL = P .. ':events'
local WANT = P .. ':want'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function split(s)
  local out = {}
  local i = 1
  while true do
    local j = string.find(s, '\0', i, true)
    if not j then
      table.insert(out, string.sub(s, i))
      return out
    end
    table.insert(out, string.sub(s, i, j - 1))
    i = j + 1
  end
end

local function used(id)
  local n = 0
  for _, v in ipairs(redis.call('HVALS', P .. ':c:' .. id)) do n = n + tonumber(v) end
  return n
end

local function effective(id, given)
  local v = redis.call('HGET', LIMITS, id)
  if v then return tonumber(v) end
  return tonumber(given)
end

local function publish(kind, who, ids)
  if #ids > 0 then
    redis.call('PUBLISH', CHANNEL, cjson.encode({kind, who, ids}))
  end
end

-- Forget an instance and everything it holds; returns the limit ids that got slots back.
local function drop_instance(inst)
  local L = P .. ':leases:' .. inst
  local seen, freed = {}, {}
  for _, ids in ipairs(redis.call('HVALS', L)) do
    for _, id in ipairs(split(ids)) do
      if not seen[id] then
        seen[id] = true
        table.insert(freed, id)
        redis.call('HDEL', P .. ':c:' .. id, inst)
      end
    end
  end
  redis.call('DEL', L)
  redis.call('ZREM', I, inst)
  return freed
end

local function purge(now)
  for _, inst in ipairs(redis.call('ZRANGEBYSCORE', I, '-inf', now)) do
    publish('expired', inst, drop_instance(inst))
  end
end

local function take(inst, lease, ids)
  for _, id in ipairs(ids) do redis.call('HINCRBY', P .. ':c:' .. id, inst, 1) end
  redis.call('HSET', P .. ':leases:' .. inst, lease, table.concat(ids, '\0'))
end

-- Remove leases ARGV[first..] of inst; returns how many existed.
local function release(inst, first)
  local L = P .. ':leases:' .. inst
  local seen, freed, n = {}, {}, 0
  for k = first, #ARGV do
    local ids = redis.call('HGET', L, ARGV[k])
    if ids then
      n = n + 1
      for _, id in ipairs(split(ids)) do
        local C = P .. ':c:' .. id
        if redis.call('HINCRBY', C, inst, -1) <= 0 then redis.call('HDEL', C, inst) end
        if not seen[id] then
          seen[id] = true
          table.insert(freed, id)
        end
      end
      redis.call('HDEL', L, ARGV[k])
    end
  end
  -- Only limits some instance was refused on since their last release are announced.
  local wanted = {}
  for _, id in ipairs(freed) do
    if redis.call('HDEL', WANT, id) == 1 then table.insert(wanted, id) end
  end
  publish('released', inst, wanted)
  return n
end
"""

# ARGV: prefix, epoch, instance, lease, force ('1'/'0'), n, then n pairs (limit id, value).
# Returns {1, live} taken, {0, live, k, value, used} blocked by claim k, {-1} unregistered,
# {-2} reset; live is the number of live instances (for the fallback share).
_ACQUIRE: Final = _PRELUDE + r"""
local epoch, inst, lease, force = ARGV[2], ARGV[3], ARGV[4], ARGV[5] == '1'
purge(now_ms())
if redis.call('GET', EPOCH) ~= epoch then return {-2} end
if not redis.call('ZSCORE', I, inst) then return {-1} end
local live = redis.call('ZCARD', I)
if redis.call('HEXISTS', P .. ':leases:' .. inst, lease) == 1 then return {1, live} end
local n = tonumber(ARGV[6])
local ids = {}
for k = 1, n do
  local id = ARGV[5 + 2 * k]
  ids[k] = id
  if not force then
    local limit = effective(id, ARGV[6 + 2 * k])
    if limit >= 0 then
      local u = used(id)
      if u >= limit then
        redis.call('HSET', WANT, id, '1')  -- its next release is announced
        return {0, live, k, limit, u}
      end
    end
  end
end
take(inst, lease, ids)
return {1, live}
"""

# ARGV: prefix, instance, lease ids... Returns how many of them were held.
_RELEASE: Final = _PRELUDE + r"""
return release(ARGV[2], 3)
"""

# ARGV: prefix, epoch, instance, ttl_ms, lease ids to release...
# Returns {1, live instances} renewed, {-1, live} expired, {-2, live} reset.
_HEARTBEAT: Final = _PRELUDE + r"""
local epoch, inst, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = now_ms()
purge(now)
if redis.call('GET', EPOCH) ~= epoch then return {-2, redis.call('ZCARD', I)} end
if not redis.call('ZSCORE', I, inst) then return {-1, redis.call('ZCARD', I)} end
redis.call('ZADD', I, now + ttl, inst)
release(inst, 5)
return {1, redis.call('ZCARD', I)}
"""

# ARGV: prefix, epoch candidate, instance, ttl_ms, mode ('force'/'fit'), m, m pairs (limit
# id, run-time value) known to this instance, then per lease: lease id, n, n pairs (limit id,
# value). The run-time values are written only if Redis had lost its data (no epoch): the
# first instance back restores SET LIMIT. Returns {epoch, replaced, live, {rejected lease
# ids}, {{limit id, value, used} over their value}, {limit id, run-time value, ...}}.
_REGISTER: Final = _PRELUDE + r"""
local inst, ttl, mode = ARGV[3], tonumber(ARGV[4]), ARGV[5]
local now = now_ms()
purge(now)
local m = tonumber(ARGV[6])
local epoch = redis.call('GET', EPOCH)
if not epoch then
  epoch = ARGV[2]
  redis.call('SET', EPOCH, epoch)
  for k = 1, m do redis.call('HSETNX', LIMITS, ARGV[5 + 2 * k], ARGV[6 + 2 * k]) end
end
local replaced = 0
if redis.call('ZSCORE', I, inst) then replaced = 1 end
local freed = drop_instance(inst)
redis.call('ZADD', I, now + ttl, inst)
local rejected, touched, values = {}, {}, {}
local i = 7 + 2 * m
while i <= #ARGV do
  local lease, n = ARGV[i], tonumber(ARGV[i + 1])
  local ids, fits = {}, true
  for k = 1, n do
    local id = ARGV[i + 2 * k]
    local limit = effective(id, ARGV[i + 1 + 2 * k])
    ids[k] = id
    if not values[id] then table.insert(touched, id) end
    values[id] = limit
    if limit >= 0 and used(id) >= limit then fits = false end
  end
  if fits or mode == 'force' then
    take(inst, lease, ids)
  else
    table.insert(rejected, lease)
  end
  i = i + 2 + 2 * n
end
local over = {}
for _, id in ipairs(touched) do
  local u = used(id)
  if values[id] >= 0 and u > values[id] then table.insert(over, {id, values[id], u}) end
end
publish('joined', inst, freed)
return {epoch, replaced, redis.call('ZCARD', I), rejected, over, redis.call('HGETALL', LIMITS)}
"""

# ARGV: prefix, instance. Drops the instance and all its leases (a clean shutdown).
_LEAVE: Final = _PRELUDE + r"""
publish('left', ARGV[2], drop_instance(ARGV[2]))
return 1
"""

# ARGV: prefix, limit id, value ('' removes the run-time value), or only prefix: clear all.
_SET_LIMIT: Final = _PRELUDE + r"""
if #ARGV == 1 then
  redis.call('DEL', LIMITS)
  redis.call('PUBLISH', CHANNEL, cjson.encode({'cleared'}))
  return 1
end
local id, value = ARGV[2], ARGV[3]
if value == '' then
  redis.call('HDEL', LIMITS, id)
  redis.call('PUBLISH', CHANNEL, cjson.encode({'limit', id, false}))
else
  redis.call('HSET', LIMITS, id, value)
  redis.call('PUBLISH', CHANNEL, cjson.encode({'limit', id, tonumber(value)}))
end
return 1
"""

# ARGV: prefix. Returns {now_ms, {instance, expiry, leases}...}.
_INSTANCES: Final = _PRELUDE + r"""
local out = {}
local rows = redis.call('ZRANGE', I, 0, -1, 'WITHSCORES')
for k = 1, #rows, 2 do
  local inst = rows[k]
  table.insert(out, {inst, rows[k + 1], redis.call('HLEN', P .. ':leases:' .. inst)})
end
return {now_ms(), out}
"""

# ARGV: prefix, limit ids... Returns {{used, runtime value or false}...}.
_USAGE: Final = _PRELUDE + r"""
local out = {}
for k = 2, #ARGV do
  local v = redis.call('HGET', LIMITS, ARGV[k])
  table.insert(out, {used(ARGV[k]), v or false})
end
return out
"""


# -- the hot path's connection ---------------------------------------------------------------


class _Incomplete(Exception):
    """More bytes are needed to parse a reply."""


class _ScriptMissing(ResponseError):
    """NOSCRIPT: Redis does not know the script (restarted, SCRIPT FLUSH): redis-py loads it."""


def _pack(args: Sequence[str | int]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One RESP2 reply at ``pos``: (value, position after it); raises `_Incomplete`.
    An error reply is returned as a `ResponseError` instance (not raised)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line, after = buf[pos : pos + 1], bytes(buf[pos + 1 : end]), end + 2
    if kind == b":":
        return int(line), after
    if kind == b"+":
        return line.decode(), after
    if kind == b"-":
        text = line.decode(errors="replace")
        return (_ScriptMissing if text.startswith("NOSCRIPT") else ResponseError)(text), after
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, after
        if len(buf) < after + n + 2:
            raise _Incomplete
        return bytes(buf[after : after + n]).decode(errors="replace"), after + n + 2
    if kind == b"*":
        n = int(line)
        if n < 0:
            return None, after
        items = []
        for _ in range(n):
            item, after = _parse(buf, after)
            items.append(item)
        return items, after
    raise ResponseError(f"unexpected reply type {kind!r} from Redis")


class _Lane:
    """One pipelined connection speaking RESP2 itself, for the two calls on every session's
    path (acquire and release): redis-py costs about 170 to 240 us of CPU per round trip on
    a 2-core VM, this about 30 (measured). Replies are matched to calls in order. Only for
    ``redis://host:port[/db]`` URLs (a password too); TLS and other forms use redis-py.

    A call that fails on a lost connection is raised as `ConnectionError` (the store retries
    it once on a fresh connection: every script is idempotent for the same arguments); one
    that is cancelled or times out closes the connection, so a dead link is never reused."""

    def __init__(self, host: str, port: int, db: int, username: str | None, password: str | None) -> None:
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self._conn: _LaneConnection | None = None
        self._connecting = asyncio.Lock()

    @classmethod
    def for_url(cls, url: str) -> _Lane | None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "redis" or parts.query or not parts.hostname:
            return None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            return None
        unquote = urllib.parse.unquote
        return cls(
            parts.hostname, parts.port or 6379, int(path or 0),
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
        )  # fmt: skip

    async def call(self, args: Sequence[str | int]) -> Any:
        conn = self._conn
        if conn is None or not conn.open:
            async with self._connecting:
                conn = self._conn
                if conn is None or not conn.open:
                    conn = self._conn = await self._connect()
        try:
            return await conn.send(args)
        except (asyncio.CancelledError, TimeoutError):
            conn.abort()  # its reply could come late and belong to no one: start afresh
            raise

    async def _connect(self) -> _LaneConnection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_LaneConnection, self.host, self.port)
        try:
            if self.password is not None:
                auth: list[str | int] = ["AUTH", self.password]
                if self.username:
                    auth.insert(1, self.username)
                await conn.send(auth)
            if self.db:
                await conn.send(["SELECT", self.db])
        except BaseException:
            conn.abort()
            raise
        return conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _LaneConnection(asyncio.Protocol):
    """One connection of a `_Lane`: writes commands, parses replies, answers callers in order."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._buf = bytearray()

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def send(self, args: Sequence[str | int]) -> Any:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionError("the connection to Redis is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        transport.write(_pack(args))
        reply = await future
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        while pos < len(buf):
            try:
                value, pos_after = _parse(buf, pos)
            except _Incomplete:
                break
            except (ValueError, ResponseError) as exc:  # not RESP: this connection is unusable
                self._fail(ConnectionError(f"unreadable reply from Redis: {exc}"))
                self.abort()
                return
            pos = pos_after
            if self._waiting:
                future = self._waiting.popleft()
                if not future.done():  # a caller that gave up still owned this reply
                    future.set_result(value)
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail(ConnectionError(f"the connection to Redis was lost: {exc}" if exc else "Redis closed the connection"))

    def _fail(self, exc: Exception) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(exc)


# -- the store -------------------------------------------------------------------------------


class LeaseStore:
    """One pgguard's handle on the shared store: acquire/release leases, renew, get events.

    Lifecycle: `start` (connect, register, start the heartbeat and subscriber tasks), then
    `acquire` / `release` / `adopt` / `set_limit`, then `close` (stop the tasks and give back
    every slot). ``on_event`` is called on the event loop for every `ClusterEvent`; it must
    not block and should not raise (an exception is logged and ignored).
    """

    def __init__(
        self,
        url: str,
        *,
        instance: str | None = None,
        lease_ttl: float = 10.0,
        heartbeat_interval: float | None = None,
        timeout: float = 1.0,
        prefix: str = "pgguard",
        on_event: Callable[[ClusterEvent], None] | None = None,
    ) -> None:
        self.url = url
        self.instance = instance or default_instance_name()
        self.lease_ttl = lease_ttl
        self.heartbeat_interval = heartbeat_interval or lease_ttl / 3
        self.timeout = timeout
        self.prefix = "{" + prefix + "}"
        self.channel = self.prefix + ":events"
        self._on_event = on_event
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=_IN_FLIGHT + 2,  # + the subscriber's connection, + a spare
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
            # One immediate retry replaces a pooled connection that a Redis restart closed
            # (every script is idempotent for the same arguments); our timeout bounds both.
            retry=Retry(NoBackoff(), 1),
        )
        self._redis = aioredis.Redis.from_pool(pool)
        self._slots = asyncio.Semaphore(_IN_FLIGHT)
        self._s_acquire = self._redis.register_script(_ACQUIRE)
        self._s_release = self._redis.register_script(_RELEASE)
        self._s_heartbeat = self._redis.register_script(_HEARTBEAT)
        self._s_register = self._redis.register_script(_REGISTER)
        self._s_leave = self._redis.register_script(_LEAVE)
        self._s_set_limit = self._redis.register_script(_SET_LIMIT)
        self._s_instances = self._redis.register_script(_INSTANCES)
        self._s_usage = self._redis.register_script(_USAGE)
        # acquire and release, on every session's path, go through a lean connection of
        # their own when the URL allows (see _Lane); everything else through redis-py.
        self._lane = _Lane.for_url(url)

        self._epoch = ""  # Redis's epoch, learnt at registration
        self._seq = itertools.count(1)
        self._leases: dict[str, Lease] = {}  # every live session's lease, in acquisition order
        self._pending_release: set[str] = set()  # released locally, not yet confirmed in Redis
        self._up = False
        self._down_reason = "not started"
        self.live_instances = 1  # as last seen by a heartbeat or register
        self.renewed_at: float | None = None  # monotonic time the last renewal was *sent*
        self._restore_lock = asyncio.Lock()
        self._generation = 0  # incremented by every successful (re)register
        self._acquiring = 0
        self._quiet = asyncio.Event()  # set while no acquire is in flight
        self._quiet.set()
        self._open = asyncio.Event()  # cleared while a re-register runs
        self._open.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._subscriber: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._closed = False
        # Limits last answered full, by limit id: while the subscriber listens, an acquire
        # that needs one of them is refused without a round trip until a release, expiry,
        # limit change or resync names that limit (a storm of refusals stays local). Only
        # ever refuses more, never admits: Redis stays the authority for every admission.
        self._full: dict[str, Blocked] = {}
        self._subscription = 0  # incremented by every successful (re)subscribe
        self._heard = 0  # incremented by every release / limit event the subscriber delivers
        # Run-time limits as last known (registration, events, our own set_limit), so the
        # first instance back after Redis lost its data can put them back.
        self._runtime: dict[str, int] = {}
        self.stats = StoreStats()

    @classmethod
    def from_config(
        cls, config: ClusterConfig, on_event: Callable[[ClusterEvent], None] | None = None
    ) -> LeaseStore:
        """A store for ``[cluster]`` (not started)."""
        return cls(
            config.redis,
            instance=config.instance,
            lease_ttl=config.lease_ttl,
            heartbeat_interval=config.renew_every,
            timeout=config.timeout,
            prefix=config.prefix,
            on_event=on_event,
        )

    # ------------------------------------------------------------------ state

    @property
    def up(self) -> bool:
        """True while Redis answers; False: apply on_redis_failure."""
        return self._up

    @property
    def down_reason(self) -> str:
        return self._down_reason

    @property
    def leases(self) -> Sequence[Lease]:
        """This instance's live leases, oldest first."""
        return list(self._leases.values())

    @property
    def leases_valid(self) -> bool:
        """False once ``lease_ttl`` has passed since the last renewal was sent: the other
        instances may have been given this instance's slots."""
        return self.renewed_at is not None and time.monotonic() < self.renewed_at + self.lease_ttl

    def fallback_limit(self, limit: int) -> int:
        """This instance's share of ``limit`` while Redis is unreachable (`local_share`)."""
        return local_share(limit, self.live_instances)

    # -------------------------------------------------------------- lifecycle

    async def start(self, *, background: bool = True) -> None:
        """Register this instance (taking over a stale record of the same name).

        ``background`` starts the heartbeat and subscriber tasks (tests drive `heartbeat`
        themselves with False); with them, `start` returns once subscribed. Raises
        `RedisUnavailable` if Redis does not answer: the store is then down, and with
        ``background`` its heartbeat keeps trying and registers when Redis answers (a
        `StateChanged` event), so a pgguard can start, in fallback, while Redis is away.
        """
        if background:
            self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="pgguard-heartbeat"))
        await self._register("force", Renewal.OK)
        self._set_up("started")
        if background:
            self._start_subscriber()
            await self.wait_subscribed()

    async def wait_subscribed(self) -> None:
        """Return once the subscriber listens (bounded by the call timeout)."""
        async with asyncio.timeout(self.timeout * 5):
            await self._subscribed.wait()

    async def close(self, *, leave: bool = True) -> None:
        """Stop the tasks; with ``leave`` give back every slot at once (else they expire).
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        tasks = [*self._tasks, *([self._subscriber] if self._subscriber else [])]
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a task stuck in the client library must not hold up shutdown
            _, stuck = await asyncio.wait(tasks, timeout=self.timeout + 1.0)
            if stuck:
                log.warning("cluster: %d background task(s) did not stop", len(stuck))
        self._tasks.clear()
        self._subscriber = None
        if leave and self._up:
            try:
                await self._call(self._s_leave, [self.instance])
            except RedisUnavailable:
                pass  # the leases expire after lease_ttl
        self._leases.clear()
        if self._lane is not None:
            self._lane.close()
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self.timeout):
                await self._redis.aclose()

    # -------------------------------------------------------------- admission

    async def acquire(self, claims: Sequence[Claim], *, force: bool = False) -> Lease | Blocked:
        """Take a slot on every claim, or none: a `Lease`, or the first full limit.

        ``force`` takes the slots even over a limit (exempt roles). Raises `RedisUnavailable`
        at once while the store is down, or if Redis does not answer within ``timeout``.
        If that happens, or the caller is cancelled, after the script was sent, the lease
        (if Redis took it) is released by the next heartbeat: no slot leaks.
        """
        if not claims:
            raise ValueError("acquire needs at least one claim")
        if not force and self._full and self._subscribed.is_set():
            for claim in claims:
                known = self._full.get(claim.id)
                if known is not None:
                    self.stats.cached_blocks += 1
                    return known
        lease = Lease(f"{next(self._seq)}", tuple(claims))
        args: list[str | int] = [lease.id, "1" if force else "0", len(claims)]
        for claim in claims:
            args += [claim.id, claim.value]
        for _ in range(3):  # a re-register in between is retried; a third is a broken store
            if not self._up:
                raise RedisUnavailable(self._down_reason)
            await self._open.wait()
            generation = self._generation
            # Cache a refusal only if every later release is sure to be heard: subscribed
            # before the script was sent, and still on the same subscription after.
            # And no release heard meanwhile: its message may have overtaken this reply.
            subscription = self._subscription if self._subscribed.is_set() else -1
            heard = self._heard
            self._acquiring += 1
            self._quiet.clear()
            try:
                reply = await self._call(self._s_acquire, [self._epoch, self.instance, *args])
            except BaseException:  # unavailable, or cancelled (the client left): Redis may
                self._pending_release.add(lease.id)  # have taken it; the heartbeat releases it
                raise
            finally:
                self._acquiring -= 1
                if self._acquiring == 0:
                    self._quiet.set()
            code = int(reply[0])
            if code >= 0:
                self.live_instances = max(1, int(reply[1]))
            if code == 1:
                self._leases[lease.id] = lease
                return lease
            if code == 0:
                claim = claims[int(reply[2]) - 1]
                blocked = Blocked(claim.limit, claim.name, int(reply[3]), int(reply[4]))
                if (
                    subscription == self._subscription
                    and heard == self._heard
                    and self._subscribed.is_set()
                ):
                    self._full[claim.id] = blocked
                return blocked
            await self._restore(Renewal.RESET if code == -2 else Renewal.EXPIRED, generation)
        raise RedisUnavailable("the store kept losing this instance's registration")

    def adopt(self, claims: Sequence[Claim]) -> Lease:
        """Record a session admitted without Redis (on_redis_failure local/open): it is
        inserted into the store when Redis answers again. No I/O."""
        lease = Lease(f"{next(self._seq)}", tuple(claims))
        self._leases[lease.id] = lease
        return lease

    async def release(self, lease: Lease | str) -> None:
        """Give back a lease's slots; again (or an unknown id) is a no-op. Never raises: if
        Redis does not answer, the next heartbeat releases it (or it expires with us)."""
        lease_id = lease if isinstance(lease, str) else lease.id
        held = self._leases.pop(lease_id, None)
        if held is None:
            return
        for claim in held.claims:
            self._full.pop(claim.id, None)
        if not self._up:
            self._pending_release.add(lease_id)
            return
        try:
            await self._call(self._s_release, [self.instance, lease_id])
        except RedisUnavailable:
            self._pending_release.add(lease_id)
        except asyncio.CancelledError:
            self._pending_release.add(lease_id)
            raise

    # ---------------------------------------------------------------- renewal

    async def heartbeat(self) -> Renewal:
        """Renew this instance (one call for all its leases) and retry pending releases.

        On EXPIRED or RESET, or the first success after an outage, re-registers the live
        sessions and emits `Restored`. Raises `RedisUnavailable` (and marks the store down).
        """
        pending = list(self._pending_release)
        sent = time.monotonic()
        generation = self._generation
        reply = await self._call(
            self._s_heartbeat,
            [self._epoch, self.instance, int(self.lease_ttl * 1000), *pending],
        )
        code, live = int(reply[0]), int(reply[1])
        self.live_instances = max(1, live)
        if code == 1:
            self._pending_release.difference_update(pending)
            self.renewed_at = sent
            self.stats.renew_seconds = time.monotonic() - sent
            if not self._up:  # back after an outage: leases adopted meanwhile go in now
                await self._restore(Renewal.OK, generation)
                self._set_up("redis answers again")
            return Renewal.OK
        outcome = Renewal.RESET if code == -2 else Renewal.EXPIRED
        await self._restore(outcome, generation)
        self._set_up("re-registered")
        return outcome

    async def _restore(self, cause: Renewal, generation: int) -> None:
        """Re-register the live sessions, once per loss however many callers noticed it."""
        async with self._restore_lock:
            if self._generation != generation:
                return  # someone else re-registered since the caller looked
            self._open.clear()
            try:
                await self._quiet.wait()  # in-flight acquires must be in _leases or not at all
                mode = "fit" if cause is Renewal.EXPIRED else "force"
                over, lost = await self._register(mode, cause)
            finally:
                self._open.set()
        self._full.clear()
        log.warning(
            "cluster re-registered instance=%s cause=%s leases=%d over=%d lost=%d",
            self.instance, cause.value, len(self._leases), len(over), len(lost),
        )  # fmt: skip
        self._emit(Restored(cause, over, lost))
        self._emit(Resync(f"re-registered ({cause.value})"))

    async def _register(
        self, mode: str, cause: Renewal
    ) -> tuple[tuple[Overrun, ...], tuple[str, ...]]:
        snapshot = list(self._leases.values())
        # A fresh candidate: after Redis lost its data, the first instance back sets a new
        # epoch, so every other one sees RESET rather than mistaking the loss for its expiry.
        candidate = uuid.uuid4().hex
        args: list[str | int] = [candidate, self.instance, int(self.lease_ttl * 1000), mode]
        args.append(len(self._runtime))
        for key, value in self._runtime.items():
            args += [key, value]
        for lease in snapshot:
            args += [lease.id, len(lease.claims)]
            for claim in lease.claims:
                args += [claim.id, claim.value]
        sent = time.monotonic()
        reply = await self._call(self._s_register, args)
        epoch, replaced, live, rejected, over_rows, runtime = reply
        self._runtime = {str(k): int(v) for k, v in zip(runtime[::2], runtime[1::2], strict=True)}
        self._epoch = str(epoch)
        self._generation += 1
        self.renewed_at = sent
        self.live_instances = max(1, int(live))
        self._pending_release.clear()  # the instance was rebuilt from _leases
        if int(replaced) and cause is Renewal.OK and not self._leases:
            log.warning("cluster instance=%s replaced a stale record of the same name", self.instance)
        lost = tuple(str(x) for x in rejected)
        for lease_id in lost:
            self._leases.pop(lease_id, None)
        # Released locally while the script ran: it re-inserted them, so release them again.
        gone = [lease.id for lease in snapshot if lease.id not in self._leases and lease.id not in lost]
        if gone:
            self._pending_release.update(gone)
        over = tuple(
            Overrun(*_parse_limit_id(str(row[0])), int(row[1]), int(row[2])) for row in over_rows
        )
        return over, lost

    async def _heartbeat_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.heartbeat()
            except RedisUnavailable:
                pass  # marked down by _call; the next beat probes again
            except Exception:  # the task must survive anything to keep probing
                log.exception("cluster heartbeat failed")

    # -------------------------------------------------------------- run-time

    async def set_limit(self, limit: Limit, name: str, value: int | None) -> None:
        """Store a run-time limit (None removes it) and tell every instance (`LimitChanged`).

        The stored value wins over each instance's configured one in `acquire`. Raises
        `RedisUnavailable`.
        """
        key = limit_id(limit, name)
        # Known here at once, so a Redis that lost its data gets it back from us even if
        # this call fails (the caller sends it again when Redis answers).
        if value is None:
            self._runtime.pop(key, None)
        else:
            self._runtime[key] = value
        await self._call(self._s_set_limit, [key, "" if value is None else str(value)])

    async def clear_limits(self) -> None:
        """Remove every run-time limit (`LimitsCleared` everywhere). Raises `RedisUnavailable`."""
        self._runtime.clear()
        await self._call(self._s_set_limit, [])

    @property
    def runtime(self) -> dict[tuple[Limit, str], int]:
        """The run-time limits as last known here (no I/O): read at registration, kept up
        to date by events; after Redis lost its data, the first instance back restores them."""
        return {_parse_limit_id(k): v for k, v in self._runtime.items()}

    async def runtime_limits(self) -> dict[tuple[Limit, str], int]:
        """The stored run-time limits (for an instance that joins). Raises `RedisUnavailable`."""
        raw = await self._bounded(lambda: self._redis.hgetall(self.prefix + ":limits"))
        return {_parse_limit_id(k): int(v) for k, v in raw.items()}

    async def usage(self, limits: Iterable[tuple[Limit, str]]) -> list[LimitUse]:
        """Each limit's use across all instances and its stored run-time value."""
        keys = list(limits)
        rows = await self._call(self._s_usage, [limit_id(k, n) for k, n in keys])
        return [
            LimitUse(k, n, int(row[0]), None if row[1] is None else int(row[1]))
            for (k, n), row in zip(keys, rows, strict=True)
        ]

    async def instances(self) -> list[InstanceRow]:
        """SHOW CLUSTER: every registered instance, its expiry and lease count."""
        now, rows = await self._call(self._s_instances, [])
        return [
            InstanceRow(str(r[0]), (float(r[1]) - int(now)) / 1000, int(r[2])) for r in rows
        ]

    # ------------------------------------------------------------- internals

    async def _call(self, script: Any, args: Sequence[str | int]) -> Any:
        if self._lane is not None and (script is self._s_acquire or script is self._s_release):
            return await self._bounded(lambda: self._lane_call(script, args))
        return await self._bounded(lambda: script(args=[self.prefix, *args]))

    async def _lane_call(self, script: Any, args: Sequence[str | int]) -> Any:
        assert self._lane is not None
        argv: list[str | int] = ["EVALSHA", script.sha, 0, self.prefix, *args]
        try:
            return await self._lane.call(argv)
        except _ScriptMissing:
            return await script(args=[self.prefix, *args])  # redis-py loads it, then runs it
        except ConnectionError:  # a connection closed under us (Redis restarted): once more
            return await self._lane.call(argv)

    async def _bounded(self, call: Callable[[], Awaitable[Any]]) -> Any:
        self.stats.calls += 1
        try:
            async with self._slots:
                async with asyncio.timeout(self.timeout):
                    return await call()
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.errors += 1
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._set_down(reason)
            raise RedisUnavailable(reason) from exc

    def _set_down(self, reason: str) -> None:
        if self._up:
            self._up = False
            self._down_reason = reason
            log.warning("cluster store unavailable instance=%s: %s", self.instance, reason)
            self._emit(StateChanged(False, reason))
        self._subscribed.clear()
        self._full.clear()

    def _set_up(self, reason: str) -> None:
        if not self._up:
            self._up = True
            self._down_reason = ""
            if reason != "started":
                log.warning("cluster store available again instance=%s: %s", self.instance, reason)
                self._emit(StateChanged(True, reason))
                if self._tasks:  # the subscriber's connection may be half-dead: start afresh
                    self._start_subscriber()

    def _emit(self, event: ClusterEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception("cluster event handler failed for %r", event)

    def _start_subscriber(self) -> None:
        if self._subscriber is not None:
            self._subscriber.cancel()
        self._subscribed.clear()
        self._full.clear()
        self._subscriber = asyncio.create_task(self._subscribe_loop(), name="pgguard-subscriber")

    async def _subscribe_loop(self) -> None:
        while not self._closed:
            pubsub = self._redis.pubsub()
            try:
                async with asyncio.timeout(self.timeout):
                    await pubsub.subscribe(self.channel)
                self._full.clear()  # releases may have been missed before this point
                self._subscription += 1
                self._subscribed.set()
                self._emit(Resync("subscribed"))
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if message is not None and message.get("type") == "message":
                        self._dispatch(message["data"])
            except (RedisError, OSError, TimeoutError) as exc:
                self._subscribed.clear()
                self._full.clear()
                log.info("cluster subscriber lost its connection: %s", exc)
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    async with asyncio.timeout(self.timeout):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(_RESUBSCRIBE_DELAY_S)

    def _dispatch(self, data: str) -> None:
        self._heard += 1
        try:
            message = json.loads(data)
            kind = message[0]
            if kind == "cleared":
                self._full.clear()
                self._runtime.clear()
                self._emit(LimitsCleared())
            elif kind == "limit":
                self._full.pop(str(message[1]), None)
                limit, name = _parse_limit_id(message[1])
                value = message[2]
                if value is False:
                    self._runtime.pop(str(message[1]), None)
                else:
                    self._runtime[str(message[1])] = int(value)
                self._emit(LimitChanged(limit, name, None if value is False else int(value)))
            else:
                ids = message[2] if isinstance(message[2], list) else []  # cjson: {} for []
                for limit_key in ids:
                    self._full.pop(str(limit_key), None)
                limits = tuple(_parse_limit_id(str(i)) for i in ids)
                self._emit(Released(str(message[1]), limits, str(kind)))
        except (ValueError, IndexError, TypeError, KeyError):
            log.warning("cluster: ignored a malformed event on %s", self.channel)
