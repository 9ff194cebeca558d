"""Configuration: one TOML file (plus PGGUARD_SECTION__KEY environment overrides) -> frozen dataclasses.

Validation happens once, at load time. Every error is a ``ConfigError`` naming the file,
the dotted key and the bad value. A reload builds a new ``Config``; nothing is changed in
place. Defaults live in the dataclasses below and are repeated, with comments, in
``config.example.toml``.

Size: about 700 lines, one job: the schema of one file (every section's dataclass beside its
checks), read and validated in one place.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args, get_origin

from .errors import ConfigError
from .limits import NetworkRule, Policy, RoleRule, Rules
from .rules import FaultSpecError, parse_rule
from .scram import is_verifier, parse_verifier

__all__ = [
    "Config",
    "ServerConfig",
    "BackendConfig",
    "LimitsConfig",
    "RoleConfig",
    "DatabaseConfig",
    "AddressConfig",
    "AdminConfig",
    "MetricsConfig",
    "ErrorsConfig",
    "TLSConfig",
    "FaultsConfig",
    "ClusterConfig",
    "PoolConfig",
    "LogConfig",
    "load",
    "loads",
    "from_dict",
    "parse_address",
    "DEFAULT_PATH",
    "MAX_WORKERS",
]

DEFAULT_PATH: Final = "pgguard.toml"
ENV_PREFIX: Final = "PGGUARD_"

PolicyName = Literal["queue", "reject"]
SSLMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
RelayName = Literal["auto", "native", "python"]
RELAY_ENV: Final = "PGGUARD_RELAY"  # the default of [server] relay (CI runs the suite on each relay)


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _limit(value: int) -> str | None:
    return None if value >= -1 else "must be -1 (unlimited), 0 (nobody) or a positive number"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or greater"


def _addresses(value: tuple[str, ...]) -> str | None:
    if not value:
        return "needs at least one host:port"
    for item in value:
        try:
            parse_address(item)
        except ValueError as exc:
            return str(exc)
    return None


def _address(value: str | None) -> str | None:
    return None if value is None else _addresses((value,))


def _port(value: int) -> str | None:
    return None if 0 < value < 65536 else "must be a TCP port (1-65535)"


MAX_WORKERS: Final = 64  # more is a typo, not a deployment (each worker is a Redis client)
# [admin] reserved_connections: each reserved socket is a descriptor past the derived client
# cap, so they must fit in the 64 that control.FD_RESERVE keeps for such needs.
MAX_RESERVED_CONNECTIONS: Final = 32


def _admin_password(value: str) -> str | None:
    if not value:
        return "must not be empty (leave it out instead)"
    if is_verifier(value):
        try:
            parse_verifier(value)
        except ValueError as exc:
            return f"SCRAM-SHA-256 verifier {exc}"
    return None


def _check(fn: typing.Callable[[Any], str | None]) -> dict[str, Any]:
    return {"check": fn}


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    listen: tuple[str, ...] = field(default=("127.0.0.1:6432",), metadata=_check(_addresses))
    client_login_timeout: float = field(default=10.0, metadata=_check(_positive))
    shutdown_timeout: float = field(default=30.0, metadata=_check(_non_negative))
    # Client sockets pgguard keeps open at once, in any state (startup, queued, live, console);
    # past it a client gets 53300 "sorry, too many clients already" at once. 0: derived from
    # the process's open-file limit, leaving room for each client's server socket.
    max_client_connections: int = field(default=0, metadata=_check(_non_negative))
    # Who relays a session's bytes after its first ReadyForQuery: the native relay
    # (pgguard._relay, a C extension) when it is built ("auto"), always ("native": a warning
    # and the Python relay when it is missing), or never ("python").
    relay: RelayName = field(default_factory=lambda: _relay_default(os.environ))
    # Seconds a live session stays on the Python relay before the native one takes it (at
    # the first ReadyForQuery after that). A session that logs in, runs a query and leaves
    # sooner (a storm, a connection per transaction) never pays the hand-over: two dup()s,
    # wake-ups of the relay thread and, for a reused session, adopting its socket back. 0:
    # the native relay takes every session at its first ReadyForQuery.
    relay_after: float = field(default=0.1, metadata=_check(_non_negative))
    # Processes serving `listen` together (SO_REUSEPORT; see workers.py). 1: this process
    # alone. More: the supervisor's one Gate holds the limits for all of them (host.py);
    # with [cluster] they share them through Redis instead.
    workers: int = field(default=1, metadata=_check(lambda n: None if 1 <= n <= MAX_WORKERS else f"must be 1 to {MAX_WORKERS}"))


def _relay_default(env: Mapping[str, str]) -> RelayName:
    value = env.get(RELAY_ENV, "auto")
    choices = get_args(RelayName)
    if value not in choices:
        raise ConfigError(f"environment {RELAY_ENV}", "server.relay",
                          f"must be one of {', '.join(choices)} (got {value!r})")
    return typing.cast(RelayName, value)


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig:
    host: str = "127.0.0.1"
    port: int = field(default=5432, metadata=_check(_port))
    connect_timeout: float = field(default=5.0, metadata=_check(_positive))
    # After the client left, how long to wait for the server to close the session before
    # pgguard closes it and frees the slot anyway.
    close_timeout: float = field(default=5.0, metadata=_check(_positive))
    # Server logins (dial to first ReadyForQuery) in progress at once; past it, admitted
    # clients wait for a login slot (logins.py), within connect_timeout. 0: no cap. Off by
    # default: pgguard cannot see the server's cores, and a slot is held while the server
    # waits for the client's password, so a default cap would let a few silent sockets
    # stall every login (see config.example.toml).
    max_logins_in_flight: int = field(default=0, metadata=_check(_non_negative))
    sslmode: SSLMode = "disable"
    sslrootcert: str | None = None
    monitor_dsn: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    max_connections: int = field(default=-1, metadata=_check(_limit))
    role_max_connections: int = field(default=-1, metadata=_check(_limit))
    database_max_connections: int = field(default=-1, metadata=_check(_limit))
    policy: PolicyName = "queue"
    queue_timeout: float = field(default=30.0, metadata=_check(_positive))
    max_queue: int = field(default=1000, metadata=_check(_non_negative))
    # Waiters across every role and database together (max_queue is per role, and role
    # names come from clients): past it, 53300 at once.
    max_queue_total: int = field(default=10000, metadata=_check(_non_negative))
    exempt_roles: tuple[str, ...] = ()
    # Sessions per client address (TCP; Unix-socket clients are not limited), -1: unlimited;
    # [addresses."net"] overrides it for the addresses of a network.
    client_address_max_connections: int = field(default=-1, metadata=_check(_limit))
    idle_timeout: float = field(default=0.0, metadata=_check(_non_negative))  # 0: off
    mirror_catalog: bool = False
    mirror_interval: float = field(default=10.0, metadata=_check(_positive))


@dataclass(frozen=True, slots=True, kw_only=True)
class RoleConfig:
    max_connections: int | None = field(default=None, metadata=_check(_limit))
    policy: PolicyName | None = None
    queue_timeout: float | None = field(default=None, metadata=_check(_positive))
    max_queue: int | None = field(default=None, metadata=_check(_non_negative))
    idle_timeout: float | None = field(default=None, metadata=_check(_non_negative))
    # Warm server-session reuse for this role ([pool] reuse); None: the default.
    reuse: bool | None = None
    # Share of a contended shared limit (the total, a database's) against other roles.
    weight: float = field(default=1.0, metadata=_check(_positive))
    # Slots of [limits] max_connections that only this role may take.
    reserved: int = field(default=0, metadata=_check(_non_negative))


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseConfig:
    max_connections: int = field(default=-1, metadata=_check(_limit))
    reuse: bool | None = None  # [pool] reuse for this database; None: the default


@dataclass(frozen=True, slots=True, kw_only=True)
class AddressConfig:
    """``[addresses."10.1.2.0/24"]``: sessions per client address for addresses in a network."""

    max_connections: int = field(default=-1, metadata=_check(_limit))
    policy: PolicyName | None = None  # None: the client's role's policy


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    users: tuple[str, ...] = ()
    # A SCRAM-SHA-256 verifier (pgguard hash-password), or plain text (warned about at start).
    password: str | None = field(default=None, metadata=_check(_admin_password))
    auth: Literal["scram-sha-256", "trust"] = "scram-sha-256"
    # Sockets past [server] max_client_connections whose StartupMessage pgguard still reads,
    # for console logins only (an application client among them gets 53300 at once); like
    # PostgreSQL's superuser_reserved_connections. 0: none. Only with `users` set.
    reserved_connections: int = field(default=3, metadata=_check(
        lambda n: None if 0 <= n <= MAX_RESERVED_CONNECTIONS else f"must be 0 to {MAX_RESERVED_CONNECTIONS}"))


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    listen: str | None = field(default=None, metadata=_check(_address))


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorsConfig:
    detail: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSConfig:
    cert_file: str | None = None
    key_file: str | None = None
    client_mode: Literal["disable", "allow", "require"] = "allow"


def _fault_rules(value: tuple[str, ...]) -> str | None:
    for text in value:
        try:
            parse_rule(text)
        except FaultSpecError as exc:
            return str(exc)
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultsConfig:
    """App-testing fault rules (see faults.py): the INJECT language, one rule per string."""

    seed: int = 0
    rules: tuple[str, ...] = field(default=(), metadata=_check(_fault_rules))


def _redis_url(value: str) -> str | None:
    scheme = value.partition("://")[0]
    if scheme in ("redis", "rediss", "unix") and value != f"{scheme}://":
        return None
    return "must be a redis://host:port/db, rediss://... (TLS) or unix:///path URL"


def _instance_name(value: str | None) -> str | None:
    if value is None or (value and value.isprintable()):
        return None
    return "must be a non-empty printable name"


RedisFailurePolicy = Literal["local", "reject", "open"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    """[cluster]: limits shared by several pgguards through one Redis (see leases.py).

    Absent (``Config.cluster is None``): single-process limits, Redis is never imported.
    """

    # redis://[user:password@]host:port/db, rediss:// for TLS, unix:///path/to/redis.sock
    redis: str = field(default="redis://127.0.0.1:6379/0", metadata=_check(_redis_url))
    # This process's name in the store; None: hostname:pid. Must be unique among live pgguards.
    instance: str | None = field(default=None, metadata=_check(_instance_name))
    # An instance that has not renewed for this long loses all its slots to the others.
    lease_ttl: float = field(default=10.0, metadata=_check(_positive))
    # How often the instance renews (one call for all its sessions); None: lease_ttl / 3.
    heartbeat_interval: float | None = field(default=None, metadata=_check(_positive))
    # Bound on every Redis call; past it the store counts as unavailable.
    timeout: float = field(default=1.0, metadata=_check(_positive))
    on_redis_failure: RedisFailurePolicy = "local"
    # Key prefix, so several pgguard fleets can share one Redis database.
    prefix: str = field(default="pgguard", metadata=_check(_instance_name))

    @property
    def renew_every(self) -> float:
        """The heartbeat interval in seconds (the explicit one, else a third of lease_ttl)."""
        return self.heartbeat_interval if self.heartbeat_interval is not None else self.lease_ttl / 3


# The default lookup: a SECURITY DEFINER function the DBA creates (docs/reuse.md), so the
# monitoring role never reads pg_authid itself.
DEFAULT_AUTH_QUERY: Final = "SELECT verifier FROM pgguard.lookup_role($1)"


def _max_idle(value: int) -> str | None:
    return None if value >= 0 else "must be 0 or greater"


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    """[pool]: warm server-session reuse (pool.py). Off by default: sessions are relayed as-is."""

    reuse: bool = False
    # Reads a role's verifier (pg_authid.rolpassword) through [backend] monitor_dsn; $1 is the
    # role; the first column of the first row is the verifier (NULL or no row: unknown role).
    auth_query: str = DEFAULT_AUTH_QUERY
    # Seconds a verifier lookup that started that recently may answer a login. 0: every login
    # is checked against a verifier read after it arrived, as PostgreSQL reads pg_authid at
    # every login (a changed password, NOLOGIN, VALID UNTIL, DROP ROLE count at once). Over 0:
    # for up to that long an old password still logs in and a new one is refused.
    auth_cache_ttl: float = field(default=0.0, metadata=_check(_non_negative))
    # After a wrong password, a role's next verifier lookup starts no sooner than this after
    # the one the failed login used: a flood of wrong passwords costs at most 1/this lookups
    # per second per role (and a client's next attempt waits up to this long).
    auth_retry_interval: float = field(default=0.1, metadata=_check(_positive))
    # Roles pgguard lets in without a password and logs in to the server without one (the
    # server must trust pgguard for them).
    trusted_roles: tuple[str, ...] = ()
    # Warm idle server sessions kept per (role, database); more are closed on release.
    max_idle: int = field(default=20, metadata=_check(_max_idle))
    # Seconds a warm session may stay idle in the pool before it is closed. 0: never.
    server_idle_timeout: float = field(default=600.0, metadata=_check(_non_negative))
    # Seconds after which a server session is closed instead of reused (up to 10 % earlier,
    # so sessions made together do not all close together). 0: never.
    server_lifetime: float = field(default=3600.0, metadata=_check(_non_negative))
    # Sent when a client leaves a session idle outside a transaction; the session is reused
    # only if it succeeds.
    server_reset_query: str = "DISCARD ALL"


LogFormat = Literal["text", "json"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    """[log]: how log lines are written to stderr (the level is ``pgguard run --log-level``)."""

    # "text": logfmt lines (ts level=... event=... key=value); "json": one JSON object a line.
    format: LogFormat = "text"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    path: str = DEFAULT_PATH
    server: ServerConfig = field(default_factory=ServerConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    roles: Mapping[str, RoleConfig] = field(default_factory=dict)
    databases: Mapping[str, DatabaseConfig] = field(default_factory=dict)
    # Keyed by the network as written; parsed (and checked) at load into ``networks``.
    addresses: Mapping[str, AddressConfig] = field(default_factory=dict)
    admin: AdminConfig = field(default_factory=AdminConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    errors: ErrorsConfig = field(default_factory=ErrorsConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    cluster: ClusterConfig | None = None
    pool: PoolConfig = field(default_factory=PoolConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def reuse(self, role: str, database: str) -> bool:
        """True when sessions of (role, database) are reused ([pool] reuse, overridden per
        role or database; an explicit false on either wins)."""
        rc = self.roles.get(role)
        dc = self.databases.get(database)
        overrides = (None if rc is None else rc.reuse, None if dc is None else dc.reuse)
        if False in overrides:
            return False
        return True in overrides or self.pool.reuse

    @property
    def reuse_anywhere(self) -> bool:
        """True when some role or database may reuse server sessions (pool.py is needed)."""
        return (
            self.pool.reuse
            or any(r.reuse for r in self.roles.values())
            or any(d.reuse for d in self.databases.values())
        )

    def rules(self) -> Rules:
        """The admission rules for ``limits.Gate``."""
        lim = self.limits
        return Rules(
            max_connections=lim.max_connections,
            role_max_connections=lim.role_max_connections,
            database_max_connections=lim.database_max_connections,
            policy=Policy(lim.policy),
            queue_timeout=lim.queue_timeout,
            max_queue=lim.max_queue,
            max_queue_total=lim.max_queue_total,
            exempt_roles=frozenset(lim.exempt_roles),
            roles={
                name: RoleRule(
                    max_connections=r.max_connections,
                    policy=None if r.policy is None else Policy(r.policy),
                    queue_timeout=r.queue_timeout,
                    max_queue=r.max_queue,
                    weight=r.weight,
                    reserved=r.reserved,
                )
                for name, r in self.roles.items()
            },
            databases={name: d.max_connections for name, d in self.databases.items()},
            client_address_max_connections=lim.client_address_max_connections,
            networks=tuple(
                sorted(
                    (
                        NetworkRule(
                            network=network_of(text),
                            max_connections=a.max_connections,
                            policy=None if a.policy is None else Policy(a.policy),
                        )
                        for text, a in self.addresses.items()
                    ),
                    key=lambda n: -n.network.prefixlen,
                )
            ),
        )

    def idle_timeout(self, role: str) -> float:
        """Seconds a session of ``role`` may stay idle (0: forever)."""
        rc = self.roles.get(role)
        if rc is not None and rc.idle_timeout is not None:
            return rc.idle_timeout
        return self.limits.idle_timeout


# Sections that are one dataclass; "roles" and "databases" are tables of named ones.
_SECTIONS: Final[dict[str, type]] = {
    "server": ServerConfig,
    "backend": BackendConfig,
    "limits": LimitsConfig,
    "admin": AdminConfig,
    "metrics": MetricsConfig,
    "errors": ErrorsConfig,
    "tls": TLSConfig,
    "faults": FaultsConfig,
    "cluster": ClusterConfig,
    "pool": PoolConfig,
    "log": LogConfig,
}
_NAMED: Final[dict[str, type]] = {
    "roles": RoleConfig,
    "databases": DatabaseConfig,
    "addresses": AddressConfig,
}


def network_of(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An ``[addresses]`` key -> its network (``::ffff:`` mapped IPv4 networks read as IPv4,
    as client addresses are); raises ValueError with the reason."""
    network = ipaddress.ip_network(text, strict=True)
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); raises ValueError with the reason."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port < 65536:
        raise ValueError(f"{text!r}: port {port} is out of range")
    return host, port


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raises ConfigError naming the file and key."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            text = fh.read().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(name, "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(name, "", f"cannot read: {exc}") from None
    return loads(text, name, env=os.environ if env is None else env)


