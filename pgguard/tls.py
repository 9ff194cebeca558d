"""TLS for both sides: SSL contexts from the config, ClientHello/ALPN sniffing, SASL list rewrite.

Theory
------
Client side. With ``[tls] cert_file``/``key_file`` set (and ``client_mode`` not ``disable``),
pgguard answers SSLRequest with ``S`` and terminates TLS before it reads the StartupMessage,
as PostgreSQL does. PostgreSQL 17 also accepts *direct* TLS: the connection opens with a
TLS handshake record (first byte ``0x16``) instead of a startup packet length. PostgreSQL
requires such a client to offer ALPN, and ``postgresql`` among its protocols
(backend_startup.c, be-secure-openssl.c): an offer without ``postgresql`` is refused with
the TLS alert ``no_application_protocol``, and no ALPN at all is refused after the handshake
("received direct SSL connection request without ALPN protocol negotiation extension").
``parse_client_hello`` reads the ALPN offer from the ClientHello so the shell can apply the
same rules before it starts the handshake.

Server side. ``[backend] sslmode`` works as in libpq: pgguard sends its own SSLRequest and
reads one byte; ``S`` starts TLS, ``N`` continues in clear (``prefer``) or fails (``require``
and up). ``require`` checks nothing about the certificate unless ``sslrootcert`` is set, when
it behaves as ``verify-ca`` (as libpq does when a root certificate file exists); ``verify-ca``
checks the chain; ``verify-full`` also checks the host name. ``allow`` connects without TLS
(pgguard does not retry with TLS after a failure).

SCRAM. A server whose connection is TLS offers ``SCRAM-SHA-256-PLUS`` (channel binding to
its certificate, RFC 5929 ``tls-server-end-point``). A client of pgguard can only bind to the
certificate it sees, pgguard's; so unless pgguard presents the very same certificate as the
server, ``strip_channel_binding`` removes the ``-PLUS`` mechanisms from the
AuthenticationSASL list before it reaches the client. (libpq also refuses a ``-PLUS`` offer
over a connection that is not TLS, which is what a clear client would see otherwise.)

Everything here except the two context builders is pure: bytes in, values or bytes out.
"""

from __future__ import annotations

import ipaddress
import ssl
import struct
from dataclasses import dataclass
from typing import Final

from .config import Config
from .errors import BackendUnavailable, ConfigError, ProtocolViolation
from .wire import NEED_DATA, SSL_REQUEST_CODE, _NeedData

__all__ = [
    "ALPN_PROTOCOL",
    "TLS_HANDSHAKE_RECORD",
    "ALERT_NO_APPLICATION_PROTOCOL",
    "ClientHello",
    "ClientTLS",
    "BackendTLS",
    "parse_client_hello",
    "ClientHelloReader",
    "direct_tls_refusal",
    "strip_channel_binding",
    "strip_needed",
    "SSL_REQUEST",
    "SSL_ACCEPTED",
    "read_ssl_response",
    "load",
    "client_context",
    "backend_context",
]

ALPN_PROTOCOL: Final = "postgresql"  # the name PostgreSQL 17 registered with IANA
TLS_HANDSHAKE_RECORD: Final = 0x16  # TLS record content type "handshake": direct TLS starts with it
# A ClientHello spread over records is put back together up to this size; real ones are a
# few hundred bytes (a post-quantum key share makes it about 1.5 KiB).
MAX_CLIENT_HELLO: Final = 64 * 1024
# A TLS alert record: content type alert (21), version TLS 1.2, length 2, level fatal (2),
# description no_application_protocol (120, RFC 7301). What PostgreSQL's OpenSSL sends when
# the client's ALPN offer lacks "postgresql".
ALERT_NO_APPLICATION_PROTOCOL: Final = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 120])

SSL_REQUEST: Final = struct.pack("!ii", 8, SSL_REQUEST_CODE)  # what pgguard sends the server
SSL_ACCEPTED: Final = b"S"  # the one-byte yes to an SSLRequest (no is wire.SSL_NOT_SUPPORTED)

