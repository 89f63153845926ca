"""More than one node, simulated on this machine (`ray.cluster_utils.Cluster`: a head and two worker nodes, a
custom resource `accel` standing in for one GPU per worker node), with runs, data and checkpoints on a local S3
server (a simulated cluster shares one disk, so only an object store proves nothing relies on a node's local disk).

    - a 2-worker stage spread over the two worker nodes (node ids checked), fed by Ray Data, checkpointing to S3,
      ends where the same stage on one node ends (the DDP test's tolerance)
    - fault drills, each fired at a step the test chose (tests/ray/drills.py), never after a sleep: a worker node
      removed and a replacement added; the driver killed and the command run again; the object store down for
      30 s. Each states what was lost: steps redone since the last registered checkpoint, log records lost (must
      be 0) and the wall time to recover (CCR_RAY_DRILL_REPORT=FILE appends them as JSON lines; the README's fault
      table comes from such a run).
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import pytest

from ccr_ray.net import free_port
from ccr_ray.ray_utils import environment, start_with_retries
from tests.conftest import REPO, WORKER_ENV, micro_config
from tests.ray.conftest import AWS, moto_s3
from tests.ray.drills import Gate, gated_worker, registered_step, steps_seen, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
MB = 2 ** 20
NODE = {"num_cpus": 1, "resources": {"accel": 1}, "object_store_memory": 150 * MB}


@pytest.fixture(scope="module")
def nodes(micro_data):
    import ray
    from ray.cluster_utils import Cluster

    with moto_s3() as server:
        s3 = server.root
        if ray.is_initialized():
            ray.shutdown()
        temp = tempfile.mkdtemp(prefix="ccrmn-", dir="/tmp")
        # Cluster() writes its address to {RAY_TMPDIR or /tmp}/ray/ray_current_cluster (for ray.init() without an
        # address): keep that file in the private folder, or it outlives the cluster in the machine's /tmp/ray (a
        # stale address every later ray.init() on this machine would try) and fails where /tmp/ray does not exist
        os.makedirs(os.path.join(temp, "ray"))
        with environment({"RAY_TMPDIR": temp}):
            # the dashboard on a port of its own: 8265 may be another cluster's on a shared machine
            def start():  # each node waits a fixed 30 s for its raylet: tried again on a busy machine
                cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp,
                                                                        "object_store_memory": 150 * MB,
                                                                        "dashboard_port": free_port()})
                workers = [cluster.add_node(**NODE) for _ in range(2)]
                cluster.wait_for_nodes(timeout=600)
                return cluster, workers

            cluster, workers = start_with_retries(start)
            ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {**AWS, **WORKER_ENV}})
            data = s3 / "data" / "micro"
            data.upload_from(micro_data)
            try:
                yield SimpleNamespace(cluster=cluster, s3=s3, server=server, data=data, workers=workers, temp=temp)
            finally:
                ray.shutdown()
                cluster.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def config(nodes, tmp_path, experiment, **sections):
    cfg = micro_config(nodes.data.uri, str(tmp_path / experiment),
                       optim={"lr": 1e-2, "warmup": 0.0}, data={"preserve_order": True},
                       train={"max_steps": 6, "eval_every": 3, "log_every": 1, **sections.pop("train", {})},
                       run={"experiment": experiment, "verbose": False})
    cfg["run"]["storage"] = (nodes.s3 / "runs").uri
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


def publish_parent(cfg_dict, micro_data, stage="nlt"):
    """The stage's parent (clip, random weights) published to the run storage."""
    from ccr_ray import checkpoint as ckpt
    from ccr_ray.stages import resolve_config
    from ccr_ray.train.state import TrainState

    clip = resolve_config("clip", cfg_dict)
    with tempfile.TemporaryDirectory() as tmp:
        folder = TrainState.create(clip, os.path.join(micro_data, "tokenizer"), None, "cpu").save(
            os.path.join(tmp, "checkpoint"), with_optimizer=False)
        ckpt.copy_checkpoint(folder, clip.stage_location() / "checkpoint")


