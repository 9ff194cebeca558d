"""wire.py: the startup reader, message framing and the reply builders, with no socket in sight."""

from __future__ import annotations

import struct
from collections.abc import Iterable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pgguard import wire
from pgguard.errors import NoUserName, ProtocolViolation, UnsupportedProtocol
from pgguard.wire import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    NEED_DATA,
    PROTOCOL_3_0,
    PROTOCOL_3_2,
    SSL_REQUEST_CODE,
    CancelRequest,
    GSSENCRequest,
    MessageReader,
    SSLRequest,
    StartupMessage,
    StartupReader,
)

# ---------------------------------------------------------------------------- encoders
# Written here from the protocol documentation rather than with wire's own builders, so a
# bug shared by the builder and the parser cannot hide itself.


def _packet(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!ii", 8 + len(body), code) + body


def _startup(params: dict[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return _packet(protocol, body)


def _cancel(pid: int, key: bytes) -> bytes:
    return _packet(CANCEL_REQUEST_CODE, struct.pack("!i", pid) + key)


def _drain(reader: StartupReader) -> list[wire.Packet]:
    out: list[wire.Packet] = []
    while True:
        packet = reader.next_packet()
        if packet is NEED_DATA:
            return out
        assert not isinstance(packet, wire._NeedData)
        out.append(packet)


def _parse_in_chunks(data: bytes, cuts: Iterable[int]) -> list[wire.Packet]:
    reader = StartupReader()
    out: list[wire.Packet] = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        reader.feed(data[start:cut])
        start = cut
        out += _drain(reader)
    assert reader.buffered == 0
    return out


# --------------------------------------------------------------------------- strategies

_name_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
_names = st.text(_name_chars, min_size=1, max_size=20)
_values = st.text(_name_chars, max_size=40)


@st.composite
def _startup_messages(draw: st.DrawFn) -> tuple[bytes, StartupMessage]:
    params = draw(st.dictionaries(_names.filter(lambda n: n != "user"), _values, max_size=6))
    params = {"user": draw(_names), **params}
    protocol = draw(st.sampled_from([PROTOCOL_3_0, PROTOCOL_3_2]))
    raw = _startup(params, protocol)
    return raw, StartupMessage(protocol=protocol, params=params, raw=raw)


@st.composite
def _cancel_requests(draw: st.DrawFn) -> tuple[bytes, CancelRequest]:
    pid = draw(st.integers(-(2**31), 2**31 - 1))
    # 4 bytes is protocol 3.0; 3.2 (PostgreSQL 18) allows keys up to 256 bytes.
    key = draw(st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=5, max_size=256)))
    raw = _cancel(pid, key)
    return raw, CancelRequest(pid=pid, key=key, raw=raw)


_packets = st.one_of(
    st.just((_packet(SSL_REQUEST_CODE), SSLRequest())),
    st.just((_packet(GSSENC_REQUEST_CODE), GSSENCRequest())),
    _cancel_requests(),
    _startup_messages(),
)


@st.composite
def _streams(draw: st.DrawFn) -> tuple[bytes, list[wire.Packet], list[int]]:
    items = draw(st.lists(_packets, min_size=1, max_size=8))
    data = b"".join(raw for raw, _ in items)
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=12))
    return data, [p for _, p in items], cuts


# ------------------------------------------------------------------ stream properties


@given(_streams())
@settings(max_examples=300)
def test_stream_split_anywhere_parses_like_whole(stream: tuple[bytes, list[wire.Packet], list[int]]) -> None:
    data, expected, cuts = stream
    whole = _parse_in_chunks(data, [])
    assert whole == expected
    assert _parse_in_chunks(data, cuts) == expected


@given(_streams())
@settings(max_examples=50)
def test_stream_fed_one_byte_at_a_time_parses_like_whole(
    stream: tuple[bytes, list[wire.Packet], list[int]],
) -> None:
    data, expected, _ = stream
    assert _parse_in_chunks(data, range(len(data))) == expected


def _feed_garbage(data: bytes, cuts: list[int]) -> None:
    """Feed ``data`` in pieces, pulling packets; only ProtocolViolation may escape."""
    reader = StartupReader()
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        reader.feed(data[start:cut])
        start = cut
        try:
            _drain(reader)
        except ProtocolViolation:
            return


_codes = st.one_of(
    st.sampled_from(
        [PROTOCOL_3_0, PROTOCOL_3_2, SSL_REQUEST_CODE, GSSENC_REQUEST_CODE, CANCEL_REQUEST_CODE, 0x20000]
    ),
    st.integers(0, 2**32 - 1),
)


