"""Background work in a server process: an async job run every so many seconds until stopped.
A failure is logged and the job runs again at its next turn."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger("authgate.background")


class Periodic:
    def __init__(self, name: str, job: Callable[[], Awaitable[Any]], interval: float) -> None:
        self.name = name
        self.job = job
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.job()
            except Exception:  # noqa: BLE001 - keep the job alive; the cause is logged
                log.exception("background job failed", job=self.name)
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self.interval)
            except TimeoutError:
                pass

    def start(self) -> Periodic:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.name)
        return self

    async def stop(self) -> None:
        """Let the job end its turn, and wait for it. A job cancelled with the process (a
        forced exit) is stopped already."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait((self._task,))
            if not self._task.cancelled():
                self._task.result()
