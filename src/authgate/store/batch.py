"""Calls of one kind asked for at once, answered by one statement.

Every bearer request reads its session to know it is still live, and every refresh rotates its
token. On PostgreSQL each is a round trip, and under load the round trip costs the event loop
far more than the row: a send that wakes a backend, a reply to parse, a connection taken and
kept, a task woken; on SQLite a statement's own cost (its WAL read lock, its cursor) is still
most of a one-row read. Calls asked for in the same turn of the event loop go out together
when the loop next runs its callbacks, as one statement for all their keys. Nothing is cached:
each call is sent after its caller asked for it, so it sees everything committed before, as a
statement of its own would.

A batch may also cap how many of its statements are out at once (``in_flight``): the calls
asked for while the cap is reached wait for one to come back and then go out together. Where
the event loop is the bottleneck, each statement's own cost (a send that wakes a backend, a
reply to read) is then shared by more callers. A statement that comes back hands its place to
the oldest held one, which is sent before its own callers are answered: the next statement is
in the database while the event loop answers them.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MAX_KEYS = 100  # callers in one statement; more start another


class Failed:
    """What a batch gives for one caller whose call failed alone: that caller gets ``error``
    raised, the others their values."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class Batched(Generic[K, V]):
    """``await get(key)``: what ``run`` gives for ``key``, run with the keys of every other
    ``get`` of the same turn of the loop. ``run`` gives one value (or None, or ``Failed``) per
    key, in order; a key asked for twice is given to it twice, so every caller gets a value of
    its own, which no other caller can change. A failed run fails each of its callers; a caller
    that gives up before its key is sent is left out of the run, and does not disturb the
    others."""

    __slots__ = ("_run", "_limit", "_in_flight", "_pending", "_running", "_out", "_held")

    def __init__(self, run: Callable[[list[K]], Awaitable[Sequence[V | Failed | None]]], *,
                 limit: int = MAX_KEYS, in_flight: int | None = None) -> None:
        self._run = run
        self._limit = limit
        self._in_flight = in_flight  # runs out at once at most (None: no cap)
        self._pending: list[tuple[K, asyncio.Future[V | None]]] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._out = 0  # runs sent or about to be, not yet answered
        self._held: deque[list[tuple[K, asyncio.Future[V | None]]]] = deque()

    async def get(self, key: K) -> V | None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[V | None] = loop.create_future()
        pending = self._pending
        if pending is None or len(pending) >= self._limit:
            pending = self._pending = []
            if self._in_flight is None or self._out < self._in_flight:
                self._out += 1
                loop.call_soon(self._send, pending, context=contextvars.Context())
            else:  # sent when a run comes back; callers join it until then
                self._held.append(pending)
        pending.append((key, waiter))
        return await waiter

    def _send(self, pending: list[tuple[K, asyncio.Future[V | None]]]) -> None:
        if self._pending is pending:
            self._pending = None
        # In a context of its own: the run belongs to no one caller's request.
        task = asyncio.get_running_loop().create_task(self._answer(pending),
                                                      context=contextvars.Context())
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _release(self) -> None:
        """A run came back: its place goes to the oldest held one, sent now (self._out
        unchanged), or is given up."""
        if self._held:
            self._send(self._held.popleft())
        else:
            self._out -= 1

    async def _answer(self, pending: list[tuple[K, asyncio.Future[V | None]]]) -> None:
        released = False
        try:
            waiting = [(key, waiter) for key, waiter in pending if not waiter.done()]
            if not waiting:
                return
            try:
                found = await self._run([key for key, _ in waiting])
            except asyncio.CancelledError:
                for _, waiter in waiting:
                    waiter.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - every caller is told
                for _, waiter in waiting:
                    if not waiter.done():
                        waiter.set_exception(exc)
                return
            # The next run's task is made before these callers are woken, so it is sent
            # first: it is in the database while the loop answers them.
            released = True
            self._release()
            self._give(waiting, found)
        finally:
            if not released:
                self._release()

    def _give(self, waiting: list[tuple[K, asyncio.Future[V | None]]],
              found: Sequence[V | Failed | None]) -> None:
        """Each caller its value, or the error of its own call."""
        if len(found) != len(waiting):  # a run that broke its contract fails its callers
            found = [None] * len(waiting)
            error: Exception | None = RuntimeError(
                "the batch did not give one value per key")
        else:
            error = None
        for (_, waiter), value in zip(waiting, found):
            if waiter.done():
                continue
            if error is not None:
                waiter.set_exception(error)
            elif isinstance(value, Failed):
                waiter.set_exception(value.error)
            else:
                waiter.set_result(value)

    async def close(self) -> None:
        """Wait for the calls asked for so far: those already sent, those held back by the cap,
        and those the loop sends on its next turn."""
        while self._pending is not None or self._out:
            if self._running:  # asyncio.wait: giving up on close cancels no caller's call
                await asyncio.wait(set(self._running))
            else:
                await asyncio.sleep(0)
