"""The systems under test: a throwaway PostgreSQL, PgBouncer (session mode) and pgguard, each its own process.

``Stack`` starts them on free loopback ports and stops them; ``Target`` is what a scenario
points its clients at (``direct``, ``pgbouncer``, ``pgguard``), with the pid whose CPU and
memory the harness watches. Also here: the machine description stored with every result,
the file-descriptor limit, and /proc readers.

PgBouncer refuses to run as root, so as root it runs as the ``postgres`` OS user (the same
user the throwaway cluster runs as), started directly with setuid so it keeps our raised
file-descriptor limit (``runuser`` would reset it through PAM).

TLS (the ``tls`` scenario only): one throwaway certificate (``trustme``) serves all three
targets. ``server_tls()`` turns ``ssl`` on in the shared cluster for the duration of that
scenario and off again (``ssl`` is reloadable), so every other scenario meets the server
exactly as before: with ``ssl`` off, libpq's default ``sslmode=prefer`` stays in clear. The
proxies under TLS are extra processes started by the scenario (``start_pgguard(name,
tls=True)``, ``start_pgbouncer(name, client_tls=True)``), terminating client TLS and reaching
the server in clear, as the main ones do.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import pwd
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pgguard.testing.cluster import PostgresCluster

__all__ = ["Stack", "Target", "load_average", "machine_info", "raise_nofile", "rss_kib", "cpu_seconds", "fd_count"]

REPO: Final = Path(__file__).resolve().parent.parent
PGBOUNCER_PATHS: Final = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")
PGBOUNCER_MISSING: Final = (
    "PgBouncer not found: its column is skipped. Install it with `apt-get install pgbouncer` "
    "(Debian/Ubuntu) or put `pgbouncer` on PATH."
)
# Roles the scenarios use, and their pgguard rules (PostgreSQL-side limits are set per scenario).
BENCH_ROLE: Final = "bench"
STORM_ROLE: Final = "storm"
REJECT_ROLE: Final = "rej"
WAITER_ROLE: Final = "waiter"
STORM_LIMIT: Final = 20
REJECT_LIMIT: Final = 2
# Sessions at once: pgbench -c 64 + storm 20 + 300 idle + the sampler, with room to spare.
PG_MAX_CONNECTIONS: Final = 600
_START_TIMEOUT_S: Final = 30.0
# Descriptors kept back from a storm for listeners, logs, backends and the interpreter.
FD_RESERVE: Final = 256
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (children inherit it); return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout
    except OSError:
        return ""
    return out.splitlines()[0].strip() if out else ""


def load_average() -> float:
    """The 1-minute load average, recorded beside figures taken on a shared machine."""
    return round(os.getloadavg()[0], 2)


def machine_info() -> dict[str, object]:
    """Date, cores, CPU model, kernel, and the versions of everything in the measurement."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop

        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = "not installed (asyncio loop)"
    commit = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _version(["git", "-C", str(REPO), "status", "--porcelain", "--", "pgguard"])
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uvloop_version,
        "postgresql": _version(["pgbench", "--version"]).replace("pgbench ", ""),
        "pgbouncer": _version([find_pgbouncer() or "false", "--version"]),
        "pgguard_commit": commit + ("+dirty" if dirty else ""),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def find_pgbouncer() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    for path in PGBOUNCER_PATHS:
        if os.access(path, os.X_OK):
            return path
    return None


@dataclass(frozen=True)
class Target:
    """Where clients connect, and which process to watch (None: PostgreSQL itself)."""

    name: str
    host: str
    port: int
    pid: int | None = None


def clean_env() -> dict[str, str]:
    """Our environment without libpq's PG* variables, so every client goes where we say.

    pgguard's own PGGUARD_* variables (PGGUARD_RELAY=python, ...) are kept.
    """
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PG") or k.startswith("PGGUARD_")
    }
    env["PGCONNECT_TIMEOUT"] = "30"
    env["PGPASSFILE"] = "/nonexistent"
    return env