def report_drill(name: str, **figures) -> None:
    line = json.dumps({"drill": name, **figures})
    print(line)
    if os.environ.get("CCR_RAY_DRILL_REPORT"):
        with open(os.environ["CCR_RAY_DRILL_REPORT"], "a") as f:
            f.write(line + "\n")


def losses_lost(history: list[dict], max_steps: int) -> int:
    """Log records of steps 1..max_steps missing from the final training log (each step logs one record)."""
    logged = {r["step"] for r in history if "loss" in r}
    return len(set(range(1, max_steps + 1)) - logged)


def trained_vector(checkpoint):
    from ccr_ray import checkpoint as ckpt

    model, _ = ckpt.load_checkpoint(checkpoint)
    return np.concatenate([t.detach().numpy().ravel() for name, t in sorted(model.state_dict().items())
                           if name.startswith(("embedding.", "adapters."))])


# ----------------------------------------------------------------------------------------- multi-node training


def in_thread(fn):
    """Run fn in a thread; returns (thread, box) where box holds its result or exception."""
    import threading

    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_two_workers_spread_over_two_nodes_end_like_one_node(nodes, micro_data, tmp_path):
    from ccr_ray.stages import resolve_config
    from ccr_ray.train.driver import run_stage
    from ccr_ray.train.plan import plan_stage

    spread = config(nodes, tmp_path, "spread", train={"select": "final"},
                    scaling={"num_workers": 2, "cpus_per_worker": 0.5, "resources_per_worker": {"accel": 1},
                             "placement_strategy": "STRICT_SPREAD"})
    packed = config(nodes, tmp_path, "packed", train={"select": "final"},
                    scaling={"num_workers": 2, "cpus_per_worker": 0.5, "placement_strategy": "STRICT_PACK"})
    publish_parent(spread, micro_data)
    publish_parent(packed, micro_data)
    plan = plan_stage(resolve_config("nlt", spread))
    result = run_stage(plan, train_fn=functools.partial(gated_worker, probe=str(tmp_path / "spread-probe")))
    ran_on = {(tmp_path / "spread-probe" / f"node-rank{r}").read_text() for r in (0, 1)}
    assert ran_on == {w.node_id for w in nodes.workers}  # one worker per worker node, none on the head
    one_node = plan_stage(resolve_config("nlt", packed))
    single = run_stage(one_node, train_fn=functools.partial(gated_worker, probe=str(tmp_path / "packed-probe")))
    assert len({(tmp_path / "packed-probe" / f"node-rank{r}").read_text() for r in (0, 1)}) == 1
    a, b = trained_vector(result.checkpoint), trained_vector(single.checkpoint)
    assert np.abs(a - start_vector(plan)).max() > 1e-3  # it trained, so agreement means something
    diff = np.abs(a - b)
    assert diff.max() < 2e-4 and diff.mean() < 1e-7, (diff.max(), diff.mean())  # the DDP test's tolerance


def start_vector(plan):
    from ccr_ray.train.state import TrainState

    state = TrainState.create(plan.cfg, plan.tokenizer_dir, plan.parent, "cpu")
    return np.concatenate([t.detach().numpy().ravel() for name, t in sorted(state.model.state_dict().items())
                           if name.startswith(("embedding.", "adapters."))])


# ----------------------------------------------------------------------------------------- fault drills
# Each fault fires while the worker waits at a step the test chose (tests/ray/drills.py: Gate), after the checkpoint
# before it is registered, so the steps redone are known exactly, on a fast machine or a loaded one.


def run_dir_of(plan):
    from ccr_ray.storage import Location

    return Location.of(plan.storage_path) / plan.run_name


def test_drill_worker_node_removed_then_replaced(nodes, micro_data, tmp_path):
    """The node running the only Train worker is removed while the worker waits at step 6 (the checkpoint of step 4
    registered); a replacement node joins. Ray Train restarts the worker group from that checkpoint (FailureConfig)
    and the stage reaches its last step."""
    from ccr_ray import checkpoint as ckpt
    from ccr_ray.stages import resolve_config
    from ccr_ray.train.driver import run_stage
    from ccr_ray.train.plan import plan_stage

    steps, every, fault_at = 12, 4, 6
    cfg = config(nodes, tmp_path, "node-lost", train={"max_steps": steps, "eval_every": every},
                 scaling={"num_workers": 1, "cpus_per_worker": 0.5, "resources_per_worker": {"accel": 1}},
                 run={"max_failures": 2})
    publish_parent(cfg, micro_data)
    plan = plan_stage(resolve_config("nlt", cfg))
    gate = Gate(str(tmp_path / "gate"), fault_at)
    thread, box = in_thread(lambda: run_stage(plan, train_fn=functools.partial(gated_worker, gate=gate)))
    at_gate = gate.wait_reached(running=thread.is_alive)
    wait_for(lambda: registered_step(run_dir_of(plan)) == every, 300, f"the step-{every} checkpoint registered",
             running=thread.is_alive)
    victim = next(n for n in nodes.cluster.list_all_nodes() if n.node_id == at_gate["node"])
    removed_at = time.time()
    nodes.cluster.remove_node(victim)
    nodes.workers = [w for w in nodes.workers if w.node_id != victim.node_id]
    nodes.workers.append(nodes.cluster.add_node(**NODE))  # the replacement
    gate.release()  # the restarted worker passes step 6
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    history = box["result"].history
    resumed = [r["step"] for r in history if r.get("event") == "resumed"]
    assert resumed == [every], resumed  # from the registered checkpoint, not from step 0, exactly once
    assert ckpt.read_meta(box["result"].checkpoint).step in (4, 8, 12)
    assert max(r["step"] for r in history if "loss" in r) == steps
    lost = losses_lost(history, steps)
    assert lost == 0
    after = [r["time"] for r in history if "loss" in r and r["step"] > every]
    report_drill("worker node removed, replacement added", steps_redone=fault_at - every, records_lost=lost,
                 recovery_seconds=round(min(after) - removed_at, 1), resumed_from_step=every, step_when_lost=fault_at)


def test_drill_driver_killed_then_the_same_command_again(nodes, micro_data, tmp_path):
    """The job's driver (jobs/train_stage.py, joined to the cluster) is killed with SIGKILL while its worker waits at
    step 6 (the step-4 checkpoint registered); the same command again resumes the stage's Train run from that
    checkpoint (same run name, same storage)."""
    from ccr_ray.stages import resolve_config
    from ccr_ray.train.plan import plan_stage

    steps, every, fault_at = 12, 4, 6  # the gate fires at the step whatever the speed: no need for more steps
    cfg = config(nodes, tmp_path, "driver-lost", train={"max_steps": steps, "eval_every": every},
                 scaling={"num_workers": 1, "cpus_per_worker": 0.5})
    publish_parent(cfg, micro_data)
    path = tmp_path / "driver-lost.json"
    path.write_text(json.dumps(cfg))
    plan = plan_stage(resolve_config("nlt", cfg))
    job = ["train_stage", "--stage", "nlt", "--config", str(path)]
    env = {**os.environ, "RAY_ADDRESS": nodes.cluster.address, "PYTHONPATH": f"{REPO}:{REPO / 'jobs'}",
           "PYTHONUNBUFFERED": "1"}
    gate = Gate(str(tmp_path / "gate"), fault_at)
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        # the same job CLI, its workers carrying the gate (tests/ray/drills.py)
        first = subprocess.Popen([sys.executable, "-m", "tests.ray.drills", "--gate-folder", gate.folder,
                                  "--gate-step", str(fault_at), *job], env=env, cwd=REPO, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            gate.wait_reached(running=lambda: first.poll() is None)
            wait_for(lambda: registered_step(run_dir_of(plan)) == every, 300,
                     f"the step-{every} checkpoint registered", running=lambda: first.poll() is None)
        except AssertionError as err:
            raise AssertionError(f"{err}; its log: {log.read_text()[-2000:]}") from None
        killed_at = time.time()
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    again = subprocess.run([sys.executable, str(REPO / "jobs" / "train_stage.py"), *job[1:]], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    # the whole log (train_log.jsonl comes from the last checkpoint; the published one is the best)
    history = [json.loads(line) for line in (plan.output_dir / "train_log.jsonl").read_text().splitlines()]
    resumed = [r["step"] for r in history if r.get("event") == "resumed"]
    assert resumed == [every], resumed  # resumed from the registered checkpoint, not from step 0
    lost = losses_lost(history, steps)
    assert lost == 0
    after = [r["time"] for r in history if "loss" in r and r["step"] > every]
    report_drill("job driver killed, same command again", steps_redone=fault_at - every, records_lost=lost,
                 recovery_seconds=round(min(after) - killed_at, 1), resumed_from_step=every, step_when_lost=fault_at)


OUTAGE_S = 30


def test_drill_storage_unreachable_for_30_seconds(nodes, micro_data, tmp_path):
    """The object store goes down while the worker waits at step 8, just before it uploads the step-8 checkpoint
    (the step-4 one registered), and stays down for 30 s. The upload and Ray Train's snapshot retry inside the
    storage layer (run.storage_retry_s, 120 s by default) until it is back, so the stage rides through: it finishes,
    redoes at most one checkpoint interval, loses no log record and publishes a complete checkpoint."""
    from ccr_ray import checkpoint as ckpt
    from ccr_ray.stages import resolve_config
    from ccr_ray.train.driver import run_stage
    from ccr_ray.train.plan import plan_stage

    steps, every, fault_at = 12, 4, 8
    cfg = config(nodes, tmp_path, "storage-lost", train={"max_steps": steps, "eval_every": every},
                 scaling={"num_workers": 1, "cpus_per_worker": 0.5})
    assert resolve_config("nlt", cfg).run.storage_retry_s > OUTAGE_S  # the default budget covers this outage
    publish_parent(cfg, micro_data)
    plan = plan_stage(resolve_config("nlt", cfg))
    gate, probe = Gate(str(tmp_path / "gate"), fault_at), tmp_path / "probe"  # local disk: not the store that goes
    thread, box = in_thread(lambda: run_stage(plan, train_fn=functools.partial(gated_worker, gate=gate,
                                                                                probe=str(probe))))
    gate.wait_reached(running=thread.is_alive)
    wait_for(lambda: registered_step(run_dir_of(plan)) == every, 300, f"the step-{every} checkpoint registered",
             running=thread.is_alive)
    nodes.server.stop()
    down_at = time.time()
    gate.release()  # the worker goes on to upload its step-8 checkpoint into the outage
    time.sleep(OUTAGE_S)  # the fault's length (what the drill is about), not a guess at the machine's speed
    nodes.server.start()
    up_at = time.time()
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert "error" not in box, f"the stage did not ride through a {OUTAGE_S}-s outage: {box.get('error')}"
    history = box["result"].history
    out = plan.output_dir / "checkpoint"
    assert ckpt.is_checkpoint(out) and ckpt.read_meta(out).step in (4, 8, 12)
    assert max(r["step"] for r in history if "loss" in r) == steps
    lost = losses_lost(history, steps)
    assert lost == 0
    resumed = [r["step"] for r in history if r.get("event") == "resumed"]
    assert all(step >= every for step in resumed), resumed  # at most one checkpoint interval redone
    # the step after the fault ran only once the store was back: the upload waited through the outage
    assert steps_seen(probe)[fault_at + 1]["time"] >= up_at - 1.0
    redone = (fault_at - resumed[0]) if resumed else 0
    report_drill(f"storage unreachable for {OUTAGE_S} s", outcome="recovered" if resumed else "rode through",
                 steps_redone=redone, records_lost=lost,
                 stalled_seconds=round(steps_seen(probe)[fault_at + 1]["time"] - down_at, 1),
                 back_to_training_after_store_seconds=round(steps_seen(probe)[fault_at + 1]["time"] - up_at, 1))
