"""The ``pgguard`` command: check-config and run refuse a bad file, naming the file and the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pgguard import cli

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"
BAD_TOML = "[limits]\nmax_connections = 'lots'\n"


def _pgguard(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGGUARD_")}
    return subprocess.run(
        [sys.executable, "-m", "pgguard", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_check_config_accepts_the_example() -> None:
    done = _pgguard("check-config", str(EXAMPLE))
    assert done.returncode == 0, done.stderr
    assert f"{EXAMPLE}: OK" in done.stdout


def test_check_config_rejects_a_bad_file_naming_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_TOML)
    done = _pgguard("check-config", str(bad))
    assert done.returncode != 0
    assert f"{bad}: limits.max_connections: must be an integer" in done.stderr
    assert done.stdout == ""


def test_check_config_missing_file(tmp_path: Path) -> None:
    done = _pgguard("check-config", str(tmp_path / "absent.toml"))
    assert done.returncode != 0
    assert "absent.toml: file not found" in done.stderr


def test_run_refuses_a_bad_file_the_same_way(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_TOML + "[server]\nlisten = '127.0.0.1:0'\n")
    done = _pgguard("run", "-c", str(bad), timeout=30.0)
    assert done.returncode != 0
    assert f"{bad}: limits.max_connections: must be an integer" in done.stderr
    assert "event=start" not in done.stderr  # it never listened


def test_run_refuses_a_bad_environment_override(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[server]\nlisten = '127.0.0.1:0'\n")
    env = {**os.environ, "PGGUARD_LIMITS__POLICY": "drop"}
    done = subprocess.run(
        [sys.executable, "-m", "pgguard", "run", "-c", str(good)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode != 0
    assert "limits.policy: must be one of queue, reject" in done.stderr


def test_main_in_process_returns_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[nope]\n")
    assert cli.main(["check-config", str(bad)]) != 0
    assert f"{bad}: nope: unknown section" in capsys.readouterr().err
    assert cli.main(["check-config", str(EXAMPLE)]) == 0


def test_version_flag() -> None:
    done = _pgguard("--version")
    assert done.returncode == 0 and done.stdout.startswith("pgguard ")


def test_cluster_without_redis_py_is_a_clear_config_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """[cluster] needs the [cluster] extra; without redis-py: exit 2 and the pip command."""
    path = tmp_path / "pgguard.toml"
    path.write_text('[cluster]\nredis = "redis://127.0.0.1:1/0"\n')
    code = (
        "import sys; sys.modules['redis'] = None\n"  # as if redis-py were not installed
        "from pgguard.cli import main\n"
        f"sys.exit(main(['check-config', {str(path)!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "pip install 'pgguard[cluster]'" in done.stderr and "Traceback" not in done.stderr


def test_check_config_says_what_reuse_does_for_roles_it_cannot_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "reuse.toml"
    path.write_text('[pool]\nreuse = true\ntrusted_roles = ["bench"]\n')
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "reuse: trusted roles (bench) are let in without a password and reused" in out
    assert "no [backend] monitor_dsn" in out and "every other role logs in to the server as without reuse" in out
    path.write_text('[backend]\nmonitor_dsn = "postgresql://m@127.0.0.1/postgres"\n[pool]\nreuse = true\n')
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "a role without one (unknown, no password, NOLOGIN, expired)" in out
    assert "logs in to the server as without reuse" in out