class _Process:
    """A child process with its log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log: Path, **popen: object) -> None:
        self.name = name
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(  # noqa: S603 - our own argv
            argv, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **popen
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = _START_TIMEOUT_S) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            match = regex.search(self.log_text())
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)  # polling a log file; bounded by the deadline
        raise RuntimeError(
            f"{self.name} did not log {pattern!r} within {timeout:.0f} s "
            f"(exit code {self.proc.poll()}); log tail:\n{self.log_text()[-2000:]}"
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log_file.close()


class Stack:
    """PostgreSQL + PgBouncer + pgguard on loopback, for one benchmark run."""

    def __init__(
        self,
        *,
        with_pgbouncer: bool = True,
        log_level: str = "info",
        backend: str = "unix",
        pgguard_tree: Path | None = None,
    ) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="pgguard-bench-", dir="/tmp"))
        self.log_level = log_level
        # How both proxies reach the server: "unix" (its socket directory, as a proxy on the
        # database host is deployed) or "tcp" (loopback, like the direct clients).
        self.backend = backend
        # Another source tree holding a pgguard/ package (e.g. an older commit, for before/after).
        self.pgguard_tree = pgguard_tree
        self.pg = PostgresCluster(
            max_connections=PG_MAX_CONNECTIONS,
            # Each pgbench -C / storm session is a fork; logging them would cost more than the work.
            settings={"log_connections": False, "log_disconnections": False},
        )
        self.pgbouncer_path = find_pgbouncer() if with_pgbouncer else None
        self.pgbouncer: _Process | None = None
        self.pgguard: _Process | None = None
        self.targets: dict[str, Target] = {}
        self.notes: list[str] = []
        self._extra_guards: list[_Process] = []
        self._tls_files: tuple[Path, Path] | None = None
        # Every process here runs with the raised limit; each storm client is one descriptor
        # in the load generator and one in the proxy (plus one backend while admitted).
        self.nofile = raise_nofile()
        self.fd_budget = self.nofile[0] - FD_RESERVE

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- start / stop

    def start(self) -> None:
        self.pg.start()
        pg = self.pg
        for role in (BENCH_ROLE, STORM_ROLE, REJECT_ROLE, WAITER_ROLE):
            pg.create_role(role)
        pg.create_database("bench", owner=BENCH_ROLE)
        for role in (STORM_ROLE, REJECT_ROLE, WAITER_ROLE):
            pg.execute(f"GRANT CONNECT ON DATABASE bench TO {role}")
        subprocess.run(
            ["pgbench", "-i", "-q", "-s", "1", "-h", pg.host, "-p", str(pg.port), "-U", BENCH_ROLE, "bench"],
            env=clean_env(), capture_output=True, check=True, timeout=120,
        )
        self.targets["direct"] = Target("direct", pg.host, pg.port)
        if self.pgbouncer_path is None:
            if "pgbouncer" not in self.notes:
                self.notes.append(PGBOUNCER_MISSING)
        else:
            self.pgbouncer, port = self.start_pgbouncer("pgbouncer")
            self.targets["pgbouncer"] = Target("pgbouncer", "127.0.0.1", port, self.pgbouncer.pid)
        self.pgguard = self.start_pgguard("pgguard")
        self.targets["pgguard"] = Target("pgguard", "127.0.0.1", self.guard_port(self.pgguard), self.pgguard.pid)

    def stop(self) -> None:
        for proc in [*self._extra_guards, self.pgguard, self.pgbouncer]:
            if proc is not None:
                proc.stop()
        self.pg.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def backend_host(self) -> str:
        return str(self.pg.socket_dir) if self.backend == "unix" else self.pg.host

    # --------------------------------------------------------------------- pgguard

    def pgguard_config(
        self,
        *,
        tls: bool = False,
        tree: Path | None = None,
        extra: str = "",
        backend_extra: str = "",
        limits_extra: str = "",
        server_extra: str = "",
    ) -> str:
        # Only the TLS instance names the TLS keys, so --pgguard-tree still runs older trees.
        tls_conf = ""
        if tls:
            cert, key = self.tls_files()
            tls_conf = f'''
[tls]
cert_file = "{cert}"
key_file = "{key}"
client_mode = "require"
'''
        # The memory scenario queues 10,000 clients (one descriptor each): above the cap
        # derived from a 20,000-descriptor limit, which leaves room for every client's server
        # socket. Named only for a tree that knows the key (--pgguard-tree runs older ones).
        tree = tree or self.pgguard_tree or REPO
        cap = ""
        if "max_client_connections" in (tree / "pgguard" / "config.py").read_text():
            cap = "max_client_connections = 15000"
        return f"""\
