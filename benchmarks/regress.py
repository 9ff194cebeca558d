"""``python -m benchmarks regress``: PostgreSQL's own regression suite, direct and through pgguard.

The suite is the one matching the server (issue 22, point 5): for the system PostgreSQL of
Debian package ``postgresql-N`` at version V, the source of that exact package
(``apt-get source postgresql-N=V``), its ``pg_regress`` (shipped in ``postgresql-client-N``,
under pg_config's ``pgxs/src/test/regress``) and the three C modules the tests load, built here
against ``postgresql-server-dev-N=V``: ``regress.so`` (src/test/regress/regress.c) and
contrib/spi's ``refint.so`` and ``autoinc.so``. `prepare_suite` does each step only if its result
is missing, so a second run costs nothing; the result is cached under
``$PGGUARD_REGRESS_CACHE`` (default ``~/.cache/pgguard-regress``), outside the repository, so
pytest never collects the suite's files. Without a source package in the apt lists it adds a
``deb-src`` twin of each ``deb`` entry of the archives serving the package
(``/etc/apt/sources.list.d/pgguard-regress-src.sources``) and runs ``apt-get update``. Installing and adding sources need root (CI runs as root); when a
step cannot be done, `SetupError` says which and how to do it by hand.

Each mode gets a fresh throwaway cluster (`PostgresCluster`, settings as pg_regress gives its
own temporary instance: ``max_prepared_transactions = 2``) and a fresh copy of the suite's
inputs in a directory the server's OS user can read (the tests' server-side COPY reads
``data/`` and writes ``results/``), then runs::

    pg_regress --schedule=parallel_schedule --host 127.0.0.1 --port P --user postgres
               --dlpath=<the modules> --max-concurrent-tests=20 [--max-connections=N]

pg_regress against an existing server drops and creates database ``regression`` itself and
starts every psql with PGDATESTYLE, PGTZ and PGAPPNAME, which libpq sends in the
StartupMessage. The modes:

- ``direct``: the server's own port; the reference.
- ``plain``: pgguard with no limit.
- ``queue``: ``[limits] max_connections = 8`` (below the suite's 20 concurrent tests),
  policy queue, queue timeout 600 s. The superuser is limited like anyone (``exempt_roles`` is
  empty by default); the run checks that clients really queued (``pgguard_queued_total``).
- ``reuse``: ``[pool] reuse = true``, ``trusted_roles = ["postgres"]`` (the suite connects as
  the superuser only: every ``\\c`` in it is ``\\c -``), ``[backend] monitor_dsn`` the
  superuser's; the run checks that sessions were reused
  (``pgguard_pool_sessions_reused_total``).

pgguard runs as its own process (``python -m pgguard run``, as deployed, log level info), its
configuration, log and /metrics read after the run kept with the diffs; pgguard dying during
a run, a non-zero exit on SIGTERM, or a traceback in its log fails the verdict.

Verdict: each mode's set of passing tests is compared with direct's. Exit 1 when plain or
queue lose a test that passes direct, or reuse loses one beyond `REUSE_DIFFERENCES`; a listed
test that passes through reuse is reported so the list can shrink. Exit 2 when the suite could
not be prepared or a run could not start. The diffs of every mode are kept in ``--out``
(default ``<cache>/<version>/last-run``), and the first lines of each lost test's diff are
printed.

About 40-120 s a mode on 2 shared cores, 3-6 minutes for all four.

Size: over 500 lines, one job: obtaining the suite that matches the server and judging
pgguard's modes against direct by it; the fetch/build steps and the runs share the cache
layout and the paths, and split apart they would each be half a harness.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

__all__ = [
    "MODES",
    "REUSE_DIFFERENCES",
    "Outcome",
    "SetupError",
    "Suite",
    "compare",
    "main_regress",
    "parse_results",
    "prepare_suite",
    "verdict",
]

MODES: Final = ("direct", "plain", "queue", "reuse")
CACHE_ENV: Final = "PGGUARD_REGRESS_CACHE"
SCHEDULE: Final = "parallel_schedule"
# As the suite's own "make installcheck-parallel" (src/test/regress/GNUmakefile).
MAX_CONCURRENT_TESTS: Final = 20
# The queue mode's total limit: below the suite's parallelism, so clients really wait.
QUEUE_LIMIT: Final = 8
QUEUE_TIMEOUT_S: Final = 600.0
# Bound on one pg_regress run (about 30-90 s on 2 busy cores).
RUN_TIMEOUT_S: Final = 1500.0
# Bound on pgguard's start (it logs event=start within a second).
START_TIMEOUT_S: Final = 60.0
REPO: Final = Path(__file__).resolve().parents[1]
# The settings pg_regress gives its own --temp-instance that change results.
CLUSTER_SETTINGS: Final[Mapping[str, int]] = {"max_prepared_transactions": 2}
SUPERUSER: Final = "postgres"
SOURCES_FILE: Final = Path("/etc/apt/sources.list.d/pgguard-regress-src.sources")
# The C modules the suite loads: (source path in the tree, library name, extra cflags).
MODULES: Final = (
    ("src/test/regress/regress.c", "regress", ()),
    ("contrib/spi/refint.c", "refint", ("-DREFINT_VERBOSE",)),  # as contrib/spi/Makefile
    ("contrib/spi/autoinc.c", "autoinc", ()),
)
# Lines of a lost test's diff printed under the verdict.
DIFF_LINES: Final = 8

# Tests that fail through reuse and pass direct, each with its cause. The verdict accepts
# exactly these; delete an entry once it passes (the run prints "now passes").
REUSE_DIFFERENCES: Final[Mapping[str, str]] = {
    # Inherent in reusing a session: what only a new server process has. (RESET DateStyle /
    # TimeZone going back to the server's defaults failed date, horology, timestamp,
    # timestamptz and part of guc too, until reused sessions logged in with the client's
    # startup settings: issue 22 point 2.)
    "temp": "inherent: the test reconnects (\\c -) to get a session without a temporary "
    "schema; a reused session still has its pg_temp_N (DISCARD ALL drops the tables, not "
    "the namespace), so PREPARE TRANSACTION after current_schema() succeeds where the test "
    "expects 'cannot PREPARE a transaction that has operated on temporary objects'",
    "stats": "inherent: a reused session is no new session, so pg_stat_database.sessions "
    "has not grown after the test's reconnect",
    "guc": "inherent: plpgsql is already loaded in the reused session, so SET "
    "plpgsql.extra_foo_warnings is an error at once instead of the warning LOAD gives",
}

# pg_regress's report, up to PostgreSQL 15: "test name ... ok 12 ms" (or "     name" in a
# parallel group, "... FAILED", "... failed (ignored)"); from 16 on, TAP: "ok 1 - name 12 ms",
# "not ok 2 + name 30 ms".
_RESULT_LINE: Final = re.compile(
    r"^(?:test\s+|\s+)(?P<name>[A-Za-z0-9_.-]+)\s+\.\.\.\s+(?P<status>ok|FAILED|failed \(ignored\))"
)
_TAP_LINE: Final = re.compile(r"^(?P<not>not )?ok \d+\s+[-+]\s+(?P<name>[A-Za-z0-9_.-]+)\s")


class SetupError(RuntimeError):
    """The suite could not be obtained or built; the message says what to do instead."""


@dataclasses.dataclass(frozen=True, slots=True)
class Suite:
    """A prepared suite: the tree's src/test/regress, pg_regress, psql's bindir, the modules."""

    version: str  # the Debian package version, e.g. 15.18-0+deb12u1
    regress_dir: Path
    pg_regress: Path
    bindir: Path
    libdir: Path  # holds regress.so, refint.so, autoinc.so


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """One mode's run: test name -> passed, in schedule order; and what the mode observed."""

    mode: str
    results: Mapping[str, bool]
    seconds: float
    note: str = ""
    problems: tuple[str, ...] = ()  # each fails the verdict

    @property
    def passed(self) -> int:
        return sum(self.results.values())


