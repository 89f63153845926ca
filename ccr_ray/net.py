"""A free TCP port that nothing on this machine is about to take.

`bind(("127.0.0.1", 0))` hands out a port from the kernel's ephemeral range, the same range every outgoing
connection (Ray's gRPC clients, HTTP load) draws its local port from: between closing the probe socket and a server
binding the port, a connection can take it ("Address already in use", seen when a test's HAProxy started on a busy
2-core machine). A port below that range and above Ray's worker ports (10002-19999) is only ever taken by a listener
that asked for it, so a probe that binds it says what a server will find.
"""

from __future__ import annotations

import random
import socket

RAY_WORKER_PORTS_END = 19999
FALLBACK_EPHEMERAL_START = 32768


def ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return FALLBACK_EPHEMERAL_START


def can_bind(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port `host` can bind now, outside the ephemeral range where possible (the kernel's choice otherwise)."""
    low, high = RAY_WORKER_PORTS_END + 1, ephemeral_start() - 1
    for port in random.sample(range(low, high + 1), min(tries, max(high - low + 1, 0))):
        if can_bind(port, host):
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
