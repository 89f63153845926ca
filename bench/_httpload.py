"""Closed-loop HTTP load for the serving benchmarks: N clients, each with its own keep-alive HTTP/1.1 connection
(aiohttp, one connection per client), each sending its next request when the previous answer arrived.

    result = run_closed_loop("http://127.0.0.1:8000", requests_for, clients=8, seconds=10)

`requests_for(i)` returns the i-th request as (kind, method, path, kwargs for aiohttp's `request`, expected): the
kind labels it in the per-kind counts, `expected` is "ok" (a 2xx) or "4xx" (a deliberate bad request, which must be
answered with a 4xx). Latencies are those of the requests answered as expected.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

Request = tuple[str, str, str, dict, str]


def percentiles(latencies) -> dict:
    if not len(latencies):
        return {}
    ms = np.asarray(latencies) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "mean_ms": round(float(ms.mean()), 2)}


async def closed_loop(url: str, requests_for: Callable[[int], Request], clients: int, seconds: float,
                      max_requests: int | None = None, warmup: int = 20, window_s: float | None = None,
                      on_window: Callable[[dict], None] | None = None) -> dict:
    """Run the load for `seconds` (or `max_requests`), after `warmup` requests on one connection. With
    `window_s`, `on_window` gets each window's summary (throughput, latencies, errors) as it closes."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=60)
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=timeout)
                for _ in range(clients)]
    latencies: list[float] = []
    times: list[float] = []  # completion time of each answered-as-expected request
    unexpected: list[dict] = []
    kinds: Counter = Counter()
    bad_answered_4xx = 0
    issued = 0

    async def one(session, i: int, record: bool = True) -> None:
        nonlocal bad_answered_4xx
        kind, method, path, kwargs, expected = requests_for(i)
        start = time.perf_counter()
        status, body = -1, b""
        try:
            async with session.request(method, url + path, **kwargs) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            body = repr(err).encode()
        end = time.perf_counter()
        ok = 200 <= status < 300 if expected == "ok" else 400 <= status < 500
        if not record:
            return
        kinds[kind] += 1
        if ok:
            latencies.append(end - start)
            times.append(end)
            if expected == "4xx":
                bad_answered_4xx += 1
        else:
            unexpected.append({"kind": kind, "path": path, "status": status, "expected": expected,
                               "body": body[:300].decode("utf-8", "replace")})

    try:
        for i in range(warmup):
            await one(sessions[0], i, record=False)
        started = time.perf_counter()
        deadline = started + seconds

        async def client(session) -> None:
            nonlocal issued
            while time.perf_counter() < deadline and (max_requests is None or issued < max_requests):
                issued += 1
                await one(session, warmup + issued)

        async def windows() -> None:
            if not window_s or on_window is None:
                return
            begin, lat_at, err_at, k = started, 0, 0, 1
            while started + k * window_s <= deadline + 1e-6:  # window k closes at started + k * window_s
                await asyncio.sleep(max(0.0, started + k * window_s - time.perf_counter()))
                k += 1
                end = time.perf_counter()
                window = latencies[lat_at:]
                on_window({"start_s": round(begin - started, 1), "seconds": round(end - begin, 2),
                           "requests": len(window), "requests_per_s": round(len(window) / (end - begin), 1),
                           "unexpected": len(unexpected) - err_at, **percentiles(window)})
                begin, lat_at, err_at = end, len(latencies), len(unexpected)

        watcher = asyncio.ensure_future(windows())
        await asyncio.gather(*(client(s) for s in sessions))
        elapsed = time.perf_counter() - started
        await asyncio.wait_for(watcher, (window_s or 0) + 30)  # the last window closes at the deadline
    finally:
        for session in sessions:
            await session.close()
    return {"clients": clients, "requests": len(latencies), "errors": len(unexpected),
            "seconds": round(elapsed, 2), "requests_per_s": round(len(latencies) / elapsed, 1),
            **percentiles(latencies), "kinds": dict(kinds), "bad_requests_answered_4xx": bad_answered_4xx,
            "unexpected": unexpected[:20]}


def run_closed_loop(url: str, requests_for: Callable[[int], Request], clients: int, seconds: float,
                    **kwargs) -> dict:
    return asyncio.run(closed_loop(url, requests_for, clients, seconds, **kwargs))


def search_requests(pool: list[tuple[str, str]], k: int = 10) -> Callable[[int], Request]:
    """POST /search with the pool's captions in turn (caption, language)."""
    def make(i: int) -> Request:
        text, lang = pool[i % len(pool)]
        return "search", "POST", "/search", {"json": {"text": text, "lang": lang, "k": k}}, "ok"

    return make