# -- parsing and comparing (pure) ----------------------------------------------------------


def parse_results(text: str) -> dict[str, bool]:
    """pg_regress's report -> {test: passed}. "failed (ignored)" counts as failed."""
    out: dict[str, bool] = {}
    for line in text.splitlines():
        if match := _RESULT_LINE.match(line):
            out[match["name"]] = match["status"] == "ok"
        elif match := _TAP_LINE.match(line):
            out[match["name"]] = match["not"] is None
    return out


def compare(reference: Mapping[str, bool], other: Mapping[str, bool]) -> tuple[list[str], list[str]]:
    """(lost, gained): tests passing in ``reference`` but not in ``other`` (missing counts as
    failing), and the reverse; in the reference's order."""
    lost = [t for t, ok in reference.items() if ok and not other.get(t, False)]
    gained = [t for t, ok in other.items() if ok and not reference.get(t, False)]
    return lost, gained


def verdict(
    outcomes: Sequence[Outcome], allowed: Mapping[str, str] = REUSE_DIFFERENCES
) -> tuple[bool, list[str]]:
    """(ok, lines to print). ``outcomes[0]`` is direct; the others are judged against it."""
    direct = outcomes[0]
    total = len(direct.results)
    lines = [f"direct {direct.passed}/{total} ({direct.seconds:.0f} s)"]
    ok = True
    for out in outcomes[1:]:
        if out.problems:
            ok = False
            lines.extend(f"{out.mode}: PROBLEM: {p}" for p in out.problems)
        lost, gained = compare(direct.results, out.results)
        head = f"{out.mode} {out.passed}/{len(out.results) or total} ({out.seconds:.0f} s)"
        if out.note:
            head += f", {out.note}"
        if not lost and not gained:
            lines.append(f"{head}: same set as direct")
            continue
        if out.mode == "reuse":
            unexpected = [t for t in lost if t not in allowed]
            expected = [t for t in lost if t in allowed]
        else:
            unexpected, expected = lost, []
        if unexpected:
            ok = False
            lines.append(f"{head}: +{len(unexpected)} failing that pass direct: {' '.join(unexpected)}")
        if expected:
            lines.append(f"{head}: +{len(expected)} failing, listed differences of reuse:")
            lines.extend(f"    {t}: {allowed[t]}" for t in expected)
        if gained:
            lines.append(f"{head}: {len(gained)} passing that fail direct: {' '.join(gained)}")
        if not unexpected and not expected:
            lines.append(f"{head}: no test lost")
    reuse = next((o for o in outcomes if o.mode == "reuse"), None)
    if reuse is not None:
        cleared = [t for t in allowed if t in direct.results and direct.results[t] and reuse.results.get(t)]
        if cleared:
            lines.append("now passes through reuse (delete from REUSE_DIFFERENCES): " + " ".join(cleared))
    return ok, lines


