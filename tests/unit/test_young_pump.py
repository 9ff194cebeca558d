"""YoungPump's framing: the native relay may only start on a message boundary of the server."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from pgguard.pump import YoungPump

_message = st.tuples(
    st.sampled_from(b"ZDTCEANS1"), st.binary(max_size=40)
).map(lambda m: bytes([m[0]]) + struct.pack("!I", len(m[1]) + 4) + m[1])


def _pump() -> YoungPump:
    return YoungPump(None, None, promote_at=0.0)  # type: ignore[arg-type]  # framing only


@given(st.lists(_message, min_size=1, max_size=20), st.data())
def test_ready_is_reported_exactly_at_the_end_of_a_ready_for_query(messages: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(messages)
    ends, pos = set(), 0
    for m in messages:
        pos += len(m)
        if m[0] == ord("Z"):
            ends.add(pos)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream)), max_size=12))) | {len(stream)})
    pump, start = _pump(), 0
    for cut in cuts:
        assert pump._at_ready(stream[start:cut]) == (cut in ends), (start, cut)
        start = cut


def test_a_malformed_length_stops_the_framing_for_good() -> None:
    pump = _pump()
    assert not pump._at_ready(b"D\x00\x00\x00\x02")
    assert not pump._at_ready(b"Z\x00\x00\x00\x05I")
    assert pump.promote_at == float("inf")
