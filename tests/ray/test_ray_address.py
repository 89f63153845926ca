"""A job that starts Ray after a `ray start` cluster died without `ray stop`: the address that cluster left in Ray's
temp dir names nobody, and a plain `ray.init()` printed "Failed to connect to GCS at address ..." for ever.
`jobs/prepare_data.py` as a subprocess, in a private Ray temp dir (RAY_TMPDIR) holding such a stale address file:
it warns once and runs on a fresh local Ray, in bounded time. A dead RAY_ADDRESS fails in one line, before any Ray
work. (The rule itself, without Ray: tests/unit/test_ray_address.py; export/serve.py: tests/serve/test_serve_cli.py.)"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ccr_ray.data import schema
from ccr_ray.ray_utils import WORKER_NICENESS_ENV
from tests.conftest import REPO
from tests.unit.test_converters import seeds_fixture

pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def private_ray_tmp():
    temp = Path(tempfile.mkdtemp(prefix="ccrra-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    (temp / "ray").mkdir()
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


def prepare(tmp_path: Path, ray_tmp: Path, **env) -> subprocess.CompletedProcess:
    path_json, data = seeds_fixture(tmp_path, k_folds=2, per_fold=2)
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environ.update(RAY_TMPDIR=str(ray_tmp), HF_HUB_OFFLINE="1", CCR_RAY_HOME=str(tmp_path / "home"), **env)
    # bounded: it used to retry the dead address for ever; a local Ray and this tiny job take well under a minute
    return subprocess.run([sys.executable, str(REPO / "jobs" / "prepare_data.py"), "seeds", "--out",
                           str(tmp_path / "out"), "--path-json", str(path_json), "--data-root", str(data),
                           "--images-as", "path", "--shard-size", "4"],
                          cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)


def test_a_stale_cluster_address_gets_a_warning_and_a_local_ray(tmp_path, private_ray_tmp):
    dead = f"127.0.0.1:{free_port()}"
    (private_ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    done = prepare(tmp_path, private_ray_tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and f"({dead}) is not running" in warnings[0], done.stderr[-3000:]
    assert "Failed to connect" not in done.stderr
    assert schema.load_manifest(tmp_path / "out").splits["test"].folds == 2


def test_a_dead_ray_address_fails_in_one_line_before_any_ray_work(tmp_path, private_ray_tmp):
    dead = f"127.0.0.1:{free_port()}"
    done = prepare(tmp_path, private_ray_tmp, RAY_ADDRESS=dead)
    err = done.stderr.strip()
    assert done.returncode == 2 and err.splitlines()[-1] == (
        f"error: RAY_ADDRESS={dead}: no Ray cluster answers there (start it, or unset RAY_ADDRESS to run on a new "
        "local Ray)"), err[-3000:]
    assert "Traceback" not in err
    assert not list((private_ray_tmp / "ray").glob("session_*"))  # no Ray was started


def test_a_jobs_own_local_ray_runs_its_workers_at_the_jobs_priority(private_ray_tmp):
    """Ray starts workers at nice 15 (ray_utils.own_worker_priority has why that starved a service beside two busy
    processes): a job started with `nice -n 5` that starts its own local Ray gets workers at 5, not 19."""
    code = ("import os, ray\n"
            "from ccr_ray.ray_utils import ensure_ray\n"
            "ensure_ray(log_to_driver=False, address='local')\n"
            "print('worker niceness', ray.get(ray.remote(lambda: os.nice(0)).remote()), 'driver', os.nice(0))\n"
            "ray.shutdown()\n")
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", WORKER_NICENESS_ENV)}
    environ.update(RAY_TMPDIR=str(private_ray_tmp))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=300, preexec_fn=lambda: os.nice(5))
    assert "worker niceness 5 driver 5" in done.stdout, (done.stdout, done.stderr[-3000:])