@st.composite
def _plausible_garbage(draw: st.DrawFn) -> bytes:
    """A valid-looking header (often with a consistent length) over a random body."""
    body = draw(st.binary(max_size=300))
    code = draw(_codes)
    length = draw(st.one_of(st.just(8 + len(body)), st.integers(-(2**31), 2**31 - 1)))
    tail = draw(st.binary(max_size=20))
    return struct.pack("!iI", length, code) + body + tail


@given(
    st.one_of(st.binary(max_size=400), _plausible_garbage()),
    st.lists(st.integers(0, 500), max_size=6),
)
@settings(max_examples=500)
@example(b"\x00\x00\x00\x08\x00\x03\x00\x00", [])  # no parameters, no terminator
@example(b"\x00\x00\x00\x09\x00\x03\x00\x00\x00", [])  # only the terminator: no user
@example(b"\x00\x00\x00\x0c\x00\x03\x00\x00user", [])  # name without its NUL
@example(b"\x00\x00\x00\x0e\x00\x03\x00\x00user\x00x", [])  # value without its NUL
@example(b"\x00\x00\x00\x0d\x00\x03\x00\x00\xff\xfe\x00\x00\x00", [])  # undecodable name
def test_garbage_raises_only_protocol_violation(data: bytes, cuts: list[int]) -> None:
    _feed_garbage(data, cuts)


@given(_startup_messages(), st.integers(0, 30), st.binary(min_size=1, max_size=30))
def test_corrupted_startup_message_raises_only_protocol_violation(
    msg: tuple[bytes, StartupMessage], at: int, junk: bytes
) -> None:
    raw = bytearray(msg[0])
    at = 4 + at % (len(raw) - 4)  # keep the length so the packet is read and parsed
    raw[at : at + len(junk)] = junk[: len(raw) - at]
    _feed_garbage(bytes(raw), [])


# ---------------------------------------------------------------------- single packets


def test_startup_message_fields_and_database_default() -> None:
    raw = _startup({"user": "app", "application_name": "x", "options": "-c a=b"})
    reader = StartupReader()
    reader.feed(raw + b"Qtail")
    packet = reader.next_packet()
    assert isinstance(packet, StartupMessage)
    assert packet.protocol == PROTOCOL_3_0
    assert packet.user == "app"
    assert packet.database == "app"  # PostgreSQL's default: the user name
    assert packet.application_name == "x"
    assert packet.raw == raw
    assert not packet.is_replication
    assert reader.take_rest() == b"Qtail"
    assert reader.buffered == 0


def test_startup_message_with_database_and_replication() -> None:
    reader = StartupReader()
    reader.feed(_startup({"user": "app", "database": "limdb", "replication": "true"}, PROTOCOL_3_2))
    packet = reader.next_packet()
    assert isinstance(packet, StartupMessage)
    assert (packet.protocol, packet.database, packet.is_replication) == (PROTOCOL_3_2, "limdb", True)


def test_empty_database_defaults_to_user() -> None:
    reader = StartupReader()
    reader.feed(_startup({"user": "app", "database": ""}))
    packet = reader.next_packet()
    assert isinstance(packet, StartupMessage) and packet.database == "app"


def _parse(raw: bytes) -> StartupMessage:
    reader = StartupReader()
    reader.feed(raw)
    packet = reader.next_packet()
    assert isinstance(packet, StartupMessage)
    return packet


def test_user_and_database_are_cut_to_63_bytes_as_the_postmaster_cuts_them() -> None:
    long_role, long_db = "r" * 63, "d" * 63
    raw = _startup({"user": long_role + "x" * 20, "database": long_db + "y" * 4000,
                    "application_name": "a" * 100})  # fmt: skip
    packet = _parse(raw)
    assert (packet.user, packet.database) == (long_role, long_db)
    assert packet.application_name == "a" * 100  # only the two names are cut
    assert packet.raw == raw  # what the server gets is the client's packet (it cuts itself)
    # The database defaults to the user, then both are cut (postmaster.c's order).
    assert _parse(_startup({"user": long_role + "zz"})).database == long_role
    # 63 bytes exactly: unchanged.
    assert _parse(_startup({"user": long_role})).user == long_role


def test_name_cut_inside_a_multibyte_character_keeps_the_63_bytes() -> None:
    """The postmaster knows no encoding yet: it cuts bytes, leaving half a character, and
    looks that up (no role matches: CREATE ROLE clips names to whole characters). pgguard
    keeps the same 63 bytes, so it counts exactly the name the server logs in as."""
    name = ("a" * 62 + "\u00e9" + "b").encode()  # the two bytes of e-acute straddle byte 63
    user = _parse(_startup({"user": name.decode()})).user
    assert user.encode("utf-8", "surrogateescape") == name[:63]
    assert user.startswith("a" * 62) and len(user) == 63  # 62 letters and one escaped byte


