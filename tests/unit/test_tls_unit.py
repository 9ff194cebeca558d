"""tls.py without sockets: ClientHello/ALPN sniffing, the SASL list rewrite, contexts, config checks."""

from __future__ import annotations

import ssl
import struct
from pathlib import Path

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from pgguard import config as config_mod
from pgguard import tls
from pgguard.errors import BackendUnavailable, ConfigError, ProtocolViolation
from pgguard.wire import NEED_DATA, build_message

# ------------------------------------------------------------------------------ helpers


def client_hello(alpn: list[str] | None) -> bytes:
    """The ClientHello records OpenSSL (the same library libpq uses) sends first."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def split_records(records: bytes, at: int) -> bytes:
    """Re-frame one single-record handshake message as two records split at ``at``."""
    content_type, version, length = struct.unpack_from("!BHH", records)
    message = records[5 : 5 + length]
    first, second = message[:at], message[at:]
    return (
        struct.pack("!BHH", content_type, version, len(first)) + first
        + struct.pack("!BHH", content_type, version, len(second)) + second
    )  # fmt: skip


HELLO_PG = client_hello(["postgresql"])
HELLO_NONE = client_hello(None)
HELLO_H2 = client_hello(["h2", "http/1.1"])


def sasl_body(*mechanisms: bytes) -> bytes:
    return struct.pack("!i", 10) + b"".join(m + b"\x00" for m in mechanisms) + b"\x00"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    other = ca.issue_cert("elsewhere.example")
    d = tmp_path_factory.mktemp("pki")
    paths = {name: d / name for name in ("ca.crt", "server.crt", "server.key", "other.key", "junk")}
    ca.cert_pem.write_to_path(paths["ca.crt"])
    cert.cert_chain_pems[0].write_to_path(paths["server.crt"])
    cert.private_key_pem.write_to_path(paths["server.key"])
    other.private_key_pem.write_to_path(paths["other.key"])
    paths["junk"].write_text("not a certificate\n")
    return paths


def load(toml: str) -> config_mod.Config:
    return config_mod.loads(toml, "pgguard.toml")


# -------------------------------------------------------------------- ClientHello parsing


def test_client_hello_alpn_offer_is_read() -> None:
    assert tls.parse_client_hello(HELLO_PG) == tls.ClientHello(
        alpn=("postgresql",), length=len(HELLO_PG)
    )
    assert tls.parse_client_hello(HELLO_H2).alpn == ("h2", "http/1.1")
    assert tls.parse_client_hello(HELLO_NONE).alpn is None


def test_client_hello_needs_every_byte() -> None:
    for end in range(len(HELLO_PG)):
        assert tls.parse_client_hello(HELLO_PG[:end]) is NEED_DATA, end


@given(st.integers(min_value=1, max_value=len(HELLO_PG) - 6))
def test_client_hello_spread_over_two_records(at: int) -> None:
    records = split_records(HELLO_PG, at)
    hello = tls.parse_client_hello(records)
    assert hello == tls.ClientHello(alpn=("postgresql",), length=len(records))
    assert tls.parse_client_hello(records[:-1]) is NEED_DATA


def test_bytes_after_the_client_hello_are_not_its() -> None:
    assert tls.parse_client_hello(HELLO_PG + b"\x17\x03\x03").length == len(HELLO_PG)


@pytest.mark.parametrize(
    "data",
    [
        b"\x15\x03\x01\x00\x02\x02\x28",  # an alert record, not a handshake
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",  # ClientHello claiming 16 MiB
        b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00",  # truncated body
    ],
)
def test_not_a_client_hello_is_a_silent_protocol_violation(data: bytes) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        tls.parse_client_hello(data)
    assert caught.value.silent


@given(st.binary(max_size=300))
def test_garbage_raises_only_protocol_violation(data: bytes) -> None:
    try:
        result = tls.parse_client_hello(b"\x16" + data)
    except ProtocolViolation:
        return
    assert result is NEED_DATA or isinstance(result, tls.ClientHello)


@given(st.binary(max_size=200))
def test_mangled_real_hello_raises_only_protocol_violation(tail: bytes) -> None:
    data = HELLO_PG[:60] + tail
    try:
        tls.parse_client_hello(data)
    except ProtocolViolation:
        pass


def test_direct_tls_refusal_follows_postgresql() -> None:
    assert tls.direct_tls_refusal(tls.ClientHello(alpn=("h2", "postgresql"), length=1)) is None
    reason, reply = tls.direct_tls_refusal(tls.ClientHello(alpn=None, length=1))
    assert "without ALPN" in reason and reply == b""
    reason, reply = tls.direct_tls_refusal(tls.ClientHello(alpn=("h2",), length=1))
    assert reply == tls.ALERT_NO_APPLICATION_PROTOCOL
    assert reply[0] == 21 and reply[-2:] == bytes([2, 120])  # fatal no_application_protocol


# ------------------------------------------------------------------------- SASL rewrite


def test_plus_mechanism_is_stripped_from_authentication_sasl() -> None:
    body = sasl_body(b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256")
    assert tls.strip_channel_binding(body) == sasl_body(b"SCRAM-SHA-256")


def test_other_authentication_messages_pass_unchanged() -> None:
    ok = struct.pack("!i", 0)
    sasl_continue = struct.pack("!i", 11) + b"r=abc-PLUS\x00"
    plain = sasl_body(b"SCRAM-SHA-256")
    for body in (ok, sasl_continue, plain, b""):
        assert tls.strip_channel_binding(body) is body


def test_unterminated_sasl_list_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation):
        tls.strip_channel_binding(struct.pack("!i", 10) + b"SCRAM-SHA-256-PLUS")


@given(
    st.lists(st.sampled_from([b"SCRAM-SHA-256", b"SCRAM-SHA-256-PLUS", b"X-PLUS", b"OAUTHBEARER"]))
)
def test_strip_keeps_exactly_the_non_plus_mechanisms(mechanisms: list[bytes]) -> None:
    out = tls.strip_channel_binding(sasl_body(*mechanisms))
    assert out == sasl_body(*[m for m in mechanisms if not m.endswith(b"-PLUS")])
    # still a well-formed message once framed
    assert build_message(b"R", out)[1:5] == struct.pack("!I", len(out) + 4)


def test_strip_needed_only_when_certificates_differ() -> None:
    assert not tls.strip_needed(b"cert", None)  # clear server: no -PLUS offered
    assert not tls.strip_needed(None, None)
    assert tls.strip_needed(None, b"server")  # clear client: libpq refuses -PLUS in clear
    assert tls.strip_needed(b"pgguard", b"server")
    assert not tls.strip_needed(b"same", b"same")  # binding to the same certificate holds


# --------------------------------------------------------------------- SSL response


def test_ssl_response_follows_libpq() -> None:
    assert tls.read_ssl_response(b"S", "require") is True
    assert tls.read_ssl_response(b"N", "prefer") is False
    for mode in ("require", "verify-ca", "verify-full"):
        with pytest.raises(
            BackendUnavailable, match="server does not support SSL, but SSL was required"
        ):
            tls.read_ssl_response(b"N", mode)
    with pytest.raises(BackendUnavailable, match="invalid response to SSL negotiation"):
        tls.read_ssl_response(b"E", "prefer")
    with pytest.raises(BackendUnavailable, match="unencrypted data after SSL response"):
        tls.read_ssl_response(b"SR\x00\x00", "require")


def test_ssl_request_bytes() -> None:
    assert tls.SSL_REQUEST == bytes.fromhex("0000000804d2162f")


# ------------------------------------------------------------------------- contexts


def _handshake(server_ctx: ssl.SSLContext, alpn: list[str] | None) -> tuple[str | None, str | None]:
    """An in-memory handshake; returns (negotiated ALPN, TLS version) as the client sees them."""
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        client_ctx.set_alpn_protocols(alpn)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, obj, out, peer_in in (("c", client, c_out, s_in), ("s", server, s_out, c_in)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            break
    assert all(done.values())
    return client.selected_alpn_protocol(), client.version()


def test_client_context_terminates_tls_with_alpn_postgresql(pki: dict[str, Path]) -> None:
    cfg = load(f'[tls]\ncert_file = "{pki["server.crt"]}"\nkey_file = "{pki["server.key"]}"\n')
    client_tls = tls.client_context(cfg)
    assert client_tls is not None
    pem = pki["server.crt"].read_text()
    assert client_tls.certificate == ssl.PEM_cert_to_DER_cert(pem)
    assert _handshake(client_tls.context, ["postgresql"])[0] == "postgresql"
    alpn, version = _handshake(client_tls.context, None)
    assert alpn is None and version in ("TLSv1.2", "TLSv1.3")
    assert client_tls.context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_client_context_off_without_certificate_or_when_disabled(pki: dict[str, Path]) -> None:
    assert tls.client_context(load("")) is None
    cfg = load(
        f'[tls]\ncert_file = "{pki["server.crt"]}"\nkey_file = "{pki["server.key"]}"\n'
        'client_mode = "disable"\n'
    )
    assert tls.client_context(cfg) is None


@pytest.mark.parametrize(
    ("cert", "key", "bad_key"),
    [
        ("missing.crt", "server.key", "tls.cert_file"),
        ("junk", "server.key", "tls.cert_file"),
        ("server.crt", "missing.key", "tls.key_file"),
        ("server.crt", "junk", "tls.key_file"),
        ("server.crt", "other.key", "tls.key_file"),  # does not match the certificate
    ],
)
def test_bad_certificate_files_name_their_key(
    pki: dict[str, Path], cert: str, key: str, bad_key: str
) -> None:
    d = pki["ca.crt"].parent
    cfg = load(f'[tls]\ncert_file = "{d / cert}"\nkey_file = "{d / key}"\n')
    with pytest.raises(ConfigError) as caught:
        tls.load(cfg)
    assert caught.value.key == bad_key and caught.value.file == "pgguard.toml"


@pytest.mark.parametrize(
    ("mode", "verify", "check_hostname"),
    [
        ("prefer", ssl.CERT_NONE, False),
        ("require", ssl.CERT_NONE, False),
        ("verify-ca", ssl.CERT_REQUIRED, False),
        ("verify-full", ssl.CERT_REQUIRED, True),
    ],
)
def test_backend_context_per_sslmode(
    pki: dict[str, Path], mode: str, verify: ssl.VerifyMode, check_hostname: bool
) -> None:
    backend = tls.backend_context(load(f'[backend]\nhost = "db.example"\nsslmode = "{mode}"\n'))
    assert backend.context is not None and backend.sslmode == mode
    assert backend.context.verify_mode == verify
    assert backend.context.check_hostname is check_hostname
    assert backend.server_hostname == "db.example"  # SNI for a name
    assert backend.required is (mode != "prefer")


def test_backend_context_details(pki: dict[str, Path]) -> None:
    for mode in ("disable", "allow"):
        assert tls.backend_context(load(f'[backend]\nsslmode = "{mode}"\n')).context is None
    # require with a root certificate verifies the chain, as libpq does
    require_ca = tls.backend_context(
        load(f'[backend]\nsslmode = "require"\nsslrootcert = "{pki["ca.crt"]}"\n')
    )
    assert require_ca.context is not None and require_ca.context.verify_mode == ssl.CERT_REQUIRED
    # no SNI for an address, except that verify-full checks it against the certificate
    assert (
        tls.backend_context(
            load('[backend]\nhost = "127.0.0.1"\nsslmode = "require"\n')
        ).server_hostname
        is None
    )
    full = tls.backend_context(load('[backend]\nhost = "127.0.0.1"\nsslmode = "verify-full"\n'))
    assert full.server_hostname == "127.0.0.1"
    with pytest.raises(ConfigError) as caught:
        tls.load(load(f'[backend]\nsslmode = "verify-ca"\nsslrootcert = "{pki["junk"]}"\n'))
    assert caught.value.key == "backend.sslrootcert"


# ------------------------------------------------------------------------ config keys


def test_tls_keys_are_checked_together() -> None:
    with pytest.raises(ConfigError) as caught:
        load('[tls]\ncert_file = "a.crt"\n')
    assert caught.value.key == "tls.key_file"
    with pytest.raises(ConfigError) as caught:
        load('[tls]\nkey_file = "a.key"\n')
    assert caught.value.key == "tls.cert_file"
    with pytest.raises(ConfigError) as caught:
        load('[tls]\nclient_mode = "require"\n')
    assert caught.value.key == "tls.client_mode"
    with pytest.raises(ConfigError):
        load('[tls]\nclient_mode = "always"\n')
    with pytest.raises(ConfigError):
        load('[backend]\nsslmode = "verify"\n')


def test_client_hello_dripped_as_one_byte_records_is_read_in_linear_work(monkeypatch) -> None:
    """Each record header is read once however the bytes arrive (it used to be re-parsed)."""
    body = HELLO_PG[5:]
    records = b"".join(b"\x16\x03\x01\x00\x01" + body[i : i + 1] for i in range(len(body)))
    calls = 0
    real = tls._RECORD_HEADER

    class Counting:
        size = real.size

        def unpack_from(self, data, offset=0):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            return real.unpack_from(data, offset)

    monkeypatch.setattr(tls, "_RECORD_HEADER", Counting())
    reader = tls.ClientHelloReader()
    result = None
    for i in range(len(records)):
        result = reader.feed(records[i : i + 1])
        if result is not NEED_DATA:
            break
    assert isinstance(result, tls.ClientHello) and result.alpn == tls.parse_client_hello(HELLO_PG).alpn
    # At most one header read per feed and per record: linear in the bytes received (the old
    # parser re-read every record on every byte: about len(body)**2 / 2 = 131,000 reads here).
    assert calls <= (i + 1) + len(body)
    assert bytes(reader.raw) == records[: i + 1]
