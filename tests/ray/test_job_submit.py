"""`ray job submit ... -- python jobs/train_stage.py --stage le` against a two-node cluster on this machine (`ray
start --head` and a second node joined with `ray start --address`, both on loopback) with token authentication on:
the client with the token is served and its stage runs one Train worker on each node; a client without the token
(or with a wrong one) is refused.

The cluster runs with a private HOME (its token lives in HOME/.ray/auth_token) and is stopped by killing its own
process groups: `ray stop` would kill every Ray process on the machine.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, micro_config

pytestmark = pytest.mark.ray
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def head(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    temp = f"/tmp/ccrjob-{os.getpid()}"
    procs = []
    try:
        address, gcs = start_head(env, temp, tmp_path / "head.log", procs)
        start_worker_node(address, env, gcs, tmp_path / "worker.log", procs)
        yield address, env, home
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):  # a try that exited left nothing (or its children)
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=5)  # with 30 s here the teardown took 31.8 s: a node outlived SIGTERM
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", temp])


def start_head(env, temp, log_path, procs, attempts=2):
    """`ray start --head` on loopback; (dashboard address, GCS port) once an authenticated client is served. A
    head that exits on its own (a port taken between free_port() and Ray binding it) is started again on fresh
    ports."""
    for tries in range(1, attempts + 1):
        dashboard, gcs = free_port(), free_port()
        with log_path.open("ab") as log:
            log.write(f"--- try {tries}: GCS port {gcs}, dashboard port {dashboard}\n".encode())
            log.flush()
            # loopback only: both nodes bind 127.0.0.1, the dashboard and job server too; every port is picked
            # here (the client server's default 10001 may belong to someone else on a shared CI host)
            proc = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
                 f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
                 f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                 "--num-cpus=1", f"--temp-dir={temp}", "--disable-usage-stats"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        address = f"http://127.0.0.1:{dashboard}"
        outcome = wait_until_served(address, env, proc)
        if outcome == "served":
            return address, gcs
        if outcome == "timeout":  # alive but not serving: another try would only add a second head
            break
    pytest.fail(f"ray start --head did not come up ({tries} tries)\n" + diagnosis(log_path, temp))


def diagnosis(log_path, temp=None, lines=40) -> str:
    """The tail of the `ray start` output and of the session's GCS/dashboard logs, for a failure message."""
    parts = [f"--- {log_path.name}", *log_path.read_text(errors="replace").splitlines()[-lines:]]
    if temp:
        for name in ("gcs_server.err", "gcs_server.out", "dashboard.log", "dashboard.err", "raylet.err"):
            for f in sorted(Path(temp).glob(f"session_latest/logs/{name}")):
                parts += [f"--- {name}", *f.read_text(errors="replace").splitlines()[-lines:]]
    return "\n".join(parts)


def ray_cli(env, *args) -> subprocess.CompletedProcess | None:
    """`ray ARGS` as an authenticated client; None when it hangs past 60 s (a busy head): the caller polls."""
    try:
        return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True,
                              env={**env, "RAY_AUTH_MODE": "token"}, timeout=60)
    except subprocess.TimeoutExpired:
        return None


def wait_until_served(address, env, proc, timeout=300) -> str:
    """"served" once an authenticated client can list jobs, "exited" if the head process ends first, else
    "timeout" (one CI run on 2 busy cores did not see it served within the 120 s this waited before)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return "exited"
        probe = ray_cli(env, "job", "list", "--address", address)
        if probe is not None and probe.returncode == 0:
            return "served"
        time.sleep(2)
    return "timeout"


def start_worker_node(address, env, gcs, log_path, procs, attempts=3):
    """A second node (`ray start --address`), started again when it exits before joining: on a busy machine its
    raylet can miss Ray's fixed 30-s registration wait (ccr_ray/ray_utils.py start_with_retries)."""
    for tries in range(1, attempts + 1):
        with log_path.open("ab") as log:
            log.write(f"--- try {tries}\n".encode())
            log.flush()
            worker = subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", f"--address=127.0.0.1:{gcs}",
                 "--node-ip-address=127.0.0.1", "--num-cpus=1",
                 f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"],
                env={**env, "RAY_AUTH_MODE": "token"}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        procs.append(worker)
        if wait_for_nodes(address, env, 2, worker, log_path):
            return
    pytest.fail(f"the second node did not join ({attempts} tries)\n" + diagnosis(log_path))


def wait_for_nodes(address, env, count, worker, log_path, timeout=300) -> bool:
    """The cluster has `count` alive nodes (asked through the dashboard's state API, with the token): True; False
    when `worker` exited first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        listed = ray_cli(env, "list", "nodes", "--address", address, "--format", "json")
        # before the first node registers, the state API prints "No resource in the cluster", not JSON
        if listed is not None and listed.returncode == 0 and listed.stdout.lstrip().startswith("["):
            if sum(n.get("state") == "ALIVE" for n in json.loads(listed.stdout)) >= count:
                return True
        if worker.poll() is not None:
            return False
        time.sleep(2)
    pytest.fail(f"the cluster did not reach {count} nodes\n" + diagnosis(log_path))


def submit(address, env, *job, extra_env=None, timeout=600):
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--", *job]
    return subprocess.run(cmd, env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=timeout)


def test_job_submit_with_token_trains_le_and_without_is_refused(head, micro_data, tmp_path):
    from ccr_ray.stages import resolve_config
    from ccr_ray.train.state import TrainState

    address, env, home = head
    run_home = tmp_path / "runs-home"
    config = tmp_path / "micro.json"
    # two workers, one per node (STRICT_SPREAD cannot be placed otherwise)
    config.write_text(json.dumps(micro_config(
        micro_data, str(run_home), train={"max_steps": 2, "eval_every": 2},
        scaling={"num_workers": 2, "cpus_per_worker": 0.5, "placement_strategy": "STRICT_SPREAD"})))
    tokenizer = os.path.join(micro_data, "tokenizer")
    # parents made without Ray (random weights are enough to exercise the job path)
    clip = resolve_config("clip", str(config))
    TrainState.create(clip, tokenizer, None, "cpu").save(clip.stage_dir("clip") / "checkpoint")
    nlt = resolve_config("nlt", str(config))
    TrainState.create(nlt, tokenizer, str(clip.stage_dir("clip") / "checkpoint"), "cpu").save(
        nlt.stage_dir("nlt") / "checkpoint")

    job = ["python", "jobs/train_stage.py", "--stage", "le", "--config", str(config)]
    refused = submit(address, env, *job, timeout=120)
    assert refused.returncode != 0
    assert "authentication" in (refused.stdout + refused.stderr).lower()
    wrong = submit(address, env, *job, extra_env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, timeout=120)
    assert wrong.returncode != 0 and "invalid" in (wrong.stdout + wrong.stderr).lower()
    assert not (run_home / "runs" / "t" / "le").exists()

    ok = submit(address, env, *job, extra_env={"RAY_AUTH_MODE": "token"})
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
    assert "succeeded" in ok.stdout + ok.stderr
    assert (run_home / "runs" / "t" / "le" / "checkpoint" / "model.safetensors").exists()
    assert "[le] output checkpoint" in ok.stdout + ok.stderr