def test_cancel_request_3_0_and_3_2_keys() -> None:
    reader = StartupReader()
    reader.feed(_cancel(4242, b"\x01\x02\x03\x04") + _cancel(7, bytes(range(32))))
    first, second = _drain(reader)
    assert first == CancelRequest(pid=4242, key=b"\x01\x02\x03\x04", raw=_cancel(4242, b"\x01\x02\x03\x04"))
    assert isinstance(second, CancelRequest) and second.key == bytes(range(32))


@pytest.mark.parametrize("key_length", [0, 3, 257])
def test_cancel_request_with_bad_key_length_is_silent(key_length: int) -> None:
    reader = StartupReader()
    reader.feed(_cancel(1, b"k" * key_length))
    with pytest.raises(ProtocolViolation) as info:
        reader.next_packet()
    assert info.value.silent


@pytest.mark.parametrize("code", [SSL_REQUEST_CODE, GSSENC_REQUEST_CODE])
def test_ssl_and_gssenc_request_must_be_8_bytes(code: int) -> None:
    reader = StartupReader()
    reader.feed(_packet(code, b"\0\0\0\0"))
    with pytest.raises(ProtocolViolation) as info:
        reader.next_packet()
    assert info.value.silent


@pytest.mark.parametrize("length", [-1, 0, 4, 7, 10001, 2**31 - 1])
def test_bad_startup_length_is_silent(length: int) -> None:
    reader = StartupReader()
    reader.feed(struct.pack("!i", length))
    with pytest.raises(ProtocolViolation) as info:
        reader.next_packet()
    assert info.value.silent
    assert type(info.value) is ProtocolViolation


def test_length_limits_are_inclusive() -> None:
    """8 and 10000 bytes are accepted (pqcomm.h bounds); only outside them is an error."""
    name = "u" * (10000 - 8 - len(b"application_name\0") - len(b"user\0u\0") - 2)
    raw = _startup({"user": "u", "application_name": name})
    assert len(raw) == 10000
    reader = StartupReader()
    reader.feed(raw)
    packet = reader.next_packet()
    assert isinstance(packet, StartupMessage) and packet.application_name == name
    reader.feed(_packet(SSL_REQUEST_CODE))
    assert reader.next_packet() == SSLRequest()


def test_truncated_packet_needs_data() -> None:
    raw = _startup({"user": "app"})
    reader = StartupReader()
    for i in range(len(raw) - 1):
        reader.feed(raw[i : i + 1])
        assert reader.next_packet() is NEED_DATA
    reader.feed(raw[-1:])
    assert isinstance(reader.next_packet(), StartupMessage)


@pytest.mark.parametrize(
    "params", [{}, {"database": "limdb"}, {"user": ""}, {"user": "", "database": "x"}]
)
def test_no_user_is_28000(params: dict[str, str]) -> None:
    reader = StartupReader()
    reader.feed(_startup(params))
    with pytest.raises(NoUserName) as info:
        reader.next_packet()
    assert info.value.sqlstate == "28000"
    assert info.value.message == "no PostgreSQL user name specified in startup packet"
    assert not info.value.silent


def test_protocol_2_is_0a000_naming_what_pgguard_supports() -> None:
    reader = StartupReader()
    reader.feed(_startup({"user": "app"}, protocol=2 << 16))
    with pytest.raises(UnsupportedProtocol) as info:
        reader.next_packet()
    assert info.value.sqlstate == "0A000"
    assert info.value.message == "unsupported frontend protocol 2.0: server supports 3.0 to 3.2"
    assert not info.value.silent


def test_missing_terminator_is_a_violation() -> None:
    body = b"user\0app\0"  # no final NUL
    reader = StartupReader()
    reader.feed(_packet(PROTOCOL_3_0, body))
    with pytest.raises(ProtocolViolation):
        reader.next_packet()


# ------------------------------------------------------------------------- builders

# design.md §4, PostgreSQL 15's bytes for role "app" minus AuthenticationOk and F/L/R.
APP_ROLE_REJECTION = (
    b"E\x00\x00\x00\x3f"
    b"SFATAL\x00"
    b"VFATAL\x00"
    b"C53300\x00"
    b'Mtoo many connections for role "app"\x00'
    b"\x00"
)


