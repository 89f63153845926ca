"""The service's request batching (ccr_ray/serve/batching.py) and HAProxy's listener rewrite
(ccr_ray/serve/haproxy_bind.py), without Ray: a lone request starts at once, a busy worker's queue becomes the next
batch, the wait is only for requests on their way, errors reach every caller of the batch, live settings apply."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ccr_ray.serve import haproxy_bind, ray_env
from ccr_ray.serve.batching import Arrivals, Batcher


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


class Recorder:
    """fn for a Batcher: records each batch; can be held (the worker stays busy until released)."""

    def __init__(self):
        self.batches: list[list] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def __call__(self, items):
        self.entered.set()
        self.release.wait(10)
        self.batches.append(list(items))
        return [f"r{item}" for item in items]


def test_a_lone_request_runs_at_once_even_with_a_long_wait():
    fn = Recorder()
    batcher = Batcher(fn, max_batch_size=16, wait_s=60.0, arrivals=Arrivals())  # a wait that would time the test out
    assert run(batcher(1)) == "r1"
    assert fn.batches == [[1]] and batcher.waited_s == 0.0


def test_requests_queued_while_the_worker_is_busy_form_the_next_batch_up_to_the_size():
    async def scenario():
        fn = Recorder()
        fn.release.clear()
        batcher = Batcher(fn, max_batch_size=3, wait_s=0.0)
        first = asyncio.ensure_future(batcher(0))
        while not fn.entered.is_set():  # the worker holds item 0
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher(i)) for i in range(1, 6)]
        await asyncio.sleep(0.01)
        fn.release.set()
        return fn, await asyncio.gather(first, *rest)

    fn, results = run(scenario())
    assert results == [f"r{i}" for i in range(6)]
    assert fn.batches == [[0], [1, 2, 3], [4, 5]]


def test_the_wait_is_only_for_requests_on_their_way():
    async def scenario():
        arrivals = Arrivals()
        fn = Recorder()
        batcher = Batcher(fn, max_batch_size=8, wait_s=5.0, arrivals=arrivals)

        async def refused():  # a request accepted by the HTTP layer that never reaches a batcher
            handle = arrivals.begin()
            try:
                await asyncio.sleep(0.05)  # reading its body, say; then it is refused: the wait ends
            finally:
                arrivals.end(handle)
            return "refused"

        got = await asyncio.gather(refused(), batcher(1))
        return fn, batcher, got

    fn, batcher, got = run(scenario())
    assert got == ["refused", "r1"] and fn.batches == [[1]]
    assert 0.03 < batcher.waited_s < 2.0  # waited for the arrival, not the whole 5 s


def test_a_request_on_its_way_joins_the_batch_it_was_waited_for():
    async def scenario():
        arrivals = Arrivals()
        fn = Recorder()
        batcher = Batcher(fn, max_batch_size=8, wait_s=5.0, arrivals=arrivals)

        async def request(item, delay):
            handle = arrivals.begin()
            try:
                await asyncio.sleep(delay)
                return await batcher(item)
            finally:
                arrivals.end(handle)

        results = await asyncio.gather(request(1, 0.0), request(2, 0.05))
        return fn, results

    fn, results = run(scenario())
    assert results == ["r1", "r2"] and fn.batches == [[1, 2]]


def test_an_error_reaches_every_caller_of_the_batch_and_the_batcher_keeps_working():
    calls = []

    def fn(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("boom")
        return [x.upper() for x in items]

    async def scenario():
        batcher = Batcher(fn, max_batch_size=4, wait_s=0.0)
        out = await asyncio.gather(batcher("bad"), return_exceptions=True)
        return out, await batcher("ok")

    out, after = run(scenario())
    assert isinstance(out[0], ValueError) and after == "OK" and calls == [["bad"], ["ok"]]


def test_a_wrong_number_of_results_is_an_error_not_a_hang():
    batcher = Batcher(lambda items: [], max_batch_size=4)
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        run(batcher("x"))


def test_settings_changed_live_apply_to_the_next_batch():
    async def scenario():
        fn = Recorder()
        fn.release.clear()
        batcher = Batcher(fn, max_batch_size=16, wait_s=0.0)
        first = asyncio.ensure_future(batcher(0))
        while not fn.entered.is_set():
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher(i)) for i in range(1, 5)]
        await asyncio.sleep(0.01)
        batcher.max_batch_size = 1  # a user_config update while requests wait
        fn.release.set()
        await asyncio.gather(first, *rest)
        return fn

    assert run(scenario()).batches == [[0], [1], [2], [3], [4]]


CONFIG = """global
    maxconn 4096
frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind {host}:8100
    acl healthcheck path -i /-/healthz
backend http-ccr-ray
    server SERVE_REPLICA_x 127.0.0.1:30000 check
listen stats
  bind *:8404
  stats enable
"""


def test_haproxy_side_listeners_follow_a_loopback_http_frontend():
    changed = haproxy_bind.loopback_binds(CONFIG.format(host="127.0.0.1"))
    assert "    bind 127.0.0.1:9101\n" in changed and "  bind 127.0.0.1:8404\n" in changed
    assert "    bind 127.0.0.1:8100\n" in changed and "server SERVE_REPLICA_x 127.0.0.1:30000" in changed
    for host in ("*", "0.0.0.0"):  # a service bound everywhere: left as Serve wrote it
        assert haproxy_bind.loopback_binds(CONFIG.format(host=host)) == CONFIG.format(host=host)


def test_the_launcher_rewrites_the_config_in_place_and_runs_the_real_binary(tmp_path, monkeypatch):
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG.format(host="127.0.0.1"))
    ran = []
    monkeypatch.setenv("CCR_RAY_HAPROXY_BINARY", "/opt/haproxy")
    monkeypatch.setattr(haproxy_bind.os, "execv", lambda path, argv: ran.append((path, argv)))
    haproxy_bind.main(["-db", "-f", str(config), "-dR"])
    assert ran == [("/opt/haproxy", ["/opt/haproxy", "-db", "-f", str(config), "-dR"])]
    assert "bind *:8404" not in config.read_text() and "bind 127.0.0.1:8404" in config.read_text()


def test_local_ingress_env_picks_free_ports_and_keeps_a_users_choice(tmp_path):
    env = {"RAY_SERVE_HAPROXY_STATS_PORT": "18404", "CCR_RAY_HAPROXY_BINARY": "/bin/true"}
    applied = ray_env.apply_serve_env(env)
    assert applied["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and applied["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "60"
    values = ray_env.local_ingress_env(tmp_path, env)
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404" and "RAY_SERVE_HAPROXY_STATS_PORT" not in values
    assert int(env["RAY_SERVE_HAPROXY_METRICS_PORT"]) > 0 and int(env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]) > 0
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "5"  # one machine: HAProxy drops it in a second
    launcher = tmp_path / "haproxy"
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == str(launcher) and launcher.stat().st_mode & 0o111
    assert "ccr_ray.serve.haproxy_bind" in launcher.read_text()
    # RAY_SERVE_ENABLE_HA_PROXY=0 keeps Serve's Python proxy, and then nothing else is set
    off = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    ray_env.apply_serve_env(off)
    assert off["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and ray_env.local_ingress_env(tmp_path, off) == {}
