"""Admin console pieces that need no socket: statement splitting, names, loopback, config rows."""

from __future__ import annotations

import pytest

from pgguard import admin, config, console
from pgguard.errors import AdminCommandError, ConfigError


@pytest.mark.parametrize(
    ("text", "statements"),
    [
        ("SHOW LIMITS", ["SHOW LIMITS"]),
        ("show limits;", ["show limits"]),
        ("  ; ;", []),
        ("PAUSE; RESUME;", ["PAUSE", "RESUME"]),
        ('SET LIMIT ROLE "a;b" = 1; SHOW LIMITS', ['SET LIMIT ROLE "a;b" = 1', "SHOW LIMITS"]),
        ("-- a comment\nSHOW STATS -- trailing\n", ["SHOW STATS"]),
    ],
)
def test_split_statements(text: str, statements: list[str]) -> None:
    assert console.split_statements(text) == statements


@pytest.mark.parametrize(
    ("text", "name"), [("App", "app"), ('"App"', "App"), ('"a ""q"" b"', 'a "q" b'), ("x_1", "x_1")]
)
def test_parse_name_follows_sql_identifier_rules(text: str, name: str) -> None:
    assert console.parse_name(text) == name


def test_every_command_is_found_case_insensitively_and_unknown_ones_are_42601() -> None:
    for statement in ("show limits", "Set Limit Role app = 3", "kill client 7", "RELOAD", "begin"):
        console.find(statement)
    with pytest.raises(AdminCommandError) as info:
        console.find("SELECT 1")
    assert info.value.sqlstate == "42601" and info.value.severity == "ERROR"


class _Transport:
    def __init__(self, peer: object) -> None:
        self.peer = peer

    def get_extra_info(self, name: str) -> object:
        return self.peer if name == "peername" else None


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        (("127.0.0.1", 5000), True),
        (("127.8.9.10", 5000), True),
        (("::1", 5000, 0, 0), True),
        (("::ffff:127.0.0.1", 5000, 0, 0), True),
        (("10.0.0.5", 5000), False),
        (("192.0.2.2", 5000), False),
        (("::ffff:10.0.0.5", 5000, 0, 0), False),
        ("/run/pgguard/.s.PGSQL.6432", True),
        (None, False),
    ],
)
def test_trust_is_for_loopback_peers_only(peer: object, loopback: bool) -> None:
    assert admin._is_loopback(_Transport(peer)) is loopback  # type: ignore[arg-type]


def test_show_config_masks_passwords() -> None:
    cfg = config.loads(
        '[backend]\nmonitor_dsn = "postgres://mon:pw@db/postgres"\n'
        '[admin]\nusers = ["a"]\npassword = "plain"\n[roles.app]\nmax_connections = 3\n'
    )
    rows = dict(console.config_rows(cfg))
    assert rows["backend.monitor_dsn"] == "postgres://mon:********@db/postgres"
    assert rows["admin.password"] == "(plain text)"
    assert rows["roles.app.max_connections"] == "3" and "roles.app.policy" not in rows


def test_config_checks_admin_password_and_mirror_keys() -> None:
    with pytest.raises(ConfigError, match="admin.password"):
        config.loads('[admin]\npassword = "SCRAM-SHA-256$broken"\n')
    with pytest.raises(ConfigError, match="limits.mirror_catalog: true needs backend.monitor_dsn"):
        config.loads("[limits]\nmirror_catalog = true\n")