_AUTH_SASL: Final = 10  # AuthenticationSASL: Int32 10, then mechanism names, NUL each, NUL
_HANDSHAKE_CLIENT_HELLO: Final = 1
_EXT_ALPN: Final = 16
_RECORD_HEADER: Final = struct.Struct("!BHH")
_UINT16: Final = struct.Struct("!H")
_INT32: Final = struct.Struct("!i")
_MIN_TLS: Final = ssl.TLSVersion.TLSv1_2  # PostgreSQL's ssl_min_protocol_version default
_VERIFYING: Final = frozenset({"verify-ca", "verify-full"})
_REQUIRING: Final = frozenset({"require", "verify-ca", "verify-full"})


# ------------------------------------------------------------------ ClientHello sniffing


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What pgguard needs from a ClientHello: the ALPN offer (None: no ALPN extension)."""

    alpn: tuple[str, ...] | None
    length: int  # bytes of the records that carried it


def parse_client_hello(data: bytes | bytearray) -> ClientHello | _NeedData:
    """Parse the ClientHello at the start of ``data`` (TLS records as received).

    Returns ``NEED_DATA`` until the whole handshake message has arrived. Raises
    ``ProtocolViolation`` (silent: the peer gets no reply) when the bytes are not a
    ClientHello or it is larger than ``MAX_CLIENT_HELLO``.
    """
    reader = ClientHelloReader()
    return reader.feed(data)


class ClientHelloReader:
    """Collects a ClientHello from TLS records fed in any pieces; linear in the bytes fed.

    Each record is consumed once, as soon as it is whole (a ClientHello dripped as 1-byte
    records costs the same per byte as one sent whole); ``raw`` keeps every byte fed, for the
    TLS layer to replay once the handshake starts.
    """

    def __init__(self) -> None:
        self.raw = bytearray()
        self._offset = 0  # end of the last whole record in raw
        self._message = bytearray()  # handshake bytes reassembled from the records

    def feed(self, data: bytes | bytearray) -> ClientHello | _NeedData:
        """Add ``data``; the ClientHello once whole, else NEED_DATA. Raises ProtocolViolation."""
        raw = self.raw
        raw += data
        message = self._message
        while True:
            offset = self._offset
            if len(raw) - offset < _RECORD_HEADER.size:
                break
            content_type, _version, length = _RECORD_HEADER.unpack_from(raw, offset)
            if content_type != TLS_HANDSHAKE_RECORD or length == 0 or length > 16384 + 2048:
                raise _bad("not a TLS handshake record")
            start = offset + _RECORD_HEADER.size
            if len(raw) - start < length:
                break
            message += raw[start : start + length]
            self._offset = offset = start + length
            if len(message) >= 4:
                if message[0] != _HANDSHAKE_CLIENT_HELLO:
                    raise _bad("the first TLS handshake message is not a ClientHello")
                needed = 4 + int.from_bytes(message[1:4], "big")
                if needed > MAX_CLIENT_HELLO:
                    raise _bad("TLS ClientHello too large")
                if len(message) >= needed:
                    return ClientHello(alpn=_alpn(bytes(message[4:needed])), length=offset)
            if offset > MAX_CLIENT_HELLO:
                raise _bad("TLS ClientHello too large")
        if len(raw) > MAX_CLIENT_HELLO + _RECORD_HEADER.size + 16384 + 2048:
            raise _bad("TLS ClientHello too large")
        return NEED_DATA


def _bad(why: str) -> ProtocolViolation:
    return ProtocolViolation(why, silent=True)


def _alpn(body: bytes) -> tuple[str, ...] | None:
    """The ALPN names offered in a ClientHello body (None when there is no ALPN extension)."""
    cursor = _Cursor(body)
    cursor.skip(2 + 32)  # legacy_version, random
    cursor.skip(cursor.u8())  # legacy_session_id
    cursor.skip(cursor.u16())  # cipher_suites
    cursor.skip(cursor.u8())  # legacy_compression_methods
    if cursor.at_end():
        return None  # no extensions at all (allowed before TLS 1.3)
    extensions = _Cursor(cursor.take(cursor.u16()))
    while not extensions.at_end():
        ext_type = extensions.u16()
        ext = _Cursor(extensions.take(extensions.u16()))
        if ext_type != _EXT_ALPN:
            continue
        names = _Cursor(ext.take(ext.u16()))
        offered = []
        while not names.at_end():
            offered.append(names.take(names.u8()).decode("ascii", "replace"))
        return tuple(offered)
    return None


class _Cursor:
    """Reads big-endian fields from a bounded buffer; running past the end is a ProtocolViolation."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def at_end(self) -> bool:
        return self._pos >= len(self._data)

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise _bad("truncated TLS ClientHello")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def skip(self, n: int) -> None:
        self.take(n)

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = _UINT16.unpack(self.take(2))[0]
        return value


