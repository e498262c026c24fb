"""Back-pressure for slow work: at most ``max_concurrency`` jobs run (in worker threads, never on the
event loop), at most ``queue_size`` wait; a full queue is refused at once (429), every job has a
deadline (504), and a job whose client went away is dropped from the queue or stopped.

A running job is stopped cooperatively: it receives a :class:`Token` and calls ``token.check()``
between units of work (the explainer's ``progress`` callback, after every scored chunk), which raises
:class:`Cancelled` once the deadline has passed or the client disconnected, so the remaining chunks
are never computed.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class Cancelled(Exception):
    """A job stopped early: its deadline passed (``reason='timeout'``) or its client left."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class QueueFull(Exception):
    """Every worker is busy and the queue is full; ``retry_after`` is a guess in whole seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy (queue full); retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


class Token:
    """What a running job checks between chunks: its deadline and its client's presence."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._cancelled = threading.Event()
        self.reason = ""
        self.steps = 0

    def cancel(self, reason: str) -> None:
        if not self._cancelled.is_set():
            self.reason = reason
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise :class:`Cancelled` if the job must stop now."""
        if self._cancelled.is_set():
            raise Cancelled(self.reason)
        if time.monotonic() >= self.deadline:
            self.cancel("timeout")
            raise Cancelled("timeout")


class Scheduler:
    """A bounded queue in front of a fixed pool of worker threads.

    Args:
        max_concurrency: jobs running at once (worker threads).
        queue_size: jobs waiting for a worker; one more is refused with :class:`QueueFull`.
        on_change: called (on the event loop) with ``(queued, running)`` whenever either changes.
    """

    def __init__(self, max_concurrency: int = 1, queue_size: int = 16,
                 on_change: Callable[[int, int], None] | None = None) -> None:
        if max_concurrency < 1 or queue_size < 0:
            raise ValueError("max_concurrency must be >= 1 and queue_size >= 0")
        self.max_concurrency = max_concurrency
        self.queue_size = queue_size
        self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="explain")
        self._sem: asyncio.Semaphore | None = None
        self.queued = 0
        self.running = 0
        self.closing = False
        self._avg_seconds = 1.0  # moving average of a job's run time, for Retry-After
        self._on_change = on_change or (lambda q, r: None)

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:  # made on the running loop
            self._sem = asyncio.Semaphore(self.max_concurrency)
        return self._sem

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead divided over the workers."""
        ahead = (self.queued + self.running) / self.max_concurrency
        return max(1, math.ceil(self._avg_seconds * ahead))

    def _changed(self) -> None:
        self._on_change(self.queued, self.running)

    async def run(self, fn: Callable[[Token], Any], timeout: float,
                  disconnected: Callable[[], Awaitable[bool]] | None = None, poll: float = 0.1) -> Any:
        """Run ``fn(token)`` in a worker thread within ``timeout`` seconds of now (queue time included).

        Raises :class:`QueueFull`, :class:`ShuttingDown`, or :class:`Cancelled` (``timeout`` when the
        deadline passed, ``disconnected`` when ``await disconnected()`` turned true first).
        """
        if self.closing:
            raise ShuttingDown("the server is shutting down")
        sem = self._semaphore()
        if (sem.locked() or self.queued) and self.queued >= self.queue_size:
            raise QueueFull(self.retry_after())
        token = Token(time.monotonic() + timeout)
        job = asyncio.ensure_future(self._queue_and_run(sem, fn, token))
        try:
            while True:
                done, _ = await asyncio.wait({job}, timeout=min(poll, max(token.remaining(), 0.0)))
                if done:
                    return job.result()
                if token.remaining() <= 0:
                    token.cancel("timeout")
                    raise Cancelled("timeout")
                if disconnected is not None and await disconnected():
                    token.cancel("disconnected")
                    raise Cancelled("disconnected")
        finally:
            if not job.done():
                job.cancel()  # still queued: leaves the queue; running: the token stops it at its next check

    async def _queue_and_run(self, sem: asyncio.Semaphore, fn: Callable[[Token], Any], token: Token) -> Any:
        self.queued += 1
        self._changed()
        try:
            await sem.acquire()
        finally:
            self.queued -= 1
            self._changed()
        loop = asyncio.get_running_loop()
        self.running += 1
        self._changed()
        t0 = time.monotonic()

        def release(_fut) -> None:  # when the thread is really done, not when the waiter gave up
            self.running -= 1
            self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * (time.monotonic() - t0)
            sem.release()
            self._changed()

        fut = loop.run_in_executor(self.pool, self._call, fn, token)
        fut.add_done_callback(release)
        return await asyncio.shield(fut)

    @staticmethod
    def _call(fn: Callable[[Token], Any], token: Token) -> Any:
        token.check()  # it may have waited past its deadline, or its client may have left
        return fn(token)

    async def drain(self, timeout: float) -> None:
        """Stop taking work and wait (at most ``timeout`` s) for the running jobs to end."""
        self.closing = True
        end = time.monotonic() + timeout
        while (self.running or self.queued) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        self.pool.shutdown(wait=False, cancel_futures=True)
