"""More than one node, simulated on this machine (`ray.cluster_utils.Cluster`: a head and two worker nodes, a
custom resource `accel` standing in for one GPU per worker node), with runs, data and checkpoints on a local S3
server (a simulated cluster shares one disk, so only an object store proves nothing relies on a node's local disk).

    - a 2-worker stage spread over the two worker nodes (node ids checked), fed by Ray Data, checkpointing to S3,
      ends where the same stage on one node ends (the DDP test's tolerance)
    - fault drills: a worker node removed mid-stage and a replacement added; the driver killed mid-stage and the
      command run again; storage unreachable for a while. Each states what was lost: steps redone since the last
      checkpoint, log records lost (must be 0) and the wall time to recover (CCR_RAY_DRILL_REPORT=FILE appends
      them as JSON lines; the README's fault table comes from such a run).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import REPO, WORKER_ENV, micro_config
from tests.ray.conftest import AWS, moto_s3

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
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp,
                                                                "object_store_memory": 150 * MB})
        workers = [cluster.add_node(**NODE) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {**AWS, **WORKER_ENV}})
        data = s3 / "data" / "micro"
        data.upload_from(micro_data)
        try:
            yield SimpleNamespace(cluster=cluster, s3=s3, server=server, data=data, workers=workers, temp=temp)
        finally:
            ray.shutdown()
            cluster.shutdown()
            os.system(f"rm -rf {temp}")


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


# ----------------------------------------------------------------------------------------- workers with probes


def worker_that_reports_progress(config: dict, pause: float = 0.0, probe: str | None = None) -> None:
    """The production worker, plus a record per step (rank, node, step, time) under `probe` (default: the run
    storage) and a pause per step, so a test can see where training is and act mid-stage."""
    import ray

    from ccr_ray.storage import Location
    from ccr_ray.train.plan import WorkerSpec
    from ccr_ray.train.worker import run_worker

    spec = WorkerSpec.from_dict(config)
    rank = ray.train.get_context().get_world_rank()
    node = ray.get_runtime_context().get_node_id()
    where = Location.of(probe) if probe else Location.of(spec.storage_path) / ".probe" / spec.run_name
    (where / f"node-rank{rank}").write_text(node)

    def record(state, metrics):
        (where / f"step-{state.step:05d}-rank{rank}").write_text(json.dumps({"node": node, "time": time.time()}))
        time.sleep(pause)

    run_worker(spec, on_step=record)


def probe_of(plan):
    from ccr_ray.storage import Location

    return Location.of(plan.storage_path) / ".probe" / plan.run_name


def steps_seen(probe) -> dict[int, dict]:
    """step -> its record (rank 0), from a probe folder."""
    return {int(name[5:10]): json.loads((probe / name).read_text()) for name in probe.children()
            if name.startswith("step-") and name.endswith("rank0")}


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


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
    result = run_stage(plan, train_fn=worker_that_reports_progress)
    ran_on = {(probe_of(plan) / f"node-rank{r}").read_text() for r in (0, 1)}
    assert ran_on == {w.node_id for w in nodes.workers}  # one worker per worker node, none on the head
    one_node = plan_stage(resolve_config("nlt", packed))
    single = run_stage(one_node, train_fn=worker_that_reports_progress)
    assert len({(probe_of(one_node) / f"node-rank{r}").read_text() for r in (0, 1)}) == 1
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


def test_drill_worker_node_removed_then_replaced(nodes, micro_data, tmp_path):
    """The node running the only Train worker is removed mid-stage; a replacement node joins. Ray Train restarts the
    worker group from the last checkpoint (FailureConfig) and the stage reaches its last step."""
    import functools

    from ccr_ray import checkpoint as ckpt
    from ccr_ray.stages import resolve_config
    from ccr_ray.train.driver import run_stage
    from ccr_ray.train.plan import plan_stage

    steps = 12
    cfg = config(nodes, tmp_path, "node-lost", train={"max_steps": steps, "eval_every": 4},
                 scaling={"num_workers": 1, "cpus_per_worker": 0.5, "resources_per_worker": {"accel": 1}},
                 run={"max_failures": 2})
    publish_parent(cfg, micro_data)
    plan = plan_stage(resolve_config("nlt", cfg))
    probe = probe_of(plan)
    thread, box = in_thread(lambda: run_stage(plan, train_fn=functools.partial(worker_that_reports_progress,
                                                                                pause=0.5)))
    seen = wait_for(lambda: (lambda s: s if max(s, default=0) >= 6 else None)(steps_seen(probe)), 300,
                    "step 6 (a checkpoint at step 4 behind it)")
    victim_id = seen[max(seen)]["node"]
    victim = next(n for n in nodes.cluster.list_all_nodes() if n.node_id == victim_id)
    before = max(steps_seen(probe))
    removed_at = time.time()
    nodes.cluster.remove_node(victim)
    nodes.workers = [w for w in nodes.workers if w.node_id != victim_id]
    nodes.workers.append(nodes.cluster.add_node(**NODE))  # the replacement
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    history = box["result"].history
    resumed = [r["step"] for r in history if r.get("event") == "resumed"]
    assert resumed and resumed[0] >= 4  # from the last checkpoint, not from step 0
    assert ckpt.read_meta(box["result"].checkpoint).step in (4, 8, 12)
    after = [r for r in history if "loss" in r and r["step"] > resumed[0]]
    assert max(r["step"] for r in history if "loss" in r) == steps
    lost = losses_lost(history, steps)
    assert lost == 0
    recovered = min(r["time"] for r in after) - removed_at
    report_drill("worker node removed, replacement added", steps_redone=before - resumed[0], records_lost=lost,
                 recovery_seconds=round(recovered, 1), resumed_from_step=resumed[0], step_when_lost=before)


def test_drill_driver_killed_then_the_same_command_again(nodes, micro_data, tmp_path):
    """The job's driver (jobs/train_stage.py, joined to the cluster) is killed mid-stage with SIGKILL; running the
    same command again resumes the stage's Train run from its last checkpoint (same run name, same storage)."""
    import re

    from ccr_ray.stages import resolve_config
    from ccr_ray.storage import Location
    from ccr_ray.train.plan import plan_stage

    # long enough that the first run is still training when a checkpoint is registered (in the last suite run the
    # kill landed at step 31, one step after the step-30 checkpoint), short enough to keep the drill near two minutes
    steps, every = 60, 15
    cfg = config(nodes, tmp_path, "driver-lost", train={"max_steps": steps, "eval_every": every},
                 scaling={"num_workers": 1, "cpus_per_worker": 0.5})
    publish_parent(cfg, micro_data)
    path = tmp_path / "driver-lost.json"
    path.write_text(json.dumps(cfg))
    plan = plan_stage(resolve_config("nlt", cfg))
    run = Location.of(plan.storage_path) / plan.run_name
    command = [sys.executable, str(REPO / "jobs" / "train_stage.py"), "--stage", "nlt", "--config", str(path)]
    env = {**os.environ, "RAY_ADDRESS": nodes.cluster.address, "PYTHONPATH": f"{REPO}:{REPO / 'jobs'}",
           "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        # a checkpoint counts once Ray Train has registered it (its snapshot), not while it uploads
        wait_for(lambda: first.poll() is not None or (run / "checkpoint_manager_snapshot.json").is_file(), 400,
                 "the first checkpoint")
        assert first.poll() is None, log.read_text()[-2000:]
        time.sleep(2)
        bars = re.findall(r"(\d+)(?:\.\d+)?/" + str(steps), log.read_text().replace("\r", "\n"))  # "21.0/60"
        killed_at, step_at_kill = time.time(), max(map(int, bars), default=0)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    again = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    # the whole log (train_log.jsonl comes from the last checkpoint; the published one is the best)
    history = [json.loads(line) for line in (plan.output_dir / "train_log.jsonl").read_text().splitlines()]
    resumed = [r["step"] for r in history if r.get("event") == "resumed"]
    assert resumed and resumed[0] >= every, resumed  # resumed from a checkpoint, not from step 0
    lost = losses_lost(history, steps)
    assert lost == 0
    after = [r["time"] for r in history if "loss" in r and r["step"] > resumed[0]]
    report_drill("job driver killed, same command again", steps_redone=max(step_at_kill - resumed[0], 0),
                 records_lost=lost, recovery_seconds=round(min(after) - killed_at, 1), resumed_from_step=resumed[0],
                 step_when_lost=step_at_kill)


def test_drill_storage_unreachable_for_a_while(nodes, micro_data, tmp_path):
    """The object store goes down mid-stage for a few seconds and comes back. The stage either recovers (Ray Train
    restarts the worker from the last checkpoint) or fails with an error naming the storage; either way the
    published checkpoint is never half-written: it is complete (state.json, which readers require, comes last)
    or absent."""
    import functools

    from ccr_ray import checkpoint as ckpt
    from ccr_ray.stages import resolve_config
    from ccr_ray.train.driver import TrainingFailed, run_stage
    from ccr_ray.train.plan import plan_stage

    steps = 12
    cfg = config(nodes, tmp_path, "storage-lost", train={"max_steps": steps, "eval_every": 4},
                 scaling={"num_workers": 1, "cpus_per_worker": 0.5}, run={"max_failures": 3})
    publish_parent(cfg, micro_data)
    plan = plan_stage(resolve_config("nlt", cfg))
    probe = tmp_path / "probe"  # on local disk: the probe must not depend on the storage that goes away
    thread, box = in_thread(lambda: run_stage(plan, train_fn=functools.partial(
        worker_that_reports_progress, pause=0.5, probe=str(probe))))
    from ccr_ray.storage import Location

    wait_for(lambda: (lambda s: s if max(s, default=0) >= 5 else None)(steps_seen(Location.of(probe))), 300,
             "step 5")
    before = max(steps_seen(Location.of(probe)))
    down_at = time.time()
    nodes.server.stop()
    time.sleep(6)
    nodes.server.start()
    thread.join(timeout=600)
    assert not thread.is_alive()
    out = plan.output_dir / "checkpoint"
    if "error" in box:  # failed: clearly (one line naming the stage, the cause and the run on S3), nothing published
        assert isinstance(box["error"], TrainingFailed), repr(box["error"])
        assert str(box["error"]).startswith("stage nlt failed (") and "s3://" in str(box["error"])
        assert not (out / ckpt.STATE_FILE).exists()
        report_drill("storage unreachable for 6 s", outcome=f"failed: {type(box['error']).__name__}",
                     records_lost=0, steps_redone=None, recovery_seconds=None)
        return
    history = box["result"].history
    assert ckpt.is_checkpoint(out) and ckpt.read_meta(out).step in (4, 8, 12)
    assert max(r["step"] for r in history if "loss" in r) == steps
    lost = losses_lost(history, steps)
    assert lost == 0
    resumed = [r["step"] for r in history if r.get("event") == "resumed"]
    after = [r["time"] for r in history if "loss" in r and r["step"] > (resumed[0] if resumed else before)]
    report_drill("storage unreachable for 6 s", outcome="recovered" if resumed else "rode through",
                 steps_redone=(before - resumed[0]) if resumed else 0, records_lost=lost,
                 recovery_seconds=round(min(after) - down_at, 1) if after else None)