[server]
listen = "127.0.0.1:0"
client_login_timeout = 60.0
shutdown_timeout = 2.0
{cap}
{server_extra}

[backend]
host = "{self.backend_host}"
port = {self.pg.port}
connect_timeout = 30.0
{'sslmode = "disable"' if tls else ""}
{backend_extra}

[limits]
policy = "queue"
queue_timeout = 300.0
max_queue = 100000
{limits_extra}

[roles.{STORM_ROLE}]
max_connections = {STORM_LIMIT}

[roles.{REJECT_ROLE}]
max_connections = {REJECT_LIMIT}
policy = "reject"

[roles.{WAITER_ROLE}]
max_connections = 0
queue_timeout = 600.0
{tls_conf}{extra}"""

    def start_pgguard(
        self,
        name: str,
        *,
        tls: bool = False,
        extra: str = "",
        backend_extra: str = "",
        limits_extra: str = "",
        server_extra: str = "",
    ) -> _Process:
        """A pgguard in its own process (``python -m pgguard run``), as deployed.

        ``tls``: clients must use TLS (``[tls] client_mode = "require"``), the server is
        reached in clear (``[backend] sslmode = "disable"``). ``extra``: TOML appended to
        the configuration (the cluster scenario's ``[cluster]``, the reuse scenario's
        ``[pool]``); ``backend_extra``: keys added to ``[backend]`` (``monitor_dsn``);
        ``limits_extra``: keys added to ``[limits]`` (the noisy-neighbour total).
        ``server_extra``: keys added to ``[server]`` (``workers``).
        """
        conf = self.workdir / f"{name}.toml"
        conf.write_text(self.pgguard_config(
            tls=tls, extra=extra, backend_extra=backend_extra, limits_extra=limits_extra,
            server_extra=server_extra,
        ))
        env = clean_env()
        if self.pgguard_tree is not None:
            env["PYTHONPATH"] = str(self.pgguard_tree)
        proc = _Process(
            name,
            [sys.executable, "-m", "pgguard", "run", "-c", str(conf), "--log-level", self.log_level],
            self.workdir / f"{name}.log",
            cwd=str(self.pgguard_tree or REPO),
            env=env,
        )
        if name != "pgguard":
            self._extra_guards.append(proc)
        return proc

    @staticmethod
    def guard_port(proc: _Process) -> int:
        match = proc.wait_for_log(r"event=start listen=127\.0\.0\.1:(\d+)")
        return int(match.group(1))

    # ------------------------------------------------------------------- pgbouncer

    def start_pgbouncer(
        self, name: str, *, client_tls: bool = False, scram_users: dict[str, str] | None = None,
        user_limits: dict[str, int] | None = None,
    ) -> tuple[_Process, int]:
        """A PgBouncer in session mode, trusting everyone on loopback; returns it and its port.

        ``client_tls``: clients must use TLS (``client_tls_sslmode = require``), the server
        is reached in clear (``server_tls_sslmode = disable``). ``scram_users`` (role ->
        stored SCRAM verifier): ``auth_type = scram-sha-256`` against those verifiers in its
        own user file, instead of trust (the reuse scenario). ``user_limits`` (role -> n):
        ``max_user_connections`` per role, added to the storm role's.
        """
        from pgguard.testing.cluster import free_port

        assert self.pgbouncer_path is not None
        tls_ini = ""
        if client_tls:
            cert, key = self.tls_files()
            tls_ini = (f"client_tls_sslmode = require\nclient_tls_cert_file = {cert}\n"
                       f"client_tls_key_file = {key}\nserver_tls_sslmode = disable\n")
        run_as = None
        if os.geteuid() == 0:
            run_as = pwd.getpwnam("postgres")
            os.chown(self.workdir, run_as.pw_uid, run_as.pw_gid)
        users = [BENCH_ROLE, STORM_ROLE, REJECT_ROLE, WAITER_ROLE, "postgres"]
        auth_type = "trust"
        userlist = self.workdir / "userlist.txt"
        if scram_users:
            auth_type = "scram-sha-256"
            userlist = self.workdir / f"{name}-userlist.txt"
            userlist.write_text("".join(f'"{u}" "{v}"\n' for u, v in scram_users.items()))
        else:
            userlist.write_text("".join(f'"{u}" ""\n' for u in users))
        limits = {STORM_ROLE: STORM_LIMIT, **(user_limits or {})}
        users_ini = "\n".join(f"{u} = max_user_connections={n}" for u, n in limits.items())
        port = free_port()
        ini = self.workdir / f"{name}.ini"
        ini.write_text(f"""\
