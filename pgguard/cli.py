"""The ``pgguard`` command: ``run``, ``check-config`` (and the subcommands other modules add)."""

from __future__ import annotations

import argparse
import getpass
import importlib.util
import logging
import sys
from collections.abc import Sequence

from . import __version__, scram, tls
from . import config as config_mod
from .errors import ConfigError
from .log import TEXT_FORMAT, JSONFormatter

__all__ = ["main", "setup_logging"]

LOG_FORMAT = TEXT_FORMAT


def setup_logging(level: str, *, worker: int | None = None, format: str = "text") -> None:
    """Log to stderr, as ``[log] format`` says (``text`` or ``json``); a worker of
    ``[server] workers`` adds ``worker=i`` (a ``worker`` key in JSON) to every line."""
    handler = logging.StreamHandler(sys.stderr)
    if format == "json":
        handler.setFormatter(JSONFormatter(None if worker is None else {"worker": worker}))
    else:
        fmt = LOG_FORMAT if worker is None else LOG_FORMAT.replace(" %(message)s", f" worker={worker} %(message)s")
        handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _cmd_run(args: argparse.Namespace) -> int:
    from . import server, workers

    spec = None if args.worker is None else workers.WorkerSpec.loads(args.worker)
    setup_logging(args.log_level, worker=None if spec is None else spec.index)
    try:
        cfg = config_mod.load(args.config)
        tls.load(cfg)  # certificate and key files readable and matching
        _check_extras(cfg)
    except ConfigError as exc:
        print(f"pgguard: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if cfg.log.format != "text":
        setup_logging(args.log_level, worker=None if spec is None else spec.index, format=cfg.log.format)
    try:
        if spec is not None:
            return workers.run_worker(cfg, spec)
        if cfg.server.workers > 1:
            return workers.run_supervisor(cfg, args.log_level)
        return server.run(cfg)
    except OSError as exc:  # e.g. the listen address is taken
        print(f"pgguard: cannot start: {exc}", file=sys.stderr)
        return 1


def _check_extras(cfg: config_mod.Config) -> None:
    """A [cluster] section needs redis-py (the [cluster] extra): say so, not a traceback."""
    if cfg.cluster is not None and importlib.util.find_spec("redis") is None:
        raise ConfigError(cfg.path, "cluster", "needs redis-py: pip install 'pgguard[cluster]'")


def _cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.load(args.file)
        tls.load(cfg)
        _check_extras(cfg)
    except ConfigError as exc:
        print(f"pgguard: invalid configuration: {exc}", file=sys.stderr)
        return 2
    roles = ", ".join(sorted(cfg.roles)) or "none"
    workers = f"; {cfg.server.workers} workers" if cfg.server.workers > 1 else ""
    print(f"{args.file}: OK (listen {', '.join(cfg.server.listen)}{workers}; roles configured: {roles})")
    for line in reuse_summary(cfg):
        print(line)
    return 0


def reuse_summary(cfg: config_mod.Config) -> list[str]:
    """What ``[pool]`` reuse will do with this configuration, for whom (check-config)."""
    if not cfg.reuse_anywhere:
        return []
    trusted = ", ".join(cfg.pool.trusted_roles)
    lines = []
    if trusted:
        lines.append(f"reuse: trusted roles ({trusted}) are let in without a password and reused")
    if cfg.backend.monitor_dsn:
        lines.append(
            "reuse: other roles are checked by pgguard against the verifier [pool] auth_query reads "
            "at each login (SCRAM-SHA-256 or md5) and reused; a role without one (unknown, no "
            "password, NOLOGIN, expired), or whose server asks for another method, logs in to the "
            "server as without reuse"
        )
    else:
        lines.append(
            "reuse: no [backend] monitor_dsn, so pgguard cannot check passwords: every other role "
            "logs in to the server as without reuse (a session of its own, not reused)"
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgguard", description="PostgreSQL connection-limit enforcement proxy."
    )
    parser.add_argument("--version", action="version", version=f"pgguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", default=config_mod.DEFAULT_PATH, help="config file (default: %(default)s)")
    run.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default: %(default)s)",
    )
    # Internal: a worker process of [server] workers, started by its supervisor (workers.py).
    run.add_argument("--worker", help=argparse.SUPPRESS)
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", nargs="?", default=config_mod.DEFAULT_PATH)
    check.set_defaults(func=_cmd_check_config)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Subcommands that live in their own modules (demo, bench) register themselves here."""
    _add_hash_password(sub)
    try:
        from . import demo
    except ImportError:
        return
    demo.add_parser(sub)


def _add_hash_password(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pgguard hash-password``."""
    p = sub.add_parser(
        "hash-password",
        help="print a SCRAM-SHA-256 verifier for [admin] password",
        description="Print the SCRAM-SHA-256 verifier of a password, in the format PostgreSQL "
        "stores, for [admin] password. Reads the password from the terminal (twice) or from "
        "the first line of standard input.",
    )
    p.add_argument("password", nargs="?", help="the password (better: type it when asked)")
    p.add_argument(
        "--iterations",
        type=int,
        default=scram.DEFAULT_ITERATIONS,
        help="PBKDF2 iterations (default: %(default)s, as PostgreSQL)",
    )
    p.set_defaults(func=_cmd_hash_password)


def _cmd_hash_password(args: argparse.Namespace) -> int:
    password = args.password
    if password is None:
        if sys.stdin.isatty():
            password = getpass.getpass("Password: ")
            if getpass.getpass("Again: ") != password:
                print("pgguard: passwords differ", file=sys.stderr)
                return 2
        else:
            password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("pgguard: empty password", file=sys.stderr)
        return 2
    if args.iterations < 1:
        print("pgguard: --iterations must be at least 1", file=sys.stderr)
        return 2
    print(scram.make_verifier(password, iterations=args.iterations))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
