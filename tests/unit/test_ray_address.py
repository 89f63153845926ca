"""Which Ray a job runs on (ray_utils.cluster_address, the one rule every job and export/serve.py follow), checked
without starting Ray: RAY_ADDRESS is attached to when something answers there and refused in one line, within
seconds, when nothing does; the address a `ray start` left in Ray's temp dir is attached to only while it is alive,
and a dead one (the cluster was killed without `ray stop`) gets a warning and a local Ray instead of "Failed to
connect to GCS" for ever. Every case has a private Ray temp dir (RAY_TMPDIR): the address file of another developer's
cluster is never read."""

from __future__ import annotations

import os
import socket
import time

import pytest

from ccr_ray.net import free_port
from ccr_ray.ray_utils import RayUnavailable, cluster_address


@pytest.fixture()
def ray_dir(tmp_path, monkeypatch):
    """Ray's temp dir for this test ({RAY_TMPDIR}/ray, where `ray start` writes ray_current_cluster)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    folder = tmp_path / "ray"
    folder.mkdir()
    return folder


@pytest.fixture()
def live():
    """Something listening on loopback, standing in for a live GCS (the probe only connects)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"127.0.0.1:{server.getsockname()[1]}"


def test_no_address_anywhere_starts_a_local_ray(ray_dir, capsys):
    assert cluster_address() == "local"
    assert capsys.readouterr().err == ""


def test_a_dead_address_left_by_ray_start_gets_a_warning_and_a_local_ray(ray_dir, capsys):
    from ray._private.services import get_ray_address_from_environment

    dead = f"127.0.0.1:{free_port()}"
    (ray_dir / "ray_current_cluster").write_text(dead)
    assert get_ray_address_from_environment(None, None) == dead  # where a plain ray.init() would go, and hang
    capsys.readouterr()  # Ray's own warning when other Ray clusters run on this machine (the other xdist worker's)
    started = time.monotonic()
    assert cluster_address() == "local"
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("warning: ")
    assert f"({dead}) is not running" in err and "starting a local Ray" in err
    assert str(ray_dir / "ray_current_cluster") in err
    assert (ray_dir / "ray_current_cluster").read_text() == dead  # left as it is: not ours to delete


def test_a_live_address_left_by_ray_start_is_attached_to(ray_dir, live, capsys):
    (ray_dir / "ray_current_cluster").write_text(live)
    assert cluster_address() is None  # ray.init() then attaches the way Ray does (token auth included)
    assert capsys.readouterr().err == ""


def test_ray_address_is_attached_to_when_it_answers(ray_dir, live, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", live)
    assert cluster_address() is None
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert cluster_address() == "local"


@pytest.mark.parametrize("form", ["{host}:{port}", "ray://{host}:{port}"])
def test_a_dead_ray_address_is_one_line_within_seconds(form, ray_dir, monkeypatch):
    address = form.format(host="127.0.0.1", port=free_port())
    monkeypatch.setenv("RAY_ADDRESS", address)
    (ray_dir / "ray_current_cluster").write_text(address)
    started = time.monotonic()
    with pytest.raises(RayUnavailable) as err:
        cluster_address()
    assert time.monotonic() - started < 10
    assert str(err.value) == (f"RAY_ADDRESS={address}: no Ray cluster answers there (start it, or unset "
                              "RAY_ADDRESS to run on a new local Ray)")


@pytest.mark.parametrize("failures, started", [(2, True), (3, False)])
def test_a_local_start_that_times_out_is_tried_again_after_stopping_what_it_started(
        monkeypatch, capsys, failures, started):
    """Ray's own 30-s wait for a new node's raylet gives up on a busy 2-core machine: ensure_ray starts it again,
    up to LOCAL_START_ATTEMPTS times, each time first killing the processes the failed attempt left (here a stand-in
    child per attempt), and any other error is raised at once."""
    import subprocess
    import sys

    import ray

    from ccr_ray import ray_utils

    children, calls = [], []

    def fake_init(address=None, log_to_driver=True, **dashboard):
        calls.append(address)
        if len(calls) <= failures:
            children.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_utils, "_route_ray_logger", lambda: None)
    try:
        if started:
            assert ray_utils.ensure_ray(address="local") is True
            assert calls == ["local"] * (failures + 1)
        else:
            with pytest.raises(Exception, match="timed out during startup"):
                ray_utils.ensure_ray(address="local")
            assert len(calls) == ray_utils.LOCAL_START_ATTEMPTS
        retried = failures if started else failures - 1
        assert all(child.poll() is not None for child in children[:retried])  # each failed attempt's leftovers
        assert capsys.readouterr().err.count("Ray: its start-up timed out") == retried
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_another_start_error_is_not_retried(monkeypatch):
    import ray

    from ccr_ray import ray_utils

    calls = []

    def fake_init(address=None, log_to_driver=True, **dashboard):
        calls.append(address)
        raise ValueError("bad argument")

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ValueError):
        ray_utils.ensure_ray(address="local")
    assert calls == ["local"]


@pytest.mark.parametrize("port_8265_taken", [False, True])
def test_a_new_local_cluster_asks_its_own_dashboard(monkeypatch, port_8265_taken):
    """Ray Train's placement-group cleaner asks the state API whether a run's controller is alive; a new local
    cluster's processes are pointed at the cluster's own dashboard (RAY_API_SERVER_ADDRESS, inherited from the
    environment ray.init starts them in), on 8265 unless another process holds it, and this process's environment is
    left as it was."""
    import ray

    from ccr_ray import ray_utils

    seen = []

    def fake_init(address=None, log_to_driver=True, **dashboard):
        seen.append((address, dashboard, os.environ.get(ray_utils.STATE_API_ENV)))

    monkeypatch.delenv(ray_utils.STATE_API_ENV, raising=False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_utils, "_route_ray_logger", lambda: None)
    holder = socket.socket()
    try:
        if port_8265_taken:
            holder.bind(("127.0.0.1", ray_utils.DEFAULT_DASHBOARD_PORT))
        elif not ray_utils.can_bind(ray_utils.DEFAULT_DASHBOARD_PORT):
            pytest.skip("8265 is held by another process on this machine")
        assert ray_utils.ensure_ray(address="local") is True
    finally:
        holder.close()
    (address, dashboard, state_api), = seen
    port = dashboard["dashboard_port"]
    assert address == "local" and dashboard["dashboard_host"] == "127.0.0.1"
    assert (port != ray_utils.DEFAULT_DASHBOARD_PORT) == port_8265_taken
    assert state_api == f"http://127.0.0.1:{port}"
    assert ray_utils.STATE_API_ENV not in os.environ  # only the cluster's processes got it
    # a user's own setting is kept, and attaching to a running cluster changes nothing
    seen.clear()
    monkeypatch.setenv(ray_utils.STATE_API_ENV, "http://10.0.0.1:8265")
    ray_utils.ensure_ray(address="local")
    ray_utils.ensure_ray(address=None)
    assert seen == [("local", {}, "http://10.0.0.1:8265"), (None, {}, "http://10.0.0.1:8265")]


def test_a_dashboard_port_taken_while_ray_starts_is_a_new_try_with_one_warning(monkeypatch, capsys):
    """Two jobs starting a local Ray at once both found 8265 free; the second's dashboard could not bind it, and Ray
    printed the dashboard's traceback (the suite's busy-machine test, beside another test's job). The start is
    tried again on a port that is free then, with one warning line and no traceback."""
    import logging
    from types import SimpleNamespace

    import ray
    import ray._private.worker

    from ccr_ray import ray_utils

    holder, ports = socket.socket(), []

    def fake_init(address=None, log_to_driver=True, **dashboard):
        ports.append(dashboard["dashboard_port"])
        if len(ports) == 1:  # another Ray takes the port meanwhile; Ray logs its dashboard's failure
            holder.bind(("127.0.0.1", dashboard["dashboard_port"]))
            logging.getLogger("ray._private.services").error("Failed to start the dashboard\nTraceback (most ...")
        node = SimpleNamespace(webui_url=None if len(ports) == 1 else f"127.0.0.1:{ports[-1]}")
        monkeypatch.setattr(ray._private.worker, "_global_node", node, raising=False)

    monkeypatch.delenv(ray_utils.STATE_API_ENV, raising=False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_utils, "_route_ray_logger", lambda: None)
    monkeypatch.setattr(ray_utils, "DEFAULT_DASHBOARD_PORT", free_port())  # not the machine's real 8265
    monkeypatch.setattr(ray_utils, "can_bind", lambda port: not ports)  # free at the first look only
    try:
        assert ray_utils.ensure_ray(address="local") is True
    finally:
        holder.close()
    assert len(ports) == 2 and ports[0] != ports[1]
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("warning: ") == 1
    assert f"its dashboard's port {ports[0]} was taken while it started; starting it again (2/3)" in err