def diff_excerpt(diffs: str, test: str, lines: int = DIFF_LINES) -> list[str]:
    """The first changed lines of ``test``'s section of a regression.diffs file."""
    section: list[str] = []
    inside = False
    for line in diffs.splitlines():
        if line.startswith("diff ") and line.rstrip().endswith((f"/{test}.out", f"/{test}.out'")):
            inside, section = True, []
            continue
        if inside and line.startswith("diff "):
            break
        if inside and line[:1] in "+-" and not line.startswith(("+++", "---")):
            section.append(line)
            if len(section) >= lines:
                break
    return section


# -- obtaining and building the suite ------------------------------------------------------


def default_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pgguard-regress")


def _run(argv: Sequence[str], what: str, cwd: Path | None = None, *, step: bool = False) -> str:
    """Run a setup command; ``step``: one that changes the machine or the cache, printed."""
    if step:
        print(f"regress: {' '.join(argv)}", flush=True)
    try:
        proc = subprocess.run(
            list(argv), cwd=cwd, capture_output=True, text=True, timeout=900,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"{what}: {exc}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise SetupError(f"{what} failed ({' '.join(argv)}):\n{tail}")
    return proc.stdout


def _need_root(what: str, by_hand: str) -> None:
    if os.geteuid() != 0:
        raise SetupError(f"{what} needs root; run this as root once, or by hand: {by_hand}")


def _package_version(package: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except OSError as exc:
        raise SetupError(f"cannot ask dpkg for {package} ({exc}): the harness needs Debian's "
                         "packages of the system PostgreSQL") from None
    if out.returncode != 0 or not out.stdout.strip():
        raise SetupError(f"package {package} is not installed: the harness runs the suite of "
                         "the system PostgreSQL installed from Debian's packages")
    return out.stdout.strip()


def deb_src_entries(text: str, uris: Collection[str] | None = None) -> str:
    """A deb822 ``.sources`` text -> the same stanzas with ``Types: deb-src`` (those that had
    ``deb``), for `ensure_deb_src`. One-line ``sources.list`` lines: ``deb `` -> ``deb-src ``.
    With ``uris``, only the entries of those archives (the ones serving the package: a
    third-party repository without sources would fail apt-get update)."""

    def wanted(entry_uris: Sequence[str]) -> bool:
        return uris is None or any(u.rstrip("/") in uris for u in entry_uris)

    out: list[str] = []
    for stanza in re.split(r"\n\s*\n", text.strip()):
        fields = [ln for ln in stanza.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        types = next((ln for ln in fields if ln.lower().startswith("types:")), None)
        if types is not None:
            listed = next((ln.split(":", 1)[1].split() for ln in fields if ln.lower().startswith("uris:")), [])
            if "deb" in types.split(":", 1)[1].split() and wanted(listed):
                out.append("\n".join("Types: deb-src" if ln is types else ln for ln in fields))
            continue
        for ln in fields:
            if ln.startswith("deb "):
                rest = ln.split(None, 1)[1]
                uri = re.sub(r"^\[[^]]*\]\s*", "", rest).split()[0]
                if wanted([uri]):
                    out.append("deb-src " + rest)
    return "\n\n".join(out) + "\n" if out else ""


def package_uris(policy: str) -> set[str]:
    """The archive URIs in ``apt-cache policy`` output (lines "500 http://... suite/comp ...")."""
    return {m[1].rstrip("/") for m in re.finditer(r"^\s+\d+\s+(\w+://\S+)\s", policy, re.M)}


def ensure_deb_src(package: str) -> None:
    """Make ``apt-get source package`` possible: add deb-src entries and update, if needed."""
    if _has_source(package):
        return
    _need_root("adding deb-src entries", "add a deb-src line for your deb lines, apt-get update")
    uris = package_uris(_run(["apt-cache", "policy", package], "apt-cache policy"))
    stanzas: list[str] = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        if path != SOURCES_FILE:
            stanzas.append(deb_src_entries(path.read_text(encoding="utf-8"), uris))
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if path.exists() and path != SOURCES_FILE.with_suffix(".list"):
            stanzas.append(deb_src_entries(path.read_text(encoding="utf-8"), uris))
    deb822 = [s for s in stanzas if s.startswith("Types:")]
    lines = [s for s in stanzas if s.startswith("deb-src ")]
    if not deb822 and not lines:
        raise SetupError(f"no deb entries of the archives serving {package} ({', '.join(sorted(uris))}) "
                         "found in /etc/apt to derive deb-src entries from")
    print(f"regress: adding deb-src entries: {SOURCES_FILE}", flush=True)
    if deb822:
        SOURCES_FILE.write_text("\n".join(deb822), encoding="utf-8")
    if lines:
        SOURCES_FILE.with_suffix(".list").write_text("".join(lines), encoding="utf-8")
    _run(["apt-get", "update", "-qq"], "apt-get update", step=True)
    if not _has_source(package):
        raise SetupError(f"no source package {package} even after adding {SOURCES_FILE}")


def _has_source(package: str) -> bool:
    """True when apt knows a source package ``package`` (without deb-src entries apt-cache
    showsrc exits 100: "You must put some 'deb-src' URIs in your sources.list")."""
    try:
        done = subprocess.run(["apt-cache", "showsrc", package], capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise SetupError(f"cannot run apt-cache ({exc}): the harness needs Debian's apt") from None
    return done.returncode == 0 and bool(done.stdout.strip())


def prepare_suite(bindir: Path, cache: Path | None = None, *, fetch: bool = True) -> Suite:
    """The suite for the server in ``bindir`` (a Debian ``/usr/lib/postgresql/N/bin``),
    fetched and built into ``cache`` as needed (``fetch=False``: only if already there).
    Raises `SetupError`."""
    cache = cache or default_cache()
    pg_config = bindir / "pg_config"
    if not pg_config.exists():
        raise SetupError(f"no pg_config in {bindir}: the harness needs a Debian system "
                         "PostgreSQL (/usr/lib/postgresql/N/bin)")
    major = _run([str(pg_config), "--version"], "pg_config --version").split()[1].split(".")[0]
    package = f"postgresql-{major}"
    version = _package_version(package)
    pgxs = Path(_run([str(pg_config), "--pgxs"], "pg_config --pgxs").strip())
    pg_regress = pgxs.parent.parent / "test" / "regress" / "pg_regress"
    if not pg_regress.exists():
        raise SetupError(f"no pg_regress at {pg_regress} (package postgresql-client-{major})")
    root = cache / version
    tree = root / "src" / f"postgresql-{major}-{version.split('-')[0]}"
    libdir = root / "lib"
    built = all((libdir / f"{name}.so").exists() for _, name, _ in MODULES)
    if not fetch and not (built and (tree / "src" / "test" / "regress" / SCHEDULE).exists()):
        raise SetupError(f"the suite of {package} {version} is not prepared in {root} "
                         "(python -m benchmarks regress --prepare-only, as root)")
    if not (tree / "src" / "test" / "regress" / SCHEDULE).exists():
        ensure_deb_src(package)
        download = Path(tempfile.mkdtemp(prefix="fetch-", dir=_mkdir(root)))
        try:
            _run(["apt-get", "source", "-qq", f"{package}={version}"],
                 f"apt-get source {package}={version}", cwd=download, step=True)  # fmt: skip
            unpacked = [p for p in download.iterdir() if p.is_dir()]
            if len(unpacked) != 1:
                raise SetupError(f"apt-get source left {len(unpacked)} directories in {download}")
            shutil.rmtree(tree, ignore_errors=True)
            _mkdir(tree.parent)
            unpacked[0].rename(tree)
        finally:
            shutil.rmtree(download, ignore_errors=True)
    if not built:
        includedir = Path(_run([str(pg_config), "--includedir-server"], "pg_config").strip())
        dev = f"postgresql-server-dev-{major}"
        if not (includedir / "postgres.h").exists():
            _need_root(f"installing {dev}={version}", f"apt-get install {dev}={version}")
            _run(["apt-get", "install", "-y", "-qq", "--no-upgrade", f"{dev}={version}"],
                 f"apt-get install {dev}={version}", step=True)  # fmt: skip
        elif (have := _package_version(dev)) != version:
            print(f"regress: note: building against {dev} {have}, the server is {version}",
                  file=sys.stderr)  # fmt: skip
        _build_modules(tree, includedir, _mkdir(libdir))
    return Suite(version, tree / "src" / "test" / "regress", pg_regress, bindir, libdir)


def _build_modules(tree: Path, includedir: Path, libdir: Path) -> None:
    cc = os.environ.get("CC", "gcc")
    for source, name, extra in MODULES:
        target = libdir / f"{name}.so"
        partial = target.with_suffix(".so.tmp")
        _run([cc, "-O2", "-fPIC", "-shared", "-fwrapv", "-fno-strict-aliasing", *extra,
              "-I", str(includedir), "-o", str(partial), str(tree / source)],
             f"building {name}.so", step=True)  # fmt: skip
        partial.rename(target)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- running -------------------------------------------------------------------------------


def stage(suite: Suite, workdir: Path) -> Path:
    """A copy of the suite's inputs and modules the server's OS user can read; returns it."""
    inputs = _mkdir(workdir / "input")
    for name in ("sql", "expected", "data"):
        shutil.copytree(suite.regress_dir / name, inputs / name, dirs_exist_ok=True)
    for name in (SCHEDULE, "resultmap"):
        shutil.copy2(suite.regress_dir / name, inputs / name)
    shutil.copytree(suite.libdir, inputs / "lib", dirs_exist_ok=True)
    for path in [workdir, *workdir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return inputs


def run_pg_regress(
    suite: Suite, inputs: Path, outdir: Path, port: int, max_connections: int,
    tests: Sequence[str] = (),
) -> str:
    """One run of the schedule (or of ``tests``, one after another) against 127.0.0.1:port;
    returns its report (stdout)."""
    argv = [
        str(suite.pg_regress), f"--bindir={suite.bindir}", f"--inputdir={inputs}",
        f"--outputdir={outdir}", f"--dlpath={inputs / 'lib'}", "--host=127.0.0.1", f"--port={port}", f"--user={SUPERUSER}",
        f"--max-concurrent-tests={MAX_CONCURRENT_TESTS}",
    ]  # fmt: skip
    if max_connections > 0:
        argv.append(f"--max-connections={max_connections}")
    argv.extend(tests or [f"--schedule={inputs / SCHEDULE}"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    try:
        proc = subprocess.run(argv, cwd=outdir, env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise SetupError(f"pg_regress did not finish within {RUN_TIMEOUT_S:.0f} s") from None
    (outdir / "pg_regress.out").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode not in (0, 1) or not parse_results(proc.stdout):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
        raise SetupError(f"pg_regress could not run the suite (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def pgguard_config(mode: str, port: int, monitor_dsn: str) -> str:
    """The TOML of the pgguard in front of the cluster at 127.0.0.1:port for ``mode``."""
    text = f"""\
[server]
listen = "127.0.0.1:0"
shutdown_timeout = 2.0

[backend]
host = "127.0.0.1"
port = {port}
connect_timeout = 30.0
{f'monitor_dsn = "{monitor_dsn}"' if mode == "reuse" else ""}

[metrics]
listen = "127.0.0.1:0"
"""
    if mode == "queue":
        text += f"""
[limits]
max_connections = {QUEUE_LIMIT}
policy = "queue"
queue_timeout = {QUEUE_TIMEOUT_S}
"""
    elif mode == "reuse":
        text += f"""
[pool]
reuse = true
trusted_roles = ["{SUPERUSER}"]
"""
    return text


def metric_sum(text: str, name: str) -> float:
    """The sum of every sample of ``name`` in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(None, 1)[1])
    return total


@dataclasses.dataclass(slots=True)
class _Observed:
    """What a mode saw besides pg_regress's report: notes for the counts line, and problems
    that fail the verdict (pgguard died, tracebacks in its log, the mode not exercised)."""

    notes: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def _target(mode: str, logdir: Path, serial: bool) -> Iterator[tuple[int, _Observed]]:
    """A fresh cluster and, except for direct, a pgguard process in front of it (``python -m
    pgguard run``, as deployed, its log in ``logdir``): (port, what it observed, filled in at
    exit)."""
    from pgguard.testing.cluster import PostgresCluster

    seen = _Observed()
    with PostgresCluster(settings=CLUSTER_SETTINGS) as cluster:
        if mode == "direct":
            yield cluster.port, seen
            return
        if mode == "reuse":
            cluster.create_auth_lookup()
        conf = logdir / "pgguard.toml"
        conf.write_text(pgguard_config(mode, cluster.port, cluster.dsn()), encoding="utf-8")
        log = logdir / "pgguard.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG") or k.startswith("PGGUARD_")}
        env["PYTHONFAULTHANDLER"] = "1"  # a crash leaves the Python stacks in the log
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pgguard", "run", "-c", str(conf), "--log-level", "info"],
                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
            )  # fmt: skip
        try:
            port = int(_wait_for_log(proc, log, r"event=start listen=127\.0\.0\.1:(\d+)"))
            metrics_port = int(_wait_for_log(proc, log, r"event=metrics listen=127\.0\.0\.1:(\d+)"))
            yield port, seen
            if proc.poll() is not None:
                seen.problems.append(f"pgguard exited during the run ({_exit_text(proc.returncode)})")
            else:
                _observe(mode, _scrape(metrics_port), seen, serial)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    if (code := proc.wait(timeout=30)) != 0:
                        seen.problems.append(f"pgguard's shutdown on SIGTERM ended in {_exit_text(code)}")
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
                    seen.problems.append("pgguard did not stop within 30 s of SIGTERM")
            tracebacks = _read(log).count("Traceback (most recent call last)")
            if tracebacks:
                seen.problems.append(f"{tracebacks} traceback(s) in pgguard's log")
            if seen.problems:
                seen.problems.append("pgguard's log ends: " + " | ".join(_read(log).splitlines()[-6:]))


def _observe(mode: str, metrics: str, seen: _Observed, serial: bool) -> None:
    if mode == "queue":
        queued = metric_sum(metrics, "pgguard_queued_total")
        seen.notes.append(f"total limit {QUEUE_LIMIT}, {queued:.0f} clients queued")
        if queued == 0 and not serial:
            seen.problems.append("no client queued: the total limit was never reached")
    if mode == "reuse":
        created = metric_sum(metrics, "pgguard_pool_sessions_created_total")
        reused = metric_sum(metrics, "pgguard_pool_sessions_reused_total")
        seen.notes.append(f"{created:.0f} server sessions created, {reused:.0f} reused")
        if reused == 0:
            seen.problems.append("no server session was reused")
    rejected = metric_sum(metrics, "pgguard_rejections_total")
    if rejected:
        seen.notes.append(f"{rejected:.0f} rejections")


def _wait_for_log(proc: subprocess.Popen[bytes], log: Path, pattern: str) -> str:
    """The first group of ``pattern`` once pgguard's log has it; bounded, fails if it exits."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if match := regex.search(_read(log)):
            return match[1]
        if proc.poll() is not None:
            break
        time.sleep(0.05)  # polling a log file another process writes; bounded by the deadline
    raise SetupError(f"pgguard did not log {pattern!r} within {START_TIMEOUT_S:.0f} s "
                     f"(exit {proc.poll()}); log tail:\n{_read(log)[-2000:]}")  # fmt: skip


def _scrape(port: int) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            return str(resp.read().decode())
    except OSError as exc:
        raise SetupError(f"cannot read pgguard's /metrics: {exc}") from None


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def run_mode(
    mode: str, suite: Suite, inputs: Path, out: Path, max_connections: int,
    tests: Sequence[str] = (),
) -> Outcome:
    """One mode on a fresh cluster, its files in ``out/mode``."""
    started = time.perf_counter()
    outdir = out / mode
    if outdir.exists():
        shutil.rmtree(outdir)
    # The server writes results/ (COPY TO, lo_export) as its own OS user.
    _mkdir(outdir / "results").chmod(0o777)
    outdir.chmod(0o777)
    with _target(mode, outdir, bool(tests)) as (port, seen):
        report = run_pg_regress(suite, inputs, outdir, port, max_connections, tests)
    return Outcome(mode, parse_results(report), time.perf_counter() - started,
                   "; ".join(seen.notes), tuple(seen.problems))  # fmt: skip


def main_regress(args: argparse.Namespace) -> int:
    from pgguard.testing.cluster import ClusterError, PostgresCluster

    modes = args.modes.split(",") if args.modes else list(MODES)
    tests = args.tests.split(",") if args.tests else []
    if modes[0] != "direct" or any(m not in MODES for m in modes):
        print(f"--modes: direct first, then any of {', '.join(MODES[1:])}", file=sys.stderr)
        return 2
    try:
        probe = PostgresCluster()
        if probe.source == "embedded":
            raise SetupError("the server is the embedded PostgreSQL (no Debian source package "
                             "of its suite); run with the system PostgreSQL")
        suite = prepare_suite(probe.bindir, args.cache)
    except (SetupError, ClusterError) as exc:
        print(f"regress: cannot prepare the suite: {exc}", file=sys.stderr)
        return 2
    print(f"PostgreSQL regression suite {suite.version} ({suite.regress_dir}), "
          f"{' '.join(tests) if tests else SCHEDULE}, "
          f"max connections {args.max_connections or 'unlimited'}, load {os.getloadavg()[0]:.1f}",
          flush=True)  # fmt: skip
    out = args.out or (args.cache or default_cache()) / suite.version / "last-run"
    work = Path(tempfile.mkdtemp(prefix="pgguard-regress-"))
    outcomes: list[Outcome] = []
    try:
        work.chmod(0o755)
        inputs = stage(suite, work)
        for mode in modes:
            outcome = run_mode(mode, suite, inputs, work, args.max_connections, tests)
            outcomes.append(outcome)
            print(f"  {mode}: {outcome.passed}/{len(outcome.results)} passed in {outcome.seconds:.0f} s"
                  + (f" ({outcome.note})" if outcome.note else ""), flush=True)  # fmt: skip
            _keep(work / mode, out / mode)
    except (SetupError, ClusterError) as exc:
        print(f"regress: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok, lines = verdict(outcomes)
    print("\n".join(lines))
    direct = outcomes[0]
    failing = [t for t, passed in direct.results.items() if not passed]
    if failing:
        print(f"failing direct too (the environment): {' '.join(failing)}")
    for o in outcomes[1:]:
        lost, _ = compare(direct.results, o.results)
        diffs = _read(out / o.mode / "regression.diffs")
        for test in lost:
            print(f"--- {o.mode} {test}:")
            print("\n".join("    " + ln for ln in diff_excerpt(diffs, test)))
    print(f"diffs and reports in {out}")
    return 0 if ok else 1


def _keep(source: Path, target: Path) -> None:
    """Copy a run's reports to ``target``, replacing (or removing) an earlier run's."""
    _mkdir(target)
    for name in ("regression.diffs", "regression.out", "pg_regress.out", "pgguard.toml", "pgguard.log"):
        if (source / name).exists():
            shutil.copy2(source / name, target / name)
        else:
            (target / name).unlink(missing_ok=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("regress", help="PostgreSQL's own regression suite, direct and through pgguard")
    p.add_argument("--modes", help=f"comma-separated, direct first (default {','.join(MODES)})")
    p.add_argument("--tests", help="comma-separated tests to run one after another instead of "
                   f"{SCHEDULE} (most need test_setup first)")  # fmt: skip
    p.add_argument("--max-connections", type=int, default=0,
                   help="pg_regress --max-connections (default 0: as many as the schedule runs, 20)")
    p.add_argument("--cache", type=Path, help=f"where the suite is kept (default ${CACHE_ENV} or "
                   "~/.cache/pgguard-regress)")  # fmt: skip
    p.add_argument("--out", type=Path, help="where each mode's diffs are kept, emptied first "
                   "(default <cache>/<version>/last-run)")  # fmt: skip
    p.add_argument("--prepare-only", action="store_true", help="fetch and build the suite, run nothing")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    if args.prepare_only:
        from pgguard.testing.cluster import PostgresCluster

        try:
            suite = prepare_suite(PostgresCluster().bindir, args.cache)
        except SetupError as exc:
            print(f"regress: cannot prepare the suite: {exc}", file=sys.stderr)
            return 2
        print(f"suite {suite.version}: {suite.regress_dir}, modules in {suite.libdir}")
        return 0
    return main_regress(args)
