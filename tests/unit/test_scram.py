"""SCRAM-SHA-256 server side, sans IO: a client computed by hand against ScramServer."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgguard import scram
from pgguard.errors import AuthenticationFailed, ProtocolViolation


def _login(server: scram.ScramServer, password: str, *, nonce: str = "rOprNGfwEbeRWgbNEkqO") -> bytes:
    """Play the client side (RFC 5802 section 3) and return the server-final-message."""
    client_first_bare = f"n=,r={nonce}"
    server_first = server.first(("n,," + client_first_bare).encode()).decode()
    attrs = dict(part.split("=", 1) for part in server_first.split(","))
    assert attrs["r"].startswith(nonce) and len(attrs["r"]) > len(nonce)
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    proof = scram.client_proof(password, base64.b64decode(attrs["s"]), int(attrs["i"]), auth_message)
    return server.final(f"{without_proof},p={base64.b64encode(proof).decode()}".encode())


def test_right_password_logs_in_and_server_signature_verifies() -> None:
    v = scram.make_verifier("pencil", iterations=4096)
    final = _login(scram.ScramServer("admin", v), "pencil")
    assert final.startswith(b"v=") and len(base64.b64decode(final[2:])) == 32


def test_wrong_password_fails_with_28p01() -> None:
    v = scram.make_verifier("pencil")
    with pytest.raises(AuthenticationFailed, match='password authentication failed for user "admin"') as info:
        _login(scram.ScramServer("admin", v), "crayon")
    assert info.value.sqlstate == "28P01"


def test_unknown_user_fails_at_the_proof_like_a_wrong_password() -> None:
    server = scram.ScramServer("mallory", None)
    first = server.first(b"n,,n=,r=abc").decode()
    assert ",s=" in first and ",i=4096" in first  # a plausible exchange, then the failure
    with pytest.raises(AuthenticationFailed):
        _login(scram.ScramServer("mallory", None), "anything")
    # The mock salt is stable per user, so probing twice reveals nothing either.
    again = scram.ScramServer("mallory", None).first(b"n,,n=,r=abc").decode()
    assert first.split(",")[1] == again.split(",")[1]


def test_verifier_round_trips_and_matches_rfc_7677_keys() -> None:
    # RFC 7677 section 3: user "user", password "pencil", salt W22ZaJ0SNY7soEsUEjb6gQ==, i=4096.
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    v = scram.make_verifier("pencil", iterations=4096, salt=salt)
    assert scram.parse_verifier(str(v)) == v
    auth_message = (
        b"n=user,r=rOprNGfwEbeRWgbNEkqO,"
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    )
    proof = scram.client_proof("pencil", salt, 4096, auth_message)
    assert base64.b64encode(proof) == b"dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    server_sig = hmac.new(v.server_key, auth_message, hashlib.sha256).digest()
    assert base64.b64encode(server_sig) == b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


@pytest.mark.parametrize(
    "bad",
    [
        "md5abcdef",
        "SCRAM-SHA-256$4096:c2FsdA==",
        "SCRAM-SHA-256$x:c2FsdA==$a:b",
        "SCRAM-SHA-256$4096:c2FsdA==$YQ==:YQ==",  # keys too short
    ],
)
def test_malformed_verifiers_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        scram.parse_verifier(bad)


@pytest.mark.parametrize(
    ("client_first", "why"),
    [
        (b"p=tls-server-end-point,,n=,r=abc", "channel binding"),
        (b"n,a=admin,n=,r=abc", "authorization identity"),
        (b"n,,m=ext,n=,r=abc", "extension"),
        (b"n,,r=abc", "n= and r="),
        (b"x,,n=,r=abc", "channel-binding flag"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_malformed_client_first_is_a_protocol_violation(client_first: bytes, why: str) -> None:
    with pytest.raises(ProtocolViolation, match=why):
        scram.ScramServer("admin", scram.make_verifier("x", iterations=1)).first(client_first)


def test_tampered_nonce_or_binding_is_a_protocol_violation() -> None:
    server = scram.ScramServer("admin", scram.make_verifier("x", iterations=1))
    nonce = server.first(b"n,,n=,r=abc").decode().split(",")[0][2:]
    with pytest.raises(ProtocolViolation, match="nonce"):
        server.final(f"c=biws,r={nonce}X,p={base64.b64encode(bytes(32)).decode()}".encode())
    with pytest.raises(ProtocolViolation, match="channel-binding"):
        server.final(f"c=eSws,r={nonce},p={base64.b64encode(bytes(32)).decode()}".encode())


@pytest.mark.parametrize(
    ("password", "prepared"),
    [
        ("I\u00adX", b"IX"),  # RFC 4013 examples: soft hyphen mapped to nothing
        ("user", b"user"),
        ("\u00aa", b"a"),  # NFKC
        ("\u2168", b"IX"),
        ("a\u00a0b", b"a b"),  # non-ASCII space becomes a space
        ("\x07", b"\x07"),  # pure ASCII passes unchanged, as in PostgreSQL
        ("\u0627\u0031", "\u0627\u0031".encode()),  # bidi failure: raw bytes, as pg_saslprep
    ],
)
def test_saslprep(password: str, prepared: bytes) -> None:
    assert scram.saslprep(password) == prepared


@given(st.text(min_size=1, max_size=20))
def test_any_password_logs_in_with_its_own_verifier(password: str) -> None:
    v = scram.make_verifier(password, iterations=1)
    assert _login(scram.ScramServer("u", v), password).startswith(b"v=")


def test_mock_exchange_announces_the_real_iteration_count() -> None:
    first = scram.ScramServer("nobody", None, mock_iterations=10000).first(b"n,,n=,r=abc")
    assert first.endswith(b",i=10000")


_ATTRS = st.sampled_from([b"n,,", b"y,,", b"p=x,,", b"n=", b"r=", b"c=biws", b"c=", b"p=", b",", b"=", b"\xff", b"\x00"])
_JUNK = st.one_of(st.binary(max_size=200), st.lists(st.one_of(_ATTRS, st.binary(max_size=12)), max_size=12).map(b"".join))


@given(_JUNK, _JUNK)
def test_any_client_messages_end_in_a_protocol_violation_or_a_failed_login(first: bytes, final: bytes) -> None:
    """Whatever a client sends (pgguard runs this exchange itself with [pool] reuse): a
    ProtocolViolation (08P01) or AuthenticationFailed (28P01), never another exception."""
    server = scram.ScramServer("app", scram.make_verifier("x", iterations=1))
    try:
        server.first(first)
        server.final(final)
    except (ProtocolViolation, AuthenticationFailed):
        pass


@given(st.data())
def test_any_client_final_after_a_good_first_ends_cleanly(data: st.DataObject) -> None:
    server = scram.ScramServer("app", scram.make_verifier("x", iterations=1))
    server_first = server.first(b"n,,n=,r=abc").decode()
    nonce = dict(part.split("=", 1) for part in server_first.split(","))["r"].encode()
    head = data.draw(st.sampled_from([b"c=biws,r=" + nonce, b"c=biws,r=" + nonce + b",p=", b"c=eSws,r=" + nonce, b""]))
    try:
        server.final(head + data.draw(_JUNK))
    except (ProtocolViolation, AuthenticationFailed):
        pass
