"""Work that must reach its end once started, whether or not its caller is still waiting.

A write whose answer decides what comes next (an attempt admitted, a success or a failure
counted) may be committed by the store after the caller was cancelled (a client gone, a
shutdown). If the caller gave up at once, it could not tell whether the write took place, and
would undo it twice or not at all. Awaited here, the write runs to its end; the cancellation
is raised after, once the caller knows what happened.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def finishing(awaitable: Awaitable[T]) -> tuple[asyncio.Future[T], bool]:
    """Await to the end even if cancelled meanwhile. Returns the finished future and whether
    a cancellation arrived, for the caller to raise once it has dealt with the outcome."""
    future = asyncio.ensure_future(awaitable)
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait((future,))
        except asyncio.CancelledError:
            cancelled = True
    return future, cancelled


async def completed(awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, awaited to its end; a cancellation that arrived meanwhile is
    raised after it."""
    future, cancelled = await finishing(awaitable)
    if cancelled:
        if not future.cancelled():
            future.exception()  # retrieved: the caller is told of its cancellation instead
        raise asyncio.CancelledError
    return future.result()
