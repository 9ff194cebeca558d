"""The relay tests that hand sockets over, again on uvloop (pgguard runs on uvloop; the rest of
the suite on asyncio's loop): the hand-over takes the descriptors from either loop's transports."""

from __future__ import annotations

import asyncio

import pytest

uvloop = pytest.importorskip("uvloop")

from test_relay import (  # noqa: E402,F401 - the fixtures and tests, collected again here
    app,
    direct,
    relay,
    relay_kind,
    test_client_leaving_mid_query_cancels_it_and_frees_the_slot,
    test_client_reset_mid_query_cancels_it_and_frees_the_slot,
    test_copy_in_and_out_of_several_megabytes,
    test_kill_mid_result_gives_a_clean_fatal,
    test_live_sessions_use_the_relay_asked_for,
    test_many_sessions_at_once_each_get_their_own_bytes,
    test_query_cancel_asyncpg_timeout,
    test_server_ending_the_session_closes_the_client_and_frees_the_slot,
)

# pytest-asyncio deprecates this override for a conftest hook (pytest_asyncio_loop_factories),
# which applies to a whole directory; test_the_loop_is_uvloop notices if it stops working.
pytestmark = pytest.mark.filterwarnings("ignore:Overriding the \"event_loop_policy\" fixture")


@pytest.fixture(scope="module")
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    return uvloop.EventLoopPolicy()  # type: ignore[no-any-return]


async def test_the_loop_is_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