def direct_tls_refusal(hello: ClientHello) -> tuple[str, bytes] | None:
    """Why PostgreSQL 17 would refuse this direct-TLS ClientHello, and the bytes it answers.

    Returns None when the offer is acceptable (ALPN offered, ``postgresql`` among it).
    Otherwise ``(reason, reply)``: no ALPN gets no reply (PostgreSQL only logs it), an offer
    without ``postgresql`` gets the TLS alert no_application_protocol.
    """
    if hello.alpn is None:
        return (
            "received direct SSL connection request without ALPN protocol negotiation extension",
            b"",
        )
    if ALPN_PROTOCOL not in hello.alpn:
        return (
            f"direct SSL connection offered ALPN {','.join(hello.alpn) or '(empty)'} "
            f"without {ALPN_PROTOCOL}",
            ALERT_NO_APPLICATION_PROTOCOL,
        )
    return None


# ------------------------------------------------------------------------- SASL rewrite


def strip_channel_binding(body: bytes) -> bytes:
    """An Authentication ('R') message body with every ``*-PLUS`` SASL mechanism removed.

    Bodies that are not AuthenticationSASL (code 10) come back unchanged, the same object.
    Raises ``ProtocolViolation`` for an AuthenticationSASL body that is not NUL-terminated.
    """
    if len(body) < 4 or _INT32.unpack_from(body, 0)[0] != _AUTH_SASL:
        return body
    names = body[4:]
    if not names.endswith(b"\x00"):
        raise ProtocolViolation("invalid AuthenticationSASL message")
    mechanisms = [name for name in names[:-1].split(b"\x00") if name]
    kept = [name for name in mechanisms if not name.endswith(b"-PLUS")]
    if len(kept) == len(mechanisms):
        return body
    return body[:4] + b"".join(name + b"\x00" for name in kept) + b"\x00"


def strip_needed(client_certificate: bytes | None, server_certificate: bytes | None) -> bool:
    """Whether the server's SASL list must lose its ``-PLUS`` mechanisms before the client sees it.

    ``server_certificate`` is the DER the server presented (None: the server connection is
    clear, and it offers no ``-PLUS`` at all); ``client_certificate`` the DER pgguard
    presented to this client (None: the client is in clear). Channel binding
    (tls-server-end-point) hashes the server certificate the client saw, so it survives
    pgguard only when both are the same certificate.
    """
    if server_certificate is None:
        return False
    return client_certificate != server_certificate


# ------------------------------------------------------------------ backend SSLRequest


def read_ssl_response(answer: bytes, sslmode: str) -> bool:
    """Interpret the server's answer to pgguard's SSLRequest (the first bytes it sent).

    Returns True to start TLS, False to continue in clear (``prefer``). Raises
    ``BackendUnavailable`` with libpq's wording when TLS is required and refused, when the
    answer is neither ``S`` nor ``N``, or when more than the one byte came: the server sends
    nothing else before the handshake (or before our StartupMessage), so those bytes may
    have been injected.
    """
    if len(answer) > 1:
        raise BackendUnavailable("received unencrypted data after SSL response")
    if answer == b"S":
        return True
    if answer == b"N":
        if sslmode in _REQUIRING:
            raise BackendUnavailable("server does not support SSL, but SSL was required")
        return False
    raise BackendUnavailable(f"received invalid response to SSL negotiation: {answer[:1]!r}")


