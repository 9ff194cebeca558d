"""config.py: TOML to frozen dataclasses; every error names the file and the dotted key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from pgguard import config
from pgguard.errors import ConfigError
from pgguard.limits import Policy, RoleRule

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


def _write(tmp_path: Path, text: str, name: str = "pgguard.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_match_design() -> None:
    cfg = config.loads("")
    assert cfg.server.listen == ("127.0.0.1:6432",)
    assert cfg.server.client_login_timeout == 10.0
    assert (cfg.backend.host, cfg.backend.port, cfg.backend.connect_timeout) == ("127.0.0.1", 5432, 5.0)
    lim = cfg.limits
    assert (lim.max_connections, lim.role_max_connections, lim.database_max_connections) == (-1, -1, -1)
    assert (lim.policy, lim.queue_timeout, lim.max_queue, lim.exempt_roles) == ("queue", 30.0, 1000, ())
    assert cfg.errors.detail is False


def test_full_file_builds_rules(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
[server]
listen = ["127.0.0.1:7000", "[::1]:7001"]
[limits]
max_connections = 100
role_max_connections = 10
policy = "reject"
queue_timeout = 2          # an integer is accepted for a float
exempt_roles = "boss"      # a single string is a one-element list
[roles.app]
max_connections = 20
policy = "queue"
max_queue = 5
[databases.reporting]
max_connections = 0
""",
    )
    cfg = config.load(path, env={})
    assert cfg.path == str(path)
    assert cfg.server.listen == ("127.0.0.1:7000", "[::1]:7001")
    assert config.parse_address("[::1]:7001") == ("::1", 7001)
    rules = cfg.rules()
    assert rules.max_connections == 100 and rules.role_max_connections == 10
    assert rules.policy is Policy.REJECT and rules.queue_timeout == 2.0
    assert rules.exempt_roles == frozenset({"boss"})
    assert rules.roles["app"] == RoleRule(max_connections=20, policy=Policy.QUEUE, max_queue=5)
    assert rules.databases == {"reporting": 0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.limits.max_connections = 5  # type: ignore[misc]


BAD = [
    # (toml, dotted key, words of the problem)
    ("[bogus]\nx = 1", "bogus", "unknown section"),
    ("[limits]\nmax_conections = 1", "limits.max_conections", "unknown key"),
    ("[roles.app]\nmax_connection = 1", "roles.app.max_connection", "unknown key"),
    ("[databases.limdb]\npolicy = 'queue'", "databases.limdb.policy", "unknown key"),
    ("[limits]\nmax_connections = 'ten'", "limits.max_connections", "must be an integer"),
    ("[limits]\nmax_connections = 1.5", "limits.max_connections", "must be an integer"),
    ("[limits]\nmax_connections = true", "limits.max_connections", "must be an integer"),
    ("[limits]\nqueue_timeout = '5s'", "limits.queue_timeout", "must be a number"),
    ("[limits]\nexempt_roles = [1, 2]", "limits.exempt_roles", "list of strings"),
    ("[errors]\ndetail = 'yes'", "errors.detail", "true or false"),
    ("[backend]\nhost = 5", "backend.host", "must be a string"),
    ("[limits]\npolicy = 'drop'", "limits.policy", "must be one of queue, reject"),
    ("[roles.app]\npolicy = 'maybe'", "roles.app.policy", "must be one of queue, reject"),
    ("[limits]\nmax_connections = -2", "limits.max_connections", "must be -1"),
    ("[roles.app]\nmax_connections = -5", "roles.app.max_connections", "must be -1"),
    ("[databases.limdb]\nmax_connections = -3", "databases.limdb.max_connections", "must be -1"),
    ("[limits]\nqueue_timeout = 0", "limits.queue_timeout", "greater than 0"),
    ("[limits]\nmax_queue = -1", "limits.max_queue", "0 or greater"),
    ("[server]\nclient_login_timeout = -1.0", "server.client_login_timeout", "greater than 0"),
    ("[server]\nlisten = 'localhost'", "server.listen", "not host:port"),
    ("[server]\nlisten = []", "server.listen", "at least one"),
    ("[server]\nlisten = '127.0.0.1:http'", "server.listen", "not a number"),
    ("[backend]\nport = 70000", "backend.port", "TCP port"),
    ("[backend]\nsslmode = 'sometimes'", "backend.sslmode", "must be one of"),
    ("[metrics]\nlisten = 'nowhere'", "metrics.listen", "not host:port"),
    ("limits = 5", "limits", "must be a table"),
    ("roles = 5", "roles", "table of named sections"),
    ("[roles]\napp = 5", "roles.app", "must be a table"),
]


@pytest.mark.parametrize(("toml", "key", "problem"), BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_file_names_file_and_dotted_key(tmp_path: Path, toml: str, key: str, problem: str) -> None:
    path = _write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        config.load(path, env={})
    err = info.value
    assert (err.file, err.key) == (str(path), key)
    assert problem in err.problem
    assert str(err).startswith(f"{path}: {key}: ")


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[limits\nmax_connections = 1")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ": invalid TOML"):
        config.load(path, env={})


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml: file not found"):
        config.load(tmp_path / "nope.toml", env={})


def test_env_overrides_a_section_key_and_a_role_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "[limits]\nmax_connections = 10\n[roles.app]\nmax_connections = 3\n")
    env = {
        "PGGUARD_LIMITS__MAX_CONNECTIONS": "50",
        "PGGUARD_ROLES__APP__POLICY": "reject",  # a bare word: taken as a string
        "PGGUARD_DATABASES__LIMDB__MAX_CONNECTIONS": "2",
        "PGGUARD_LIMITS__EXEMPT_ROLES": '["boss", "ops"]',
        "PATH": "/bin",  # not ours
        "PGGUARD_NOT_NESTED": "1",  # no "__": ignored
    }
    cfg = config.load(path, env=env)
    assert cfg.limits.max_connections == 50
    assert set(cfg.roles) == {"app"}  # APP in the variable names the file's [roles.app]
    assert (cfg.roles["app"].max_connections, cfg.roles["app"].policy) == (3, "reject")
    assert cfg.databases["limdb"].max_connections == 2
    assert cfg.limits.exempt_roles == ("boss", "ops")


def test_env_role_without_a_file_table_is_lower_cased() -> None:
    cfg = config.loads("", "x.toml", env={"PGGUARD_ROLES__APP__MAX_CONNECTIONS": "4"})
    assert cfg.roles["app"].max_connections == 4


def test_env_override_is_read_from_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, "")
    monkeypatch.setenv("PGGUARD_LIMITS__MAX_CONNECTIONS", "7")
    assert config.load(path).limits.max_connections == 7


def test_bad_env_value_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    with pytest.raises(ConfigError) as info:
        config.load(path, env={"PGGUARD_LIMITS__MAX_CONNECTIONS": "lots"})
    assert info.value.key == "limits.max_connections"
    with pytest.raises(ConfigError) as info:
        config.load(path, env={"PGGUARD_LIMITS__NO_SUCH_KEY": "1"})
    assert info.value.key == "limits.no_such_key"


def test_example_file_loads_cleanly() -> None:
    cfg = config.load(EXAMPLE, env={})
    assert cfg.server.listen == ("127.0.0.1:6432",)
    assert cfg.rules() == config.loads("", env={}).rules()  # the example shows the defaults


def test_example_file_documents_every_key() -> None:
    """Every field of every section appears as ``key =`` (commented or not) in its section."""
    text = EXAMPLE.read_text()
    sections = {
        **config._SECTIONS,
        "roles": config.RoleConfig,
        "databases": config.DatabaseConfig,
        "addresses": config.AddressConfig,
    }
    missing = []
    for name, cls in sections.items():
        header = re.search(rf"^#? ?\[{name}(\.[^\]]+)?\]", text, re.M)
        if header is None:
            missing.append(f"[{name}]")
            continue
        nxt = re.search(r"^#? ?\[", text[header.end() :], re.M)
        body = text[header.end() : header.end() + nxt.start()] if nxt else text[header.end() :]
        for f in dataclasses.fields(cls):
            if not re.search(rf"^#? ?{f.name} =", body, re.M):
                missing.append(f"{name}.{f.name}")
    assert missing == []



# ------------------------------------------- sharing, reservations, client addresses


def test_weight_reserved_and_address_keys_build_rules() -> None:
    cfg = config.loads(
        """
[limits]
max_connections = 10
client_address_max_connections = 4
[roles.quiet]
weight = 3
reserved = 2
[addresses."10.0.0.0/8"]
max_connections = 20
[addresses."::ffff:10.1.2.0/120"]
max_connections = 1
policy = "reject"
[addresses."fd00::/8"]
max_connections = 2
""",
        env={},
    )
    rules = cfg.rules()
    assert rules.roles["quiet"] == RoleRule(weight=3.0, reserved=2)
    assert rules.client_address_max_connections == 4
    # Longest prefix first (ties in file order); the mapped IPv6 network reads as IPv4.
    assert [(str(n.network), n.max_connections, n.policy) for n in rules.networks] == [
        ("10.1.2.0/24", 1, Policy.REJECT),
        ("10.0.0.0/8", 20, None),
        ("fd00::/8", 2, None),
    ]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[addresses."10.1.2.3/24"]\nmax_connections = 1', 'addresses."10.1.2.3/24"', "host bits set"),
        ('[addresses."nowhere"]\n', 'addresses."nowhere"', "not a network in CIDR form"),
        ('[addresses."10.0.0.0/8"]\n[addresses."::ffff:10.0.0.0/104"]\n',
         'addresses."::ffff:10.0.0.0/104"', 'names the same network as addresses."10.0.0.0/8"'),
        ("[roles.a]\nweight = 0", "roles.a.weight", "greater than 0"),
        ("[roles.a]\nreserved = -1", "roles.a.reserved", "0 or greater"),
        ("[limits]\nmax_connections = 3\n[roles.a]\nreserved = 2\n[roles.b]\nreserved = 2",
         "roles.", "reserved slots (4) exceed limits.max_connections (3)"),
        ("[limits]\nclient_address_max_connections = -2", "limits.client_address_max_connections", "-1"),
    ],
)  # fmt: skip
def test_sharing_and_address_keys_are_validated_naming_the_key(text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.loads(text, env={})
    assert info.value.key.startswith(key) and problem in str(info.value)


def test_reservations_need_no_total() -> None:
    """Without a total nothing is reserved from, so any sum loads (and has no effect)."""
    assert config.loads("[roles.a]\nreserved = 50", env={}).rules().roles["a"].reserved == 50

def test_max_logins_in_flight_defaults_off_and_refuses_negative() -> None:
    assert config.loads("", env={}).backend.max_logins_in_flight == 0
    assert config.loads("[backend]\nmax_logins_in_flight = 8\n", env={}).backend.max_logins_in_flight == 8
    with pytest.raises(ConfigError) as info:
        config.loads("[backend]\nmax_logins_in_flight = -1\n", env={})
    assert info.value.key == "backend.max_logins_in_flight"


def test_address_limits_with_workers_need_cluster_for_now() -> None:
    """The workers' one Gate does not carry client addresses: refused, not left unenforced."""
    for body in ("[limits]\nclient_address_max_connections = 2\n", '[addresses."10.0.0.0/8"]\nmax_connections = 2\n'):
        with pytest.raises(config.ConfigError, match="not shared by"):
            config.loads("[server]\nworkers = 2\n" + body)
    assert config.loads("[server]\nworkers = 1\n[limits]\nclient_address_max_connections = 2\n")