[databases]
* = host={self.backend_host} port={self.pg.port}

[users]
{users_ini}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = {auth_type}
auth_file = {userlist}
admin_users = postgres
pool_mode = session
max_client_conn = 100000
default_pool_size = 400
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
stats_period = 3600
logfile =
pidfile =
{tls_ini}""")
        popen: dict[str, object] = {"env": clean_env(), "cwd": str(self.workdir)}
        if run_as is not None:
            for path in (userlist, ini):
                os.chown(path, run_as.pw_uid, run_as.pw_gid)
            popen.update(user=run_as.pw_uid, group=run_as.pw_gid, extra_groups=[])
        proc = _Process(name, [self.pgbouncer_path, str(ini)], self.workdir / f"{name}.log", **popen)
        if name != "pgbouncer":
            self._extra_guards.append(proc)
        proc.wait_for_log(r"process up|listening on 127\.0\.0\.1")
        return proc, port

    def reset_pgbouncer(self) -> None:
        """Close PgBouncer's pooled server connections (they count at the server)."""
        target = self.targets.get("pgbouncer")
        if target is None:
            return
        for command in ("KILL bench", "RESUME bench"):
            subprocess.run(
                ["psql", "-X", "-q", "-h", target.host, "-p", str(target.port), "-U", "postgres",
                 "-d", "pgbouncer", "-c", command],
                env=clean_env(), capture_output=True, check=True, timeout=30,
            )

    # ------------------------------------------------------------------------- TLS

    def tls_files(self) -> tuple[Path, Path]:
        """The run's certificate and key (PEM, made once with ``trustme``), readable by the server.

        PostgreSQL wants the key mode 0600 and owned by its OS user (PgBouncer runs as the
        same user), so as root both files and the directories above them go to ``postgres``.
        """
        if self._tls_files is not None:
            return self._tls_files
        import trustme

        leaf = trustme.CA().issue_cert("127.0.0.1", "localhost")
        tls_dir = self.workdir / "tls"
        tls_dir.mkdir(mode=0o700)
        cert, key = tls_dir / "server.crt", tls_dir / "server.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        cert.chmod(0o644)
        key.chmod(0o600)
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (self.workdir, tls_dir, cert, key):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._tls_files = (cert, key)
        return self._tls_files

    @contextmanager
    def server_tls(self) -> Iterator[None]:
        """``ssl = on`` in the cluster (the run's certificate) inside the block, off after it.

        Checked by a ``sslmode=require`` session that pg_stat_ssl says is encrypted; a
        certificate the server could not load raises with the server log's tail.
        """
        cert, key = self.tls_files()
        pg = self.pg
        for setting, value in (("ssl_cert_file", cert), ("ssl_key_file", key), ("ssl", "on")):
            pg.execute(f"ALTER SYSTEM SET {setting} = '{value}'")
        try:
            pg.reload()
            env = clean_env()
            env["PGSSLMODE"] = "require"
            done = subprocess.run(
                ["psql", "-X", "-A", "-t", "-q", "-h", pg.host, "-p", str(pg.port), "-U", "postgres",
                 "-c", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"],
                env=env, capture_output=True, text=True, timeout=30, check=False,
            )
            if done.stdout.strip() != "t":
                raise RuntimeError(
                    f"PostgreSQL did not take ssl = on ({done.stderr.strip()}); log tail:\n"
                    f"{pg.read_log()[-2000:]}"
                )
            yield
        finally:
            for setting in ("ssl", "ssl_cert_file", "ssl_key_file"):
                pg.execute(f"ALTER SYSTEM RESET {setting}")
            pg.reload()