def test_error_response_bytes_for_role_app_match_design() -> None:
    built = wire.build_error_response("53300", 'too many connections for role "app"')
    assert built == APP_ROLE_REJECTION
    assert struct.unpack("!I", built[1:5])[0] == len(built) - 1
    fields = wire.parse_error_fields(built[5:])
    assert set(fields) == {"S", "V", "C", "M"}


def test_error_response_with_detail_appends_d_field() -> None:
    built = wire.build_error_response("53300", "m", detail="why")
    assert built.endswith(b"Mm\x00Dwhy\x00\x00")
    assert wire.parse_error_fields(built[5:]) == {"S": "FATAL", "V": "FATAL", "C": "53300", "M": "m", "D": "why"}


def test_small_builders() -> None:
    assert wire.build_authentication_ok() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert wire.build_ready_for_query() == b"Z\x00\x00\x00\x05I"
    assert wire.build_command_complete("SELECT 1") == b"C\x00\x00\x00\x0dSELECT 1\x00"
    assert wire.build_empty_query_response() == b"I\x00\x00\x00\x04"
    assert wire.build_parameter_status("a", "b") == b"S\x00\x00\x00\x08a\x00b\x00"
    assert wire.build_backend_key_data(5, b"abcd") == b"K\x00\x00\x00\x0c\x00\x00\x00\x05abcd"
    assert wire.build_data_row(["x", None]) == (
        b"D\x00\x00\x00\x0f\x00\x02\x00\x00\x00\x01x\xff\xff\xff\xff"
    )
    assert wire.TERMINATE == b"X\x00\x00\x00\x04"


def test_builders_round_trip_through_the_reader() -> None:
    reader = StartupReader()
    reader.feed(
        wire.build_startup_message({"user": "app", "database": "limdb"})
        + wire.build_cancel_request(9, b"\xff" * 4)
    )
    startup, cancel = _drain(reader)
    assert isinstance(startup, StartupMessage) and startup.params == {"user": "app", "database": "limdb"}
    assert isinstance(cancel, CancelRequest) and (cancel.pid, cancel.key) == (9, b"\xff" * 4)
    assert wire.parse_backend_key_data(wire.build_backend_key_data(77, b"k" * 32)[5:]) == (77, b"k" * 32)
    with pytest.raises(ProtocolViolation):
        wire.parse_backend_key_data(b"\0\0\0\1")


def test_row_description_layout() -> None:
    built = wire.build_row_description(["name"])
    assert built[:1] == b"T"
    assert struct.unpack("!I", built[1:5])[0] == len(built) - 1
    assert built[5:7] == b"\x00\x01"
    assert built[7:12] == b"name\x00"
    assert struct.unpack("!ihihih", built[12:]) == (0, 0, 25, -1, -1, 0)


# ----------------------------------------------------------------------- MessageReader

_messages = st.lists(
    st.tuples(st.sampled_from([b"R", b"S", b"K", b"Z", b"E", b"D", b"T"]), st.binary(max_size=200)),
    max_size=10,
)


@given(_messages, st.lists(st.integers(0, 3000), max_size=10))
@settings(max_examples=200)
def test_message_reader_frames_split_stream(messages: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    data = b"".join(wire.build_message(t, b) for t, b in messages)
    reader = MessageReader()
    out: list[tuple[bytes, bytes]] = []
    start = 0
    for cut in sorted({min(c, len(data)) for c in cuts}) + [len(data)]:
        reader.feed(data[start:cut])
        start = cut
        while (m := reader.next_message()) is not NEED_DATA:
            assert isinstance(m, tuple)
            out.append(m)
    assert out == messages
    assert reader.take_rest() == b""


def test_message_reader_keeps_the_rest() -> None:
    reader = MessageReader()
    reader.feed(wire.build_ready_for_query(b"T") + b"Q\x00\x00")
    assert reader.next_message() == (b"Z", b"T")
    assert reader.next_message() is NEED_DATA
    assert reader.take_rest() == b"Q\x00\x00"
    assert reader.next_message() is NEED_DATA


@pytest.mark.parametrize("length", [0, 3, 0x7FFFFFFF])
def test_message_reader_rejects_bad_length(length: int) -> None:
    reader = MessageReader()
    reader.feed(b"D" + struct.pack("!I", length))
    with pytest.raises(ProtocolViolation):
        reader.next_message()


@given(st.binary(max_size=300))
def test_message_reader_garbage_raises_only_protocol_violation(data: bytes) -> None:
    reader = MessageReader()
    reader.feed(data)
    try:
        while reader.next_message() is not NEED_DATA:
            pass
    except ProtocolViolation:
        pass