def loads(text: str, path: str = "<string>", env: Mapping[str, str] | None = None) -> Config:
    """Validate TOML text (plus environment overrides when ``env`` is given)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"invalid TOML: {exc}") from None
    if env:
        _apply_env(data, env)
    return _build(data, path)


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    """PGGUARD_SECTION__KEY=value (or PGGUARD_ROLES__NAME__KEY) overrides the file."""
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        parts = var[len(ENV_PREFIX) :].split("__")
        if len(parts) == 3 and parts[0].lower() in _NAMED:
            path = [parts[0].lower(), _env_name(data.get(parts[0].lower()), parts[1]), parts[2].lower()]
        else:
            path = [p.lower() for p in parts]
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment {var}", ".".join(path), "conflicts with the file")
            node = child
        node[path[-1]] = value


def _env_name(table: Any, name: str) -> str:
    """The role/database an env var means: PGGUARD_ROLES__APP__X names [roles.app] (a table in
    the file matching case-insensitively), else the lower-cased name, as PostgreSQL folds
    unquoted identifiers; environment variable names are conventionally upper case."""
    if isinstance(table, dict):
        if name in table:
            return name
        for key in table:
            if key.lower() == name.lower():
                return str(key)
    return name.lower()


def from_dict(data: dict[str, Any], path: str = "<dict>") -> Config:
    """Validate an already-parsed TOML document (e.g. the testing API's dict form)."""
    return _build(data, path)


def _build(data: dict[str, Any], path: str) -> Config:
    kwargs: dict[str, Any] = {"path": path}
    for section, value in data.items():
        if section in _SECTIONS:
            kwargs[section] = _section(_SECTIONS[section], value, path, section)
        elif section in _NAMED:
            if not isinstance(value, dict):
                raise ConfigError(path, section, f"must be a table of named sections, not {value!r}")
            kwargs[section] = {
                name: _section(_NAMED[section], body, path, f"{section}.{name}")
                for name, body in value.items()
            }
        else:
            raise ConfigError(path, section, "unknown section")
    config = Config(**kwargs)
    _check_addresses(config)
    _check_reserved(config)
    _check_control(config)
    _check_tls(config)
    _check_cluster(config)
    _check_pool(config)
    return config


def _check_addresses(config: Config) -> None:
    """Every [addresses] key is a network (CIDR), each network named once."""
    seen: dict[object, str] = {}
    for text in config.addresses:
        key = f'addresses."{text}"'
        try:
            network = network_of(text)
        except ValueError as exc:
            raise ConfigError(config.path, key, f"is not a network in CIDR form ({exc})") from None
        if network in seen:
            raise ConfigError(config.path, key, f'names the same network as addresses."{seen[network]}"')
        seen[network] = text
    if config.server.workers > 1 and config.cluster is None:
        # The workers' one Gate (host.py) does not carry client addresses yet: refuse rather
        # than leave the limit unenforced.
        key = next((f'addresses."{t}"' for t in config.addresses), None)
        if key is None and config.limits.client_address_max_connections != -1:
            key = "limits.client_address_max_connections"
        if key is not None:
            raise ConfigError(
                config.path, key,
                "client address limits are not shared by [server] workers without [cluster] yet "
                "(use workers = 1, or [cluster], where each worker applies them to its own clients)",
            )  # fmt: skip


def _check_reserved(config: Config) -> None:
    """Reservations are slots of the total: together they must fit in it when it is set."""
    total = config.limits.max_connections
    reserved = {name: r.reserved for name, r in config.roles.items() if r.reserved}
    if total == -1 or not reserved:
        return
    if sum(reserved.values()) > total:
        name = max(reserved, key=lambda n: reserved[n])
        raise ConfigError(
            config.path,
            f"roles.{name}.reserved",
            f"the roles' reserved slots ({sum(reserved.values())}) exceed limits.max_connections ({total})",
        )


def _check_pool(config: Config) -> None:
    """Reuse authenticates clients against verifiers read through monitor_dsn."""
    if config.reuse_anywhere and not config.backend.monitor_dsn and not config.pool.trusted_roles:
        raise ConfigError(config.path, "pool.reuse", "true needs backend.monitor_dsn (to read verifiers)")


def _check_cluster(config: Config) -> None:
    """A heartbeat must come more often than the lease expires, or every lease lapses."""
    cluster = config.cluster
    if cluster is not None and cluster.renew_every >= cluster.lease_ttl:
        raise ConfigError(
            config.path, "cluster.heartbeat_interval", "must be less than cluster.lease_ttl"
        )


def _check_tls(config: Config) -> None:
    """Keys that only make sense together ([tls] certificate and key; require needs both)."""
    tls = config.tls
    if (tls.cert_file is None) != (tls.key_file is None):
        missing = "tls.key_file" if tls.key_file is None else "tls.cert_file"
        raise ConfigError(config.path, missing, "tls.cert_file and tls.key_file must be set together")
    if tls.client_mode == "require" and tls.cert_file is None:
        raise ConfigError(
            config.path, "tls.client_mode", "require needs tls.cert_file and tls.key_file"
        )


def _check_control(config: Config) -> None:
    """Mirror mode reads the catalog through monitor_dsn, so it needs one."""
    if config.limits.mirror_catalog and not config.backend.monitor_dsn:
        raise ConfigError(config.path, "limits.mirror_catalog", "true needs backend.monitor_dsn")


def _section(cls: type, value: Any, path: str, key: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(path, key, f"must be a table, not {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, raw in value.items():
        f = fields.get(name)
        if f is None:
            raise ConfigError(path, f"{key}.{name}", f"unknown key (known: {', '.join(fields)})")
        converted = _convert(hints[name], raw, path, f"{key}.{name}")
        check = f.metadata.get("check")
        if check is not None and converted is not None:
            problem = check(converted)
            if problem:
                raise ConfigError(path, f"{key}.{name}", f"{problem} (got {raw!r})")
        kwargs[name] = converted
    return cls(**kwargs)


def _convert(hint: Any, raw: Any, path: str, key: str) -> Any:
    """Check ``raw`` against the field's type; lists become tuples; ints are accepted as floats."""
    origin = get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = get_args(hint)
        if raw is None and type(None) in options:
            return None
        problems = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, raw, path, key)
            except ConfigError as exc:
                problems.append(exc.problem)
        raise ConfigError(path, key, problems[0])
    if origin is Literal:
        choices = get_args(hint)
        if raw not in choices:
            raise ConfigError(path, key, f"must be one of {', '.join(map(str, choices))} (got {raw!r})")
        return raw
    if origin is tuple:
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise ConfigError(path, key, f"must be a string or a list of strings (got {raw!r})")
        return tuple(raw)
    if hint is bool:
        if not isinstance(raw, bool):
            raise ConfigError(path, key, f"must be true or false (got {raw!r})")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(path, key, f"must be an integer (got {raw!r})")
        return raw
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ConfigError(path, key, f"must be a number (got {raw!r})")
        return float(raw)
    if hint is str:
        if not isinstance(raw, str):
            raise ConfigError(path, key, f"must be a string (got {raw!r})")
        return raw
    raise ConfigError(path, key, f"unsupported type {hint!r}")  # a bug in the schema
