"""Fault drills that fire at a step, never after a sleep (test-only code; production workers carry none of it).

    Gate(folder, step)            a Train worker that reaches `step` writes `reached.json` (node, time) and waits
                                  until the test has done its damage and written `release`; once released it never
                                  stops again (a worker restarted from an earlier checkpoint passes the step)
    gated_worker(config, gate=)   the production worker (`run_worker`) with the gate, and a per-step record
                                  (node, time) in a probe folder on local disk, so a test can see where it is
    registered_step(run_dir)      the step of the last checkpoint Ray Train has registered (its snapshot)
    python -m tests.ray.drills --gate-folder F --gate-step N JOB [ARGS...]
                                  a job CLI (train_stage, tune) whose Train workers carry the gate: a driver-kill
                                  drill kills that process while its worker waits at the step

A drill thus kills, removes or takes down what it chooses at a step it chooses, whatever the machine's speed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

POLL_S = 0.05
WAIT_LIMIT_S = 900.0  # a gate nobody releases fails its worker instead of holding a cluster forever


@dataclass(frozen=True)
class Gate:
    folder: str
    step: int

    @property
    def reached_file(self) -> Path:
        return Path(self.folder) / "reached.json"

    @property
    def release_file(self) -> Path:
        return Path(self.folder) / "release"

    # ---------------------------------------------------------------- the worker's side
    def hold(self, step: int, **record) -> None:
        """Called by the worker after every step: at the gate's step, and until released, wait."""
        if step != self.step or self.release_file.exists():
            return
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        tmp = self.reached_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "time": time.time(), **record}))
        os.replace(tmp, self.reached_file)
        deadline = time.monotonic() + WAIT_LIMIT_S
        while not self.release_file.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"drill gate at step {step}: not released within {WAIT_LIMIT_S:.0f} s")
            time.sleep(POLL_S)

    # ---------------------------------------------------------------- the test's side
    def wait_reached(self, running, timeout: float = 600.0) -> dict:
        """The worker's record once it waits at the gate. `running()` says whether the run is still going: a run
        that ends first fails the drill at once (it never reached the step) instead of after the timeout."""
        return wait_for(lambda: self.reached_file.exists() and json.loads(self.reached_file.read_text()),
                        timeout, f"a worker at step {self.step}", running=running)

    def release(self) -> None:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        self.release_file.write_text("released")


def wait_for(predicate, timeout: float, what: str, running=None, every: float = 0.2):
    """Poll `predicate` until it returns something truthy; fail after `timeout` (a bound on a hang, not a guess at
    speed), or as soon as `running()` says the thing being waited on has ended."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if running is not None and not running():
            value = predicate()  # it may have happened just before the end
            if value:
                return value
            raise AssertionError(f"the run ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def registered_step(run_dir) -> int | None:
    """The step of the latest checkpoint Ray Train has registered in `run_dir` (a Location): it counts once the
    controller wrote it into checkpoint_manager_snapshot.json, not while it uploads."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return None
    return int(latest["metrics"]["step"]) if latest else None


def gated_worker(config: dict, gate: Gate | None = None, probe: str | None = None) -> None:
    """The production Train worker plus the gate and a record per step (rank 0) under `probe` (local disk)."""
    import ray

    from ccr_ray.train.plan import WorkerSpec
    from ccr_ray.train.worker import run_worker

    rank = ray.train.get_context().get_world_rank()
    node = ray.get_runtime_context().get_node_id()
    where = Path(probe) if probe else None
    if where is not None:
        where.mkdir(parents=True, exist_ok=True)
        (where / f"node-rank{rank}").write_text(node)

    def after_step(state, metrics):
        if where is not None and rank == 0:
            (where / f"step-{state.step:05d}").write_text(json.dumps({"node": node, "time": time.time()}))
        if gate is not None and rank == 0:
            gate.hold(state.step, node=node)

    run_worker(WorkerSpec.from_dict(config), on_step=after_step)


def steps_seen(probe) -> dict[int, dict]:
    """step -> its record, from a probe folder."""
    folder = Path(probe)
    if not folder.is_dir():
        return {}
    return {int(p.name[5:10]): json.loads(p.read_text()) for p in folder.glob("step-*")}


def trial_with_gate(gate_folder: str):
    """Tune's trainable for a sweep drill: the first trial to start runs as usual, every later one waits at its
    start until released (so the test can kill the sweep's driver with one trial finished and one pending). A
    closure, so Tune ships it by value with the folder inside; named `run_trial` because Tune's restore (the
    test's `--resume`, with the real trainable) checks that the trainable's name has not changed."""

    def run_trial(values: dict, sweep: dict) -> None:
        from ccr_ray.tune import sweep as sweeps

        Path(gate_folder).mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(Path(gate_folder) / "first-trial", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:  # not the first trial
            Gate(gate_folder, 0).hold(0, values=values)
        sweeps.run_trial(values, sweep)

    return run_trial


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run a job CLI with a drill gate in its Train workers or trials")
    parser.add_argument("--gate-folder", required=True)
    parser.add_argument("--gate-step", type=int, default=0)
    parser.add_argument("job", choices=("train_stage", "tune"))
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(repo / "jobs"))
    if args.job == "train_stage":
        import ccr_ray.train.worker as worker

        # build_trainer imports the worker function when it builds the trainer, so this one is what Train runs
        worker.train_loop_per_worker = functools.partial(gated_worker, gate=Gate(args.gate_folder, args.gate_step))
        import train_stage as job
    else:
        from ccr_ray.tune import sweep

        sweep.run_trial = trial_with_gate(args.gate_folder)  # _trainable() reads it when the sweep starts
        import tune as job
    return job.main(args.args)


if __name__ == "__main__":
    sys.exit(main())
