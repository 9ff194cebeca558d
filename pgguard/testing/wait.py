"""Bounded polling for tests: wait until a condition holds, or fail naming what was awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["wait_until", "await_until"]


def wait_until(check: Callable[[], bool], *, timeout: float = 10.0, what: str, interval: float = 0.01) -> None:
    """Poll ``check`` until it is true; raise TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def await_until(
    check: Callable[[], bool | Awaitable[bool]], *, timeout: float = 10.0, what: str, interval: float = 0.01
) -> None:
    """Async form of ``wait_until``; ``check`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
