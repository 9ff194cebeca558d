"""The pure parts of server-session reuse: startup parameters to SET, and SCRAM from a ClientKey."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgguard import params, scram
from pgguard.errors import AuthenticationFailed


def test_options_switches_become_settings() -> None:
    assert params.parse_options("-c statement_timeout=5s --search_path=a,b -cwork_mem=4MB") == {
        "statement_timeout": "5s", "search_path": "a,b", "work_mem": "4MB",
    }  # fmt: skip
    assert params.parse_options(r"-c search_path=a\ b") == {"search_path": "a b"}
    assert params.parse_options("--enable-seqscan=off") == {"enable_seqscan": "off"}


@pytest.mark.parametrize("options", ["-d 5", "-c", "-c noequals", "-P", "--=x"])
def test_options_other_than_settings_are_not_poolable(options: str) -> None:
    assert params.parse_options(options) is None
    assert params.wanted({"user": "u", "options": options}) is None


def test_wanted_skips_login_keys_and_refuses_replication() -> None:
    assert params.wanted({"user": "u", "database": "d", "application_name": "x", "DateStyle": "ISO"}) == {
        "application_name": "x", "datestyle": "ISO",
    }  # fmt: skip
    assert params.wanted({"user": "u", "replication": "database"}) is None
    assert params.wanted({"user": "u", "_pq_.something": "1"}) is None


def test_set_query_applies_only_what_differs() -> None:
    reported = {"application_name": "", "DateStyle": "ISO, MDY", "TimeZone": "UTC"}
    assert params.set_query({"datestyle": "ISO, MDY"}, reported) is None
    sql = params.set_query({"application_name": "it's", "timezone": "UTC", "work_mem": "8MB"}, reported)
    assert sql == (
        "SELECT pg_catalog.set_config('application_name', 'it''s', false), "
        "pg_catalog.set_config('work_mem', '8MB', false)"
    )


def test_quote_literal_escapes_backslashes_either_way() -> None:
    assert params.quote_literal("a\\b'c") == "E'a\\\\b''c'"
    assert params.quote_literal("plain") == "'plain'"


def _client_exchange(server: scram.ScramServer, password: str, verifier: scram.Verifier) -> bytes:
    """A password client's exchange against ``server``; returns the server-final message."""
    first = server.first(b"n,,n=,r=clientnonce")
    attrs = dict(a.split("=", 1) for a in first.decode().split(","))
    without_proof = f"c=biws,r={attrs['r']}"
    auth = f"n=,r=clientnonce,{first.decode()},{without_proof}".encode()
    proof = scram.client_proof(password, verifier.salt, verifier.iterations, auth)
    return server.final(f"{without_proof},p={base64.b64encode(proof).decode()}".encode())


@given(st.text(min_size=1, max_size=20))
def test_a_verified_proof_logs_in_again_without_the_password(password: str) -> None:
    verifier = scram.make_verifier(password, iterations=16)
    first = scram.ScramServer("u", verifier)
    _client_exchange(first, password, verifier)
    assert first.client_key is not None
    client = scram.ScramClient(first.client_key, verifier.server_key)
    server = scram.ScramServer("u", verifier)
    final = server.final(client.final(server.first(client.first())))
    assert client.verify(final)
    assert not client.verify(b"v=" + base64.b64encode(b"x" * 32))


def test_a_wrong_password_yields_no_client_key() -> None:
    verifier = scram.make_verifier("right", iterations=16)
    server = scram.ScramServer("u", verifier)
    with pytest.raises(AuthenticationFailed):
        _client_exchange(server, "wrong", verifier)
    assert server.client_key is None


def test_set_query_resets_what_the_previous_client_had_and_this_one_has_not() -> None:
    applied = {"application_name": "pgbench", "work_mem": "8MB"}
    reported = {"application_name": "pgbench"}
    assert params.set_query({"application_name": "pgbench", "work_mem": "8MB"}, reported, applied) is None
    assert params.set_query({"application_name": "pgbench"}, reported, applied) == 'RESET "work_mem"'
    assert params.set_query({}, reported, {"my.set\"ting": "1"}) == 'RESET "my.set""ting"'


def test_md5_answer_is_what_libpq_sends() -> None:
    import hashlib

    stored = "md5" + hashlib.md5(b"secretalice").hexdigest()
    assert scram.is_md5_verifier(stored)
    assert not scram.is_md5_verifier("SCRAM-SHA-256$4096:abc")
    inner = hashlib.md5(b"secretalice").hexdigest().encode()
    assert scram.md5_response(stored, b"salt") == "md5" + hashlib.md5(inner + b"salt").hexdigest()


def test_gate_hand_over_passes_a_slot_to_the_oldest_waiter_of_the_pair_without_counting() -> None:
    from pgguard.limits import Gate, Kind, RoleRule, Rules

    gate = Gate(Rules(roles={"app": RoleRule(max_connections=1)}))
    held = gate.arrive("app", "db", 0.0)
    first = gate.arrive("app", "db", 1.0, "first")
    second = gate.arrive("app", "db", 2.0, "second")
    other = gate.arrive("app", "otherdb", 3.0, "other")
    assert held.kind is Kind.ADMIT and first.kind is second.kind is other.kind is Kind.QUEUE
    assert gate.hand_over("app", "db", lambda w: w.context == "nobody") is None
    waiter = gate.hand_over("app", "db", lambda w: True)
    assert waiter is first.waiter and waiter is not None and not waiter.waiting
    assert gate.role_active["app"] == 1 and gate.total_waiting == 2  # no slot taken, one waiter fewer
    assert [w.context for w in gate.queue_heads()] == ["second", "other"]
    gate.pause()
    assert gate.hand_over("app", "db", lambda w: True) is None


def test_gate_exceeded_only_after_a_limit_is_lowered_under_the_count() -> None:
    from pgguard.limits import Gate, RoleRule, Rules

    gate = Gate(Rules(roles={"app": RoleRule(max_connections=2)}))
    gate.arrive("app", "db", 0.0)
    gate.arrive("app", "db", 0.0)
    assert not gate.exceeded("app", "db")  # full is not over
    gate.set_role_limit("app", 1)
    assert gate.exceeded("app", "db")
    assert not gate.exceeded("other", "db")


def test_a_server_session_starts_with_the_clients_settings_but_application_name() -> None:
    startup = {"user": "u", "database": "d", "options": "-c TimeZone=UTC", "DateStyle": "SQL", "Application_Name": "a"}
    assert params.startup_settings(startup) == {"options": "-c TimeZone=UTC", "DateStyle": "SQL"}
    assert params.later(startup) == {"application_name": "a"}
    assert params.later({"user": "u"}) == {}


def test_clients_with_other_startup_settings_never_share_a_warm_session() -> None:
    from pgguard import pool, wire

    def key(**extra: str) -> pool.PoolKey:
        return pool.pool_key(wire.StartupMessage(wire.PROTOCOL_3_0, {"user": "u", "database": "d", **extra}, b""))

    assert key(application_name="a") == key(application_name="b") == key()
    assert key(TimeZone="UTC") != key()
    assert key(options="-c TimeZone=UTC") != key(TimeZone="UTC")
