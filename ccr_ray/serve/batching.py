"""Request batching for the service's replicas that costs nothing when there is nothing to batch.

    arrivals = Arrivals()                      # requests accepted, not yet handed to a batcher
    search = Batcher(service.search_texts, max_batch_size=16, wait_s=0.005, arrivals=arrivals)
    (hits,) = [await search((text, lang, k))]  # one item in, its result out

A batcher runs `fn(items) -> results` (one result per item, in order) in a worker thread, one batch at a time, so
the event loop keeps accepting, parsing and queueing requests while onnxruntime and faiss compute. A batch starts
as soon as the worker is free and takes everything already waiting, up to `max_batch_size`. It waits, up to
`wait_s`, only for requests the replica has accepted that are still on their way to a batcher (`Arrivals`):
a lone request starts at once, instead of paying Serve's `@serve.batch` wait (5 ms by default, measured in
bench/serve.py) for company that is not coming.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any


class Arrivals:
    """How many requests that may need a batcher are between the HTTP layer and one. The ASGI middleware calls
    `begin()` when such a request comes in and `end(token)` when it leaves; `Batcher.__call__` calls `reached()` as
    the request joins a queue. Counting is best effort: it only decides whether a batch waits (bounded) or not."""

    _current: ContextVar[list | None] = ContextVar("ccr_ray_arrival", default=None)

    def __init__(self) -> None:
        self.count = 0
        self.waiters: set[asyncio.Event] = set()  # batchers waiting on arrivals: woken when one arrives or leaves

    def begin(self):
        token = [True]
        self.count += 1
        return token, self._current.set(token)

    def reached(self) -> None:
        token = self._current.get()
        if token is not None and token[0]:
            token[0] = False
            self.count -= 1
            for event in self.waiters:  # a batcher waiting for it, if it joined another, stops waiting
                event.set()

    def end(self, handle) -> None:
        token, reset = handle
        if token[0]:  # it never reached a batcher (refused, or not batched): whoever waited for it stops
            token[0] = False
            self.count -= 1
            for event in self.waiters:
                event.set()
        try:
            self._current.reset(reset)
        except ValueError:  # ended from another context than it began in: the token is done with all the same
            pass


class Batcher:
    """`await batcher(item)` -> fn's result for that item; see the module docstring. `max_batch_size` and `wait_s`
    may be changed at any time (a Serve `user_config` update); the next batch uses them."""

    def __init__(self, fn: Callable[[list], Sequence], max_batch_size: int = 16, wait_s: float = 0.005,
                 arrivals: Arrivals | None = None, name: str = "batch"):
        self.fn, self.name = fn, name
        self.max_batch_size, self.wait_s = max_batch_size, wait_s
        self.arrivals = arrivals
        self._queue: deque[tuple[Any, asyncio.Future]] = deque()
        self._grew: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.batches = 0  # counters for /healthz and the benchmark
        self.items = 0
        self.waited_s = 0.0

    async def __call__(self, item):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((item, future))
        if self.arrivals is not None:
            self.arrivals.reached()
        if self._grew is not None:
            self._grew.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run())
        return await future

    def _expecting(self) -> bool:
        return self.arrivals is not None and self.arrivals.count > 0

    async def _run(self) -> None:
        self._grew = asyncio.Event()
        while self._queue:
            size, wait = max(1, int(self.max_batch_size)), float(self.wait_s)
            if wait > 0 and len(self._queue) < size and self._expecting():
                started = time.perf_counter()
                deadline = started + wait
                self.arrivals.waiters.add(self._grew)
                try:
                    while len(self._queue) < size and self._expecting():
                        left = deadline - time.perf_counter()
                        if left <= 0:
                            break
                        self._grew.clear()
                        try:
                            await asyncio.wait_for(self._grew.wait(), left)
                        except asyncio.TimeoutError:
                            break
                finally:
                    self.arrivals.waiters.discard(self._grew)
                self.waited_s += time.perf_counter() - started
            batch = [self._queue.popleft() for _ in range(min(size, len(self._queue)))]
            batch = [(item, future) for item, future in batch if not future.cancelled()]
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
            except Exception as err:  # noqa: BLE001 - every caller of the batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            finally:
                self.batches += 1
                self.items += len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    def stats(self) -> dict:
        return {"batches": self.batches, "items": self.items,
                "mean_batch": round(self.items / self.batches, 2) if self.batches else None,
                "waited_ms": round(self.waited_s * 1000, 1)}


class CountArrivals:
    """ASGI middleware: counts the requests that may need a batcher (every POST, and a GET carrying a page query
    `q=`) in `ARRIVALS` from the moment they come in until they reach a batcher or leave."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope["method"] != "POST" and b"q=" not in scope.get("query_string", b"")):
            return await self.app(scope, receive, send)
        arrival = ARRIVALS.begin()
        try:
            return await self.app(scope, receive, send)
        finally:
            ARRIVALS.end(arrival)


# The process's arrivals: a Serve replica's HTTP middleware counts them, its batchers read them. Refer to it as
# `batching.ARRIVALS` (a module attribute): Serve ships a deployment's methods by value, and a global name they
# imported would be pickled with them as a copy.
ARRIVALS = Arrivals()