# ------------------------------------------------------------------------------ contexts


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """The TLS pgguard offers its clients: a server-side context and the certificate it shows."""

    context: ssl.SSLContext
    certificate: bytes  # DER of the leaf certificate in cert_file


@dataclass(frozen=True, slots=True)
class BackendTLS:
    """How pgguard talks to the server: ``context`` is None when it sends no SSLRequest."""

    sslmode: str
    context: ssl.SSLContext | None
    server_hostname: str | None  # SNI and, for verify-full, the name checked

    @property
    def required(self) -> bool:
        return self.sslmode in _REQUIRING


def load(config: Config) -> tuple[ClientTLS | None, BackendTLS]:
    """Both contexts for ``config``; raises ConfigError naming the key whose file is bad."""
    return client_context(config), backend_context(config)


def client_context(config: Config) -> ClientTLS | None:
    """The server-side context for clients, or None when client TLS is off.

    Reads ``[tls] cert_file`` and ``key_file`` now (a reload calls this again, which is how
    a renewed certificate is picked up). Raises ConfigError naming the bad file's key.
    """
    cfg = config.tls
    if cfg.cert_file is None or cfg.key_file is None or cfg.client_mode == "disable":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _MIN_TLS
    # libpq never resumes sessions; PostgreSQL turns tickets off too (SSL_OP_NO_TICKET).
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    ctx.set_alpn_protocols([ALPN_PROTOCOL])
    certificate = _first_certificate(_read(config, "tls.cert_file", cfg.cert_file))
    if certificate is None:
        raise ConfigError(config.path, "tls.cert_file", f"no PEM certificate in {cfg.cert_file}")
    _read(config, "tls.key_file", cfg.key_file)
    try:
        # A passphrase-protected key fails here instead of prompting on a terminal.
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file, password=_no_passphrase)
    except OSError as exc:  # ssl.SSLError is an OSError
        # The certificate parsed above, so the key is the likely culprit (or a mismatch).
        raise ConfigError(
            config.path,
            "tls.key_file",
            f"cannot use {cfg.key_file} with {cfg.cert_file}: "
            f"{_why(exc, 'not a PEM key, or a passphrase-protected one')}",
        ) from None
    return ClientTLS(context=ctx, certificate=certificate)


def backend_context(config: Config) -> BackendTLS:
    """The client-side context for ``[backend] sslmode``; raises ConfigError for a bad sslrootcert."""
    cfg = config.backend
    mode = cfg.sslmode
    hostname = None if _is_ip(cfg.host) and mode != "verify-full" else cfg.host
    if mode in ("disable", "allow"):
        return BackendTLS(sslmode=mode, context=None, server_hostname=None)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _MIN_TLS
    ctx.set_alpn_protocols([ALPN_PROTOCOL])  # as libpq 17 does; older servers ignore it
    verify = mode in _VERIFYING or cfg.sslrootcert is not None
    ctx.check_hostname = mode == "verify-full"
    ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    if verify:
        try:
            if cfg.sslrootcert in (None, "system"):
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
            else:
                ctx.load_verify_locations(cafile=cfg.sslrootcert)
        except OSError as exc:
            raise ConfigError(
                config.path, "backend.sslrootcert", f"cannot load {cfg.sslrootcert}: {_why(exc)}"
            ) from None
    return BackendTLS(sslmode=mode, context=ctx, server_hostname=hostname)


def _first_certificate(pem: bytes) -> bytes | None:
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    start = pem.find(begin)
    stop = pem.find(end, start)
    if start < 0 or stop < 0:
        return None
    try:
        return ssl.PEM_cert_to_DER_cert(pem[start : stop + len(end)].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None


def _read(config: Config, key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(config.path, key, f"cannot read {path}: {_why(exc)}") from None


def _no_passphrase() -> str:
    return ""


def _why(exc: OSError, unknown: str = "not PEM") -> str:
    """A short reason; OpenSSL leaves ``reason`` unset for some PEM errors, hence ``unknown``."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason or unknown
    return exc.strerror or str(exc)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
