"""export/serve.py as a process, the way a user, systemd, Docker or Kubernetes runs it: it starts on a free loopback
port, stops on SIGTERM or Ctrl-C (SIGINT to its process group) with exit 0 within seconds and leaves no Ray process
behind, starts on a busy machine, and refuses bad arguments in one line before Ray starts.

Every run gets a private Ray temp dir (RAY_TMPDIR) and its own session (start_new_session): its Ray processes are
found by session id, so nothing of another developer's is ever looked at or killed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from ccr_ray.net import free_port
from tests.conftest import REPO

pytestmark = pytest.mark.ray

STOP_S = 20  # SIGTERM to exit: generous (it takes 3-6 s here, 10-18 s when the whole group is signalled)
START_S = 300  # start-up to answering /healthz (15-40 s here; a busy machine takes longer)


def session_processes(sid: int) -> list[int]:
    """Live (non-zombie) processes of a session: the server and every Ray process it started."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != sid:
                continue
            with open(f"/proc/{entry}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(int(entry))
        except OSError:
            continue
    return out


def wait_for(condition, timeout: float, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


class Server:
    """export/serve.py in its own session, with a private Ray temp dir; output in a log file."""

    def __init__(self, model: dict, extra: tuple[str, ...] = (), stale_address: str | None = None,
                 prefix: str = ""):
        self.port, self.prefix = free_port(), prefix
        self.temp = tempfile.mkdtemp(prefix="ccrcli-", dir="/tmp")  # short: Ray's socket paths have a length limit
        if stale_address:  # what `ray start` leaves behind when its cluster dies without `ray stop`
            (Path(self.temp) / "ray").mkdir()
            (Path(self.temp) / "ray" / "ray_current_cluster").write_text(stale_address)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=self.temp, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
        self.log = Path(self.temp) / "serve.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "export" / "serve.py"), "--model", model["model"], "--index",
                 model["exact"], "--port", str(self.port), *extra],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        return self.log.read_text()

    def healthy(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.port}{self.prefix}/healthz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def wait_serving(self, timeout: float = START_S) -> float:
        started = time.monotonic()
        # it says so once it has seen its own /healthz answer: wait for the line, then check the endpoint
        serving = f"serving ccr-ray on http://127.0.0.1:{self.port}{self.prefix}/"
        assert wait_for(lambda: self.proc.poll() is not None or serving in self.output, timeout, every=0.5), \
            f"not serving after {timeout} s:\n{self.output[-3000:]}"
        assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.output[-3000:]}"
        assert self.healthy()
        return time.monotonic() - started

    def stop(self, sig: int, group: bool = False) -> tuple[int, float]:
        started = time.monotonic()
        (os.killpg if group else os.kill)(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - started

    def cleanup(self) -> None:
        """Kill what is left of this server's session (only it: found by its session id), remove its temp dir."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for pid in session_processes(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


def assert_stopped_cleanly(server: Server, code: int | None, seconds: float) -> None:
    output = server.output
    assert code == 0, f"exit {code} after {seconds:.1f} s (bound {STOP_S} s):\n{output[-3000:]}"
    assert output.rstrip().endswith("stopped"), output[-2000:]
    assert "Traceback" not in output and "failed to shut down" not in output, output[-3000:]
    # every Ray process of the server's session goes with it (bounded wait: the kernel reaps them in a moment)
    assert wait_for(lambda: not session_processes(server.proc.pid), 30), \
        f"left behind: {session_processes(server.proc.pid)}"


def test_sigterm_stops_the_service_cleanly_and_a_stale_cluster_address_does_not_hang_it(demo_model):
    """SIGTERM (systemd, Docker, Kubernetes) stops it in seconds, exit 0, no Ray process left. It starts beside a
    `ray_current_cluster` file naming a dead cluster (a `ray start` that died without `ray stop`): a warning and a
    fresh local Ray, not "Failed to connect to GCS" forever. `--route-prefix /api/` means /api (Serve refused the
    trailing slash after Ray had started)."""
    dead = f"127.0.0.1:{free_port()}"
    server = Server(demo_model, ("--route-prefix", "/api/"), stale_address=dead, prefix="/api")
    try:
        up = server.wait_serving()
        assert f"({dead}) is not running" in server.output and "starting a local Ray" in server.output
        code, seconds = server.stop(signal.SIGTERM)
        print(f"serving after {up:.0f} s; SIGTERM -> exit {code} in {seconds:.1f} s")
        assert_stopped_cleanly(server, code, seconds)
    finally:
        server.cleanup()


@pytest.mark.slow
@pytest.mark.cpu_hogs
def test_a_busy_machine_starts_the_service_and_ctrl_c_stops_it(demo_model):
    """Two CPU-bound processes beside it (`yes > /dev/null` x2): start-up waits for Serve's proxy instead of giving
    up on it (ccr_ray/serve/ray_env.py); then Ctrl-C, i.e. SIGINT to the whole foreground process group."""
    burners = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(2)]
    try:
        server = Server(demo_model)
        try:
            up = server.wait_serving()
        finally:
            for burner in burners:
                burner.kill()
                burner.wait(timeout=30)
        try:
            code, seconds = server.stop(signal.SIGINT, group=True)
            print(f"busy machine: serving after {up:.0f} s; Ctrl-C -> exit {code} in {seconds:.1f} s")
            assert_stopped_cleanly(server, code, seconds)
        finally:
            server.cleanup()
    finally:
        for burner in burners:
            if burner.poll() is None:
                burner.kill()


@pytest.mark.parametrize("args, message", [
    (["--route-prefix", "/a b"], "--route-prefix: "),
    (["--name", " "], "--name: empty"),
    (["--start-timeout", "0"], "--start-timeout: "),
    (["--replicas", "64", "--num-cpus", "1"], "--replicas 64 x --num-cpus 1.0 need 64 CPUs"),
    (["--port", "{taken}"], "--host/--port: cannot listen on 127.0.0.1:{taken}"),
    (["--host", "no-such-host.invalid"], "--host/--port: cannot listen on no-such-host.invalid:"),
    ([], "RAY_ADDRESS=127.0.0.1:{dead}: no Ray cluster answers there"),
])
def test_bad_arguments_fail_in_one_line_before_ray_starts(args, message, demo_model, tmp_path):
    """No RAY_ADDRESS (unless the case sets a dead one) and a private Ray temp dir: the address file another
    developer's `ray start` wrote is never read, so no case can attach to (or deploy on) anyone's cluster."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        values = {"taken": taken.getsockname()[1], "dead": free_port()}
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=str(tmp_path), HF_HUB_OFFLINE="1")
        if message.startswith("RAY_ADDRESS"):
            env["RAY_ADDRESS"] = f"127.0.0.1:{values['dead']}"
        args = [a.format(**values) for a in args]
        if "--port" not in args:
            args += ["--port", str(free_port())]
        # bounded: no Ray start-up and no wait on a dead address (each case takes a few seconds of imports)
        done = subprocess.run([sys.executable, str(REPO / "export" / "serve.py"), "--model", demo_model["model"],
                               "--index", demo_model["exact"], *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
    err = done.stderr.strip()
    assert done.returncode == 2 and err.startswith("error: " + message.format(**values)), err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "ray").exists()  # no Ray session was started
