"""The one error hierarchy: every error pgguard raises, each carrying the SQLSTATE a client should get."""

from __future__ import annotations

from typing import Final

__all__ = [
    "PgGuardError",
    "ConfigError",
    "ProtocolViolation",
    "UnsupportedProtocol",
    "NoUserName",
    "TooManyConnections",
    "BackendUnavailable",
    "BackendUnreachable",
    "ShuttingDown",
    "AuthenticationFailed",
    "AdminShutdown",
    "IdleSessionTimeout",
    "IdleInTransactionTimeout",
    "AdminCommandError",
    "EncryptionRequired",
    "RedisUnavailable",
    "ClusterLeaseLost",
]


class PgGuardError(Exception):
    """Base of every error pgguard raises on purpose.

    ``sqlstate`` is what a client in the startup phase is told; ``severity`` is the
    ErrorResponse severity (startup errors are always FATAL, as in PostgreSQL).
    """

    sqlstate: str = "XX000"
    severity: str = "FATAL"

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.message: Final = message
        self.detail: Final = detail


class ConfigError(PgGuardError):
    """A configuration file (or environment override) is invalid; names the file and dotted key."""

    sqlstate = "F0000"  # config_file_error

    def __init__(self, file: str, key: str, problem: str) -> None:
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}")
        self.file = file
        self.key = key
        self.problem = problem


class ProtocolViolation(PgGuardError):
    """The client sent bytes that are not a valid startup-phase packet.

    ``silent`` marks the cases PostgreSQL answers by closing without a reply (a bad or
    truncated startup length: it only logs them), as opposed to a FATAL ErrorResponse.
    """

    sqlstate = "08P01"

    def __init__(self, message: str, *, silent: bool = False) -> None:
        super().__init__(message)
        self.silent = silent


class UnsupportedProtocol(ProtocolViolation):
    """StartupMessage with a protocol major version other than 3."""

    sqlstate = "0A000"


class NoUserName(ProtocolViolation):
    """StartupMessage without a (non-empty) ``user`` parameter."""

    sqlstate = "28000"

    def __init__(self) -> None:
        super().__init__("no PostgreSQL user name specified in startup packet")


class TooManyConnections(PgGuardError):
    """A limit is full (or its queue is, or the wait timed out): PostgreSQL's 53300."""

    sqlstate = "53300"


class BackendUnavailable(PgGuardError):
    """The PostgreSQL server could not be reached within ``connect_timeout``."""

    sqlstate = "08006"

    def __init__(self, reason: str) -> None:
        super().__init__(f"pgguard could not connect to the server: {reason}")


class BackendLost(PgGuardError):
    """The server closed the connection before the session started, without an ErrorResponse.

    The client is told in libpq's own words (what it would print had it been connected
    directly), so it never sees a bare end of file from pgguard.
    """

    sqlstate = "08006"

    def __init__(self, reason: str) -> None:
        super().__init__("server closed the connection unexpectedly", detail=f"pgguard: {reason}")
class BackendUnreachable(PgGuardError):
    """The server could not be dialled (refused, unreachable, no reply within ``connect_timeout``).

    Answered as PostgreSQL answers while it cannot take connections: 57P03
    (cannot_connect_now) with the wording of backend_startup.c's not-accepting case and the
    reason in DETAIL. libpq's PQping (pg_isready) reads 57P03 as "rejecting connections";
    any other startup error would read as "accepting" while the server is down.
    """

    sqlstate = "57P03"

    def __init__(self, reason: str) -> None:
        super().__init__(
            "the database system is not accepting connections",
            detail=f"pgguard could not connect to the server: {reason}",
        )
        self.reason = reason


class ShuttingDown(PgGuardError):
    """pgguard is draining: new and queued clients get PostgreSQL's shutdown error."""

    sqlstate = "57P03"

    def __init__(self) -> None:
        super().__init__("the database system is shutting down")


class AuthenticationFailed(PgGuardError):
    """The admin console refused a login (wrong password, or a user not in ``[admin] users``)."""

    sqlstate = "28P01"

    def __init__(self, user: str) -> None:
        super().__init__(f'password authentication failed for user "{user}"')


class AdminShutdown(PgGuardError):
    """A session closed by an operator (``KILL CLIENT``) or at the end of a drain."""

    sqlstate = "57P01"

    def __init__(self) -> None:
        super().__init__("terminating connection due to administrator command")


class IdleSessionTimeout(PgGuardError):
    """A session idle longer than its ``idle_timeout``, as PostgreSQL's idle_session_timeout."""

    sqlstate = "57P05"

    def __init__(self) -> None:
        super().__init__("terminating connection due to idle-session timeout")


class IdleInTransactionTimeout(PgGuardError):
    """``idle_timeout`` reached inside a transaction: PostgreSQL's idle-in-transaction FATAL."""

    sqlstate = "25P03"

    def __init__(self) -> None:
        super().__init__("terminating connection due to idle-in-transaction timeout")


class AdminCommandError(PgGuardError):
    """An admin console command failed; the session stays usable (severity ERROR)."""

    severity = "ERROR"

    def __init__(self, sqlstate: str, message: str, *, detail: str | None = None) -> None:
        super().__init__(message, detail=detail)
        self.sqlstate = sqlstate


class EncryptionRequired(PgGuardError):
    """``[tls] client_mode = "require"`` and the client did not negotiate TLS.

    The message is PostgreSQL's for a client that matches only ``hostssl`` lines of
    pg_hba.conf (auth.c, ClientAuthentication): host is the client's address.
    """

    sqlstate = "28000"  # invalid_authorization_specification

    def __init__(self, host: str, user: str, database: str) -> None:
        super().__init__(
            f'no pg_hba.conf entry for host "{host}", user "{user}", '
            f'database "{database}", no encryption'
        )


class RedisUnavailable(PgGuardError):
    """Cluster mode: the shared lease store (Redis) did not answer within ``[cluster] timeout``.

    The shell applies ``[cluster] on_redis_failure`` (local, reject or open). If a client is
    turned away for it, it gets PostgreSQL's "cannot connect now" class (57P03), the one a
    server uses when it is up but not accepting sessions for now.
    """

    sqlstate = "57P03"  # cannot_connect_now

    def __init__(self, reason: str) -> None:
        super().__init__(f"pgguard cannot reach its cluster store: {reason}")
        self.reason = reason


class ClusterLeaseLost(PgGuardError):
    """Cluster mode: this pgguard was cut off from Redis for longer than ``lease_ttl`` while
    Redis stayed up, the session's slot was given to another, and it no longer fits: the
    session is closed rather than run over the limit. 57P01 (admin_shutdown), the class a
    pooler or driver already treats as "reconnect", with the reason in the message."""

    sqlstate = "57P01"

    def __init__(self) -> None:
        super().__init__(
            "terminating connection because pgguard lost its slot in the cluster store",
            detail="pgguard could not reach Redis for longer than [cluster] lease_ttl and the "
            "slot was given to another session; connect again",
        )
