"""Work that runs to its end when its caller is cancelled (core/completion.py)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from authgate.core.completion import completed


async def test_completed_gives_the_result_and_the_error_of_its_work():
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def failing() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("the store said no")

    assert await completed(answer()) == 42
    with pytest.raises(RuntimeError, match="the store said no"):
        await completed(failing())


async def test_a_cancelled_caller_waits_for_the_work_then_is_cancelled():
    steps: list[str] = []

    async def write() -> None:
        steps.append("started")
        await asyncio.sleep(0.05)
        steps.append("written")

    task = asyncio.create_task(completed(write()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps == ["started", "written"]


async def test_the_error_of_a_cancelled_callers_work_is_not_left_unretrieved():
    """The caller is told of its cancellation; the work's own error is not reported as a
    task exception nobody retrieved."""
    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))

    async def failing() -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("the store said no")

    try:
        task = asyncio.create_task(completed(failing()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert reported == []
