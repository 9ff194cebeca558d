"""packaging/pgguard.service: a systemd unit that uses what pgguard implements (Type=notify, SIGHUP
reload, drain on SIGTERM) and that ``systemd-analyze verify`` accepts without a warning."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "pgguard.service"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_is_type_notify_with_reload_drain_and_hardening() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["ExecStart"].split()[1:3] == ["run", "-c"]
    assert int(service["LimitNOFILE"]) >= 4096
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes"}.items():
        assert service[key] == value, key
    # the drain (default [server] shutdown_timeout 30 s) must fit before systemd's SIGKILL
    assert int(service["TimeoutStopSec"]) > 30


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (Debian package systemd)")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify checks that the executables exist: point them at this interpreter's pgguard
    pgguard = Path(sys.executable).with_name("pgguard")
    exe = str(pgguard) if pgguard.exists() else shutil.which("pgguard") or "/bin/true"
    unit = tmp_path / "pgguard.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/pgguard", exe))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr
