"""Sans-IO PostgreSQL wire protocol: parse startup-phase packets, frame messages, build replies.

Nothing here does I/O or imports asyncio. Bytes go in through ``feed``; packets come out of
``next_packet`` / ``next_message``, or the ``NEED_DATA`` sentinel when more bytes are needed.
Builders return ``bytes`` ready to write.

Startup phase (https://www.postgresql.org/docs/current/protocol-message-formats.html):
every packet a client sends before its StartupMessage has no type byte, only
``Int32 length`` (counting itself) and ``Int32 code``. The code is a protocol version
(major << 16 | minor) for a StartupMessage, or one of the magic request codes below.
PostgreSQL accepts at most 10000 bytes (``MAX_STARTUP_PACKET_LENGTH`` in pqcomm.h) and
closes without a reply on a bad length; pgguard does the same.

After the startup packet every message in either direction is ``Byte1 type, Int32 length``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from .errors import NoUserName, PgGuardError, ProtocolViolation, UnsupportedProtocol

__all__ = [
    "NEED_DATA",
    "PROTOCOL_3_0",
    "PROTOCOL_3_2",
    "SSL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "CANCEL_REQUEST_CODE",
    "MAX_NAME_BYTES",
    "MAX_STARTUP_PACKET_LENGTH",
    "SSL_NOT_SUPPORTED",
    "TERMINATE",
    "StartupMessage",
    "SSLRequest",
    "GSSENCRequest",
    "CancelRequest",
    "Packet",
    "StartupReader",
    "MessageReader",
    "parse_error_fields",
    "parse_backend_key_data",
    "build_error_response",
    "build_startup_message",
    "build_cancel_request",
    "build_authentication_ok",
    "build_parameter_status",
    "build_backend_key_data",
    "build_ready_for_query",
    "build_row_description",
    "build_data_row",
    "build_command_complete",
    "build_empty_query_response",
    "build_message",
]


class _NeedData:
    """Sentinel: the buffer does not yet hold a whole packet."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

PROTOCOL_3_0: Final = 196608  # 3 << 16 | 0
PROTOCOL_3_2: Final = 196610  # 3 << 16 | 2, PostgreSQL 18 (longer cancel keys)
LATEST_MINOR: Final = 2  # what pgguard names in "server supports 3.0 to 3.N"
SSL_REQUEST_CODE: Final = 80877103  # 1234 << 16 | 5679
GSSENC_REQUEST_CODE: Final = 80877104  # 1234 << 16 | 5680
CANCEL_REQUEST_CODE: Final = 80877102  # 1234 << 16 | 5678
MAX_STARTUP_PACKET_LENGTH: Final = 10000  # pqcomm.h MAX_STARTUP_PACKET_LENGTH
MAX_CANCEL_KEY_LENGTH: Final = 256  # protocol 3.2 allows keys up to 256 bytes
# Longest user or database name, in bytes: NAMEDATALEN - 1 (pg_config_manual.h). The
# postmaster cuts longer names from the StartupMessage to this many bytes before it looks
# them up (postmaster.c: "Truncate given database and user names"), so pgguard does too.
MAX_NAME_BYTES: Final = 63
# The startup parameters the postmaster truncates (it stores them in Port, as names).
_NAME_PARAMS: Final = frozenset({b"user", b"database"})
# Backend messages can be large (a DataRow of a 1 GB bytea); this bound only catches garbage.
MAX_MESSAGE_LENGTH: Final = 0x40000000 + 1024

SSL_NOT_SUPPORTED: Final = b"N"
TERMINATE: Final = b"X\x00\x00\x00\x04"

_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_HEADER = struct.Struct("!cI")
_STARTUP_HEADER = struct.Struct("!II")
_ENCODING: Final = "utf-8"
_ERRORS: Final = "surrogateescape"  # keep arbitrary bytes in names round-trippable


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """A StartupMessage: protocol version and parameters, plus the raw packet to forward."""

    protocol: int
    params: Mapping[str, str]
    raw: bytes

    @property
    def user(self) -> str:
        return self.params["user"]

    @property
    def database(self) -> str:
        """The database, defaulting to the user name as PostgreSQL does."""
        return self.params.get("database") or self.params["user"]

    @property
    def application_name(self) -> str:
        return self.params.get("application_name", "")

    @property
    def is_replication(self) -> bool:
        """True for a walsender connection: ``replication`` is "database" or a true boolean.

        As PostgreSQL reads the parameter (backend_startup.c: "database" exactly, else
        parse_bool: a case-insensitive prefix of true/yes, "on", or "1"). Any other value is
        not replication here; the server refuses it with FATAL.
        """
        value = self.params.get("replication")
        if value is None:
            return False
        return value == "database" or _parse_bool(value) is True


def _parse_bool(value: str) -> bool | None:
    """PostgreSQL's parse_bool (utils/adt/bool.c): True, False, or None when not a boolean."""
    v = value.lower()
    if not v:
        return None
    if "true".startswith(v) or "yes".startswith(v) or v == "1" or v == "on":
        return True
    if "false".startswith(v) or "no".startswith(v) or v == "0" or v in ("of", "off"):
        return False
    return None


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The client asks for TLS before its StartupMessage."""


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """The client asks for GSSAPI encryption before its StartupMessage."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """A CancelRequest naming a backend (pid, secret key); forwarded as ``raw``."""

    pid: int
    key: bytes
    raw: bytes


Packet = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def _decode(value: bytes) -> str:
    return value.decode(_ENCODING, _ERRORS)


def _encode(value: str) -> bytes:
    return value.encode(_ENCODING, _ERRORS)


class StartupReader:
    """Turns startup-phase bytes into packets; never does I/O.

    ``next_packet`` returns one packet, or ``NEED_DATA``; malformed input raises
    ``ProtocolViolation`` (or its subclasses ``UnsupportedProtocol`` and ``NoUserName``)
    and nothing else. Bytes after a StartupMessage stay in the buffer; ``take_rest``
    hands them over when the connection leaves the startup phase.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def next_packet(self) -> Packet | _NeedData:
        buf = self._buf
        if len(buf) < 4:
            return NEED_DATA
        (length,) = _INT32.unpack_from(buf, 0)
        if length < 8 or length > MAX_STARTUP_PACKET_LENGTH:
            raise ProtocolViolation("invalid length of startup packet", silent=True)
        if len(buf) < length:
            return NEED_DATA
        packet = bytes(buf[:length])
        del buf[:length]
        return _parse_startup_packet(packet)


def parse_cancel_request(packet: bytes) -> CancelRequest:
    """A whole CancelRequest packet (as ``CancelRequest.raw`` holds it); ProtocolViolation if not one."""
    if len(packet) < 8 or _INT32.unpack_from(packet, 0)[0] != len(packet):
        raise ProtocolViolation("invalid length of cancel request packet", silent=True)
    parsed = _parse_startup_packet(packet)
    if not isinstance(parsed, CancelRequest):
        raise ProtocolViolation("not a cancel request", silent=True)
    return parsed


def _parse_startup_packet(packet: bytes) -> Packet:
    length, code = _STARTUP_HEADER.unpack_from(packet, 0)
    if code == SSL_REQUEST_CODE or code == GSSENC_REQUEST_CODE:
        if length != 8:
            raise ProtocolViolation("invalid length of startup packet", silent=True)
        return SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        key_length = length - 12
        if key_length < 4 or key_length > MAX_CANCEL_KEY_LENGTH:
            raise ProtocolViolation("invalid length of cancel request packet", silent=True)
        (pid,) = _INT32.unpack_from(packet, 8)
        return CancelRequest(pid=pid, key=packet[12:], raw=packet)
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise UnsupportedProtocol(
            f"unsupported frontend protocol {major}.{minor}: "
            f"server supports 3.0 to 3.{LATEST_MINOR}"
        )
    params = _parse_startup_params(packet)
    if not params.get("user"):
        raise NoUserName()
    return StartupMessage(protocol=code, params=params, raw=packet)


def _parse_startup_params(packet: bytes) -> dict[str, str]:
    """Parse NUL-terminated name/value pairs ending with one extra NUL (postmaster.c layout rule).

    ``user`` and ``database`` come out cut to ``MAX_NAME_BYTES`` as PostgreSQL cuts them, so
    every use of the name (limits, logs, metrics, SHOW, pool keys) sees the name the server
    logs in as; ``StartupMessage.raw``, which is what the server gets, keeps the client's bytes.
    """
    params: dict[str, str] = {}
    end = len(packet)
    offset = 8
    while offset < end:
        name_end = packet.find(b"\x00", offset)
        if name_end < 0:
            break
        if name_end == offset:  # the terminator
            break
        value_end = packet.find(b"\x00", name_end + 1)
        if value_end < 0:
            offset = end
            break
        name = packet[offset:name_end]
        if value_end - name_end - 1 > MAX_NAME_BYTES and name in _NAME_PARAMS:
            # The name the server logs in as: its first 63 bytes, cut as bytes even inside a
            # multibyte character, as the postmaster cuts it (it knows no encoding yet).
            value = packet[name_end + 1 : name_end + 1 + MAX_NAME_BYTES]
        else:
            value = packet[name_end + 1 : value_end]
        params[_decode(name)] = _decode(value)
        offset = value_end + 1
    if offset != end - 1:
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    return params


class MessageReader:
    """Frames typed protocol messages (``Byte1 type, Int32 length, body``); never does I/O.

    ``next_message`` returns ``(type, body)`` with ``type`` a one-byte ``bytes``, or
    ``NEED_DATA``. A length below 4 or absurdly large raises ``ProtocolViolation``.
    """

    __slots__ = ("_buf", "_pos", "max_length")

    def __init__(self, max_length: int = MAX_MESSAGE_LENGTH) -> None:
        self._buf = bytearray()
        self._pos = 0
        # A peer that is not trusted yet (a console client before its login) gets a small
        # bound, so a claimed length cannot make pgguard buffer more than that.
        self.max_length = max_length

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as a message (0: at a message boundary)."""
        return len(self._buf) - self._pos

    def take_rest(self) -> bytes:
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest

    def next_message(self) -> tuple[bytes, bytes] | _NeedData:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 5:
            return NEED_DATA
        tag, length = _HEADER.unpack_from(buf, pos)
        if length < 4 or length > self.max_length:
            raise ProtocolViolation(f"invalid message length {length} for message type {tag!r}")
        end = pos + 1 + length
        if len(buf) < end:
            return NEED_DATA
        body = bytes(buf[pos + 5 : end])
        self._pos = end
        return tag, body


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body, keyed by their one-letter code."""
    fields: dict[str, str] = {}
    for part in body.split(b"\x00"):
        if part:
            fields[chr(part[0])] = _decode(part[1:])
    return fields


def parse_backend_key_data(body: bytes) -> tuple[int, bytes]:
    """BackendKeyData body -> (pid, secret key); raises ProtocolViolation when too short."""
    if len(body) < 8:
        raise ProtocolViolation("invalid BackendKeyData message")
    (pid,) = _INT32.unpack_from(body, 0)
    return pid, body[4:]


def build_message(tag: bytes, body: bytes = b"") -> bytes:
    """One typed message: tag, Int32 length (counting itself), body."""
    return tag + _UINT32.pack(len(body) + 4) + body


def build_error(exc: PgGuardError) -> bytes:
    """The ErrorResponse for ``exc``: its SQLSTATE, severity, message and DETAIL."""
    return build_error_response(exc.sqlstate, exc.message, severity=exc.severity, detail=exc.detail)


def build_error_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "FATAL",
    detail: str | None = None,
) -> bytes:
    """An ErrorResponse with fields S, V, C, M (and D when given), as PostgreSQL orders them."""
    parts = [
        b"S", _encode(severity), b"\x00",
        b"V", _encode(severity), b"\x00",
        b"C", _encode(sqlstate), b"\x00",
        b"M", _encode(message), b"\x00",
    ]  # fmt: skip
    if detail is not None:
        parts += [b"D", _encode(detail), b"\x00"]
    parts.append(b"\x00")
    return build_message(b"E", b"".join(parts))


def build_startup_message(params: Mapping[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    """A StartupMessage packet for ``params`` (used by tests, the admin client, and dial probes)."""
    body = b"".join(_encode(k) + b"\x00" + _encode(v) + b"\x00" for k, v in params.items())
    body += b"\x00"
    return _STARTUP_HEADER.pack(len(body) + 8, protocol) + body


def build_cancel_request(pid: int, key: bytes) -> bytes:
    return _STARTUP_HEADER.pack(12 + len(key), CANCEL_REQUEST_CODE) + _INT32.pack(pid) + key


def build_authentication_ok() -> bytes:
    return build_message(b"R", _INT32.pack(0))


def build_parameter_status(name: str, value: str) -> bytes:
    return build_message(b"S", _encode(name) + b"\x00" + _encode(value) + b"\x00")


def build_backend_key_data(pid: int, key: bytes) -> bytes:
    return build_message(b"K", _INT32.pack(pid) + key)


def build_ready_for_query(status: bytes = b"I") -> bytes:
    return build_message(b"Z", status)


_TEXT_OID: Final = 25


def build_row_description(columns: Sequence[str]) -> bytes:
    """RowDescription for text columns (type ``text``, format text)."""
    out = [struct.pack("!h", len(columns))]
    for name in columns:
        out.append(_encode(name) + b"\x00" + struct.pack("!ihihih", 0, 0, _TEXT_OID, -1, -1, 0))
    return build_message(b"T", b"".join(out))


def build_data_row(values: Iterable[str | None]) -> bytes:
    cells = list(values)
    out = [struct.pack("!h", len(cells))]
    for value in cells:
        if value is None:
            out.append(_INT32.pack(-1))
        else:
            raw = _encode(value)
            out.append(_INT32.pack(len(raw)) + raw)
    return build_message(b"D", b"".join(out))


def build_command_complete(tag: str) -> bytes:
    return build_message(b"C", _encode(tag) + b"\x00")


def build_empty_query_response() -> bytes:
    return build_message(b"I")


# Authentication request codes (protocol-message-formats: AuthenticationSASL and its steps).
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12
# PostgreSQL's words for a frontend message it cannot parse (pqformat.c).
INVALID_MESSAGE_FORMAT: Final = "invalid message format"
_INT16 = struct.Struct("!h")


def build_authentication_sasl(mechanisms: Sequence[str]) -> bytes:
    """AuthenticationSASL: the mechanisms offered, each NUL-terminated, then an empty one."""
    names = b"".join(m.encode() + b"\x00" for m in mechanisms) + b"\x00"
    return build_message(b"R", _INT32.pack(AUTH_SASL) + names)


def build_authentication_sasl_continue(data: bytes) -> bytes:
    return build_message(b"R", _INT32.pack(AUTH_SASL_CONTINUE) + data)


def build_authentication_sasl_final(data: bytes) -> bytes:
    return build_message(b"R", _INT32.pack(AUTH_SASL_FINAL) + data)


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    """SASLInitialResponse: (mechanism, initial data). Raises ProtocolViolation when malformed."""
    mech_end = body.find(b"\x00")
    if mech_end < 0 or len(body) < mech_end + 5:
        raise ProtocolViolation("malformed SASLInitialResponse message")
    mechanism = body[:mech_end].decode("utf-8", "replace")
    (length,) = _INT32.unpack_from(body, mech_end + 1)
    data = body[mech_end + 5 :]
    if length != len(data):
        raise ProtocolViolation("malformed SASLInitialResponse message")
    return mechanism, data


def read_cstring(body: bytes, pos: int) -> tuple[str, int]:
    """The NUL-terminated UTF-8 string at ``pos`` and the position after it.

    Raises ProtocolViolation (PostgreSQL's "invalid message format") when there is none.
    """
    end = body.find(b"\x00", pos)
    if end < 0:
        raise ProtocolViolation(INVALID_MESSAGE_FORMAT)
    try:
        return body[pos:end].decode("utf-8"), end + 1
    except UnicodeDecodeError:
        raise ProtocolViolation(INVALID_MESSAGE_FORMAT) from None


def parse_bind(body: bytes) -> tuple[str, str, int]:
    """Bind: (portal, statement, number of parameters). Raises ProtocolViolation when malformed."""
    portal, pos = read_cstring(body, 0)
    statement, pos = read_cstring(body, pos)
    try:
        (nformats,) = _INT16.unpack_from(body, pos)
        pos += 2 + 2 * max(nformats, 0)
        (nparams,) = _INT16.unpack_from(body, pos)
    except struct.error:
        raise ProtocolViolation(INVALID_MESSAGE_FORMAT) from None
    return portal, statement, nparams


def build_parameter_description(count: int = 0) -> bytes:
    """ParameterDescription for a statement with ``count`` parameters, all of unspecified type."""
    return build_message(b"t", _INT16.pack(count) + b"\x00\x00\x00\x00" * count)
