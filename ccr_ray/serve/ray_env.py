"""Ray Serve settings the service needs on every cluster it runs on, in one place.

Serve gives up on an HTTP proxy that is slow to start: its controller asks the new proxy actor whether it is
ready with a 5-second timeout (`RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S`, ray/serve/_private/constants.py), and
after three failed checks in a row kills it and starts another. On a busy machine (2 cores beside two busy
processes) a proxy's worker process can take longer than that to start, `serve.start` then fails with
"ActorDiedError: ... ProxyActor ... killed by `ray.kill` ... never ran", and a service that did start can lose its
proxy to a health check that timed out (`RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S`, 10 s). With these values start-up
waits instead: a proxy gets 60 s per readiness check (x3 before it is replaced, longer for each restart) and 30 s
per health check. A proxy that truly fails still fails; it is only given time.

Serve reads them in its controller and proxy processes, which inherit the environment of the process that
started Ray: `export/serve.py` and the test fixtures set them before `ray.init` starts a local Ray
(`apply_serve_env`); on a cluster they belong in the environment `ray start` runs with (cluster/kuberay/
rayservice.yaml sets them on every pod; cluster/serve/serve_config.yaml carries them in its runtime_env, which
reaches the replicas only, and says so). tests/unit/test_cluster_configs.py checks both files carry them.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",  # Serve's default: 5
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",  # Serve's default: 10
}


def apply_serve_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set every SERVE_ENV value the environment does not already set (a user's own value wins); call it before
    Ray starts. Returns the values in effect."""
    environ = os.environ if environ is None else environ
    for key, value in SERVE_ENV.items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in SERVE_ENV}
