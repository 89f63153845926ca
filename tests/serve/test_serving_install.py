"""A serving install: `pip install '.[serve]'` (not editable, with the pins) into a fresh venv brings no torch,
open_clip or transformers, and from there `export/serve.py` answers a search over HTTP exactly as the
development install does. Slow (a real install, ~1-2 minutes): deselect with -m 'not slow'."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import requests

from ccr_ray.net import free_port
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TRAINING_STACK = ("torch", "torchvision", "open_clip", "transformers", "timm", "safetensors", "onnxscript")


def du(path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory):
    venv = tmp_path_factory.mktemp("serving") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    started = time.perf_counter()
    result = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(REPO / "constraints.txt"),
                             f"{REPO}[serve]"], capture_output=True, text=True, timeout=900, env=env, cwd=venv.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"serving install: {time.perf_counter() - started:.0f}s, {du(venv) / 2**20:.0f} MiB "
          f"(this development venv: {du(sys.prefix) / 2**20:.0f} MiB)")
    return venv


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port` (IPv4 /proc/net/tcp; IPv6 reported as such)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)) if width == 8 else
                          f"ipv6:{address}")
    return found


def run_in(venv, code: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def test_the_serving_install_has_no_training_stack(serving_venv, tmp_path):
    code = ("import importlib.util, json, ccr_ray, faiss, onnxruntime, ray.serve, fastapi; "
            f"print(json.dumps({{'missing': [m for m in {TRAINING_STACK!r} if importlib.util.find_spec(m) is None],"
            " 'ccr_ray': ccr_ray.__file__}))")
    result = run_in(serving_venv, code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["missing"] == list(TRAINING_STACK), f"installed: {set(TRAINING_STACK) - set(report['missing'])}"
    assert report["ccr_ray"].startswith(str(serving_venv)), report  # the installed copy, not this checkout


def test_the_serving_install_answers_a_search(serving_venv, demo_model, tmp_path):
    from ccr_ray import runtime as rt
    from ccr_ray.inference.index import Index

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    ray_tmp = tempfile.mkdtemp(prefix="ccrsi-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env["RAY_TMPDIR"] = ray_tmp
    command = [str(serving_venv / "bin" / "python"), str(REPO / "export" / "serve.py"), "--model", demo_model["model"],
               "--index", demo_model["hnsw"], "--images", demo_model["data"], "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=tmp_path, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                break
            lines.append(line)
            if line.startswith("serving "):
                break
        assert lines and lines[-1].startswith(f"serving ccr-ray on http://127.0.0.1:{port}/"), "".join(lines)[-3000:]
        assert listening_addresses(port) == {"127.0.0.1"}  # loopback only, as the CLI promises by default
        caption = "Ein roter Kreis oben links"
        answer = requests.post(f"http://127.0.0.1:{port}/search", json={"text": caption, "lang": "de", "k": 5},
                               timeout=60).json()
        (expected,) = Index.load(demo_model["hnsw"]).top_k(rt.Encoder(demo_model["model"]).encode_text(
            [caption], "de"), 5)
        assert answer["ids"] == [i for i, _ in expected]
        assert answer["scores"] == pytest.approx([s for _, s in expected], abs=1e-5)
    finally:
        server.send_signal(signal.SIGINT)  # export/serve.py stops its own local Ray on SIGINT
        try:
            out, _ = server.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            out, _ = server.communicate()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert server.returncode == 0 and "stopped" in out, out[-3000:]
