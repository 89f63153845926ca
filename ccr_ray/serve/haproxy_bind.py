"""Serve's HAProxy, started with every listener on the HTTP frontend's address.

Ray Serve's HAProxy config (ray/serve/_private/haproxy_templates.py) binds the service on the HTTP options' host but
its stats page (`bind *:8404`) and Prometheus listener (`bind :9101`) on every interface. `ccr_ray.serve.ray_env.
local_ingress_env` points `RAY_SERVE_HAPROXY_BINARY_PATH` at a launcher that runs this module with HAProxy's
arguments: when the `http_frontend` binds a specific address (127.0.0.1 for a local service), the config file named
by `-f` is rewritten in place to bind those two listeners there too, then the real binary (`CCR_RAY_HAPROXY_BINARY`)
replaces this process (same pid, same arguments: Serve's manager finds its HAProxy by the config path in its
command line). With an all-interfaces HTTP host the file is left as it is.

    python -m ccr_ray.serve.haproxy_bind -db -f /tmp/haproxy-serve/<node>/haproxy.cfg [...]
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
from pathlib import Path

FRONTEND = re.compile(r"^frontend http_frontend\s*\n\s+bind (\S+):(\d+)", re.M)
ANY_ADDRESS_BIND = re.compile(r"^(\s*bind )(?:\*)?:(\d+)(\s*)$", re.M)
ALL_INTERFACES = {"*", "", "0.0.0.0", "::"}


def loopback_binds(config: str) -> str:
    """The config with every all-interfaces `bind` on the HTTP frontend's address, if that is a specific one."""
    frontend = FRONTEND.search(config)
    if frontend is None or frontend.group(1) in ALL_INTERFACES:
        return config
    host = frontend.group(1)
    return ANY_ADDRESS_BIND.sub(lambda m: f"{m.group(1)}{host}:{m.group(2)}{m.group(3)}", config)


def rewrite(path: str) -> None:
    with open(path + ".lock", "w") as lock:  # Serve's manager writes the file under this lock
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            text = Path(path).read_text()
            changed = loopback_binds(text)
            if changed != text:
                Path(path).write_text(changed)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    real = os.environ.get("CCR_RAY_HAPROXY_BINARY")
    if not real:
        print("haproxy_bind: CCR_RAY_HAPROXY_BINARY is not set", file=sys.stderr)
        return 2
    if "-f" in argv and argv.index("-f") + 1 < len(argv):
        rewrite(argv[argv.index("-f") + 1])
    os.execv(real, [real, *argv])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
