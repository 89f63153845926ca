"""Real Ray runs on a local cluster: the job CLIs end to end (then the same command again resumes instead of
restarting), and worker-crash recovery."""

import json
import os

import pytest

from ccr_ray import checkpoint as ckpt
from ccr_ray.stages import resolve_config
from tests.conftest import micro_config
from tests.ray.conftest import train_logs_tail

pytestmark = pytest.mark.ray


def write_config(tmp_path, micro_data, **sections):
    path = tmp_path / "micro.json"
    path.write_text(json.dumps(micro_config(micro_data, str(tmp_path / "home"), **sections)))
    return str(path)


def test_clip_nlt_le_then_evaluate_through_the_job_clis(ray_local, micro_data, tmp_path, capsys):
    import evaluate
    import train_stage

    config = write_config(tmp_path, micro_data)
    assert train_stage.main(["--stage", "le", "--config", config]) == 2  # no nlt checkpoint yet
    assert "python jobs/train_stage.py --stage nlt --config" in capsys.readouterr().err
    for stage in ("clip", "nlt", "le"):
        code = train_stage.main(["--stage", stage, "--config", config])
        assert code == 0, f"{stage}: exit {code}: {capsys.readouterr().err[-1500:]}\n{train_logs_tail()}"
    home = tmp_path / "home" / "runs" / "t"
    for stage in ("clip", "nlt", "le"):
        meta = ckpt.read_meta(home / stage / "checkpoint")
        select = resolve_config(stage, config).train.select
        assert meta.stage == stage and meta.step == (4 if select == "final" else meta.best_step)
        assert json.loads((home / stage / "result.json").read_text())["selected"] == select
        assert (home / stage / "training_curve.png").exists()
        rows = [json.loads(line) for line in (home / stage / "train_log.jsonl").read_text().splitlines()]
        assert any("loss" in r for r in rows) and any("val/mR" in r for r in rows)
    assert not (home / "le" / "checkpoint" / ckpt.OPTIM_FILE).exists()  # stage outputs carry no optimizer state
    # the le stage started from nlt's weights: its frozen backbone equals clip's trained backbone
    from safetensors.torch import load_file

    clip_w = load_file(str(home / "clip" / "checkpoint" / "model.safetensors"))
    le_w = load_file(str(home / "le" / "checkpoint" / "model.safetensors"))
    assert all((clip_w[k] == le_w[k]).all() for k in clip_w if k.startswith("clip."))
    out = tmp_path / "eval.json"
    capsys.readouterr()
    assert evaluate.main([str(home / "le" / "checkpoint"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| de |" in printed and "| zh |" in printed and "| en |" in printed
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"en", "de", "zh"} and report["split"] == "test"
    assert evaluate.main([str(home / "clip" / "checkpoint"), "--baseline", "--langs", "en,fr"]) == 0

    # the same command again: same run name and storage, so Ray Train V2 resumes from the last checkpoint (step 4
    # of 4) and nothing is retrained (one Train run, not a second chain: the suite's time budget)
    first = json.loads((home / "clip" / "result.json").read_text())["run"]
    saved = sorted(p for p in os.listdir(first) if p.startswith("checkpoint_"))
    assert train_stage.main(["--stage", "clip", "--config", config]) == 0
    assert json.loads((home / "clip" / "result.json").read_text())["run"] == first
    assert sorted(p for p in os.listdir(first) if p.startswith("checkpoint_")) == saved
    assert ckpt.read_meta(home / "clip" / "checkpoint").step == 4
    # a changed config is a different run (its own name, so it would not resume this one)
    from ccr_ray.train.plan import plan_stage

    changed = resolve_config("clip", config, overrides=["optim.lr=5e-4"])  # what `--set optim.lr=5e-4` gives
    assert plan_stage(changed).run_name != plan_stage(resolve_config("clip", config)).run_name

    # a language added to the trained model through the same CLI, on Ray Train: nlt from the le checkpoint, then le
    # finds nlt+fr; de, zh and everything shared keep their fingerprints, fr is new (jobs/languages.py compare)
    import languages

    base = str(home / "le" / "checkpoint")
    assert train_stage.main(["--stage", "nlt", "--config", config, "--add-language", "fr", "--from", base]) == 0
    assert train_stage.main(["--stage", "le", "--config", config, "--add-language", "fr"]) == 0
    merged = home / "le+fr" / "checkpoint"
    assert ckpt.read_meta(merged).experiment.model.languages == ["de", "zh", "fr"]
    capsys.readouterr()
    assert languages.main(["compare", base, str(merged)]) == 0
    assert "fr       added" in capsys.readouterr().out
    history = [json.loads(line) for line in (home / "nlt+fr" / "train_log.jsonl").read_text().splitlines()]
    assert {r["lang"] for r in history if "loss" in r} == {"fr"}  # only the new language trained


CRASH_AT_STEP = 3


def worker_that_crashes_once(config: dict) -> None:
    """The production worker with a fault injected after step CRASH_AT_STEP, once the step-2 checkpoint is registered
    by Ray Train (so the step it resumes from does not depend on how fast the controller is); a marker in the run's
    storage makes it fire once, so the replacement worker (FailureConfig) runs through."""
    from ccr_ray.storage import Location
    from ccr_ray.train.plan import WorkerSpec
    from ccr_ray.train.worker import run_worker
    from tests.ray.drills import registered_step, wait_for

    spec = WorkerSpec.from_dict(config)
    run_dir = Location.of(spec.storage_path) / spec.run_name
    marker = Location.of(spec.storage_path) / f".{spec.run_name}.crashed"  # the run's storage, local or shared

    def crash_once(state, metrics):
        if state.step == CRASH_AT_STEP and not marker.exists():
            wait_for(lambda: registered_step(run_dir) == 2, 300, "the step-2 checkpoint registered")
            marker.write_text("")
            raise RuntimeError(f"injected crash at step {CRASH_AT_STEP}")

    run_worker(spec, on_step=crash_once)


def test_a_worker_that_crashes_once_resumes_from_its_checkpoint(ray_local, micro_data, tmp_path):
    from ccr_ray.train.driver import run_stage
    from ccr_ray.train.plan import plan_stage

    cfg = resolve_config("clip", micro_config(micro_data, str(tmp_path), train={"max_steps": 6, "eval_every": 2,
                                                                               "eval_before_training": True}))
    result = run_stage(plan_stage(cfg), train_fn=worker_that_crashes_once)
    meta = ckpt.read_meta(result.checkpoint)
    assert meta.step == 6
    resumed = [r for r in result.history if r.get("event") == "resumed"]
    assert [r["step"] for r in resumed] == [2]  # restarted from the step-2 checkpoint, not from scratch
    # the starting weights were scored once (not again on resume), and that score is no selection candidate
    before = [r for r in result.history if r.get("event") == "before_training"]
    assert len(before) == 1 and before[0]["step"] == 0 and "val/mR" in before[0]
    markers = [f for f in os.listdir(cfg.home / "runs" / "t" / "ray") if f.endswith(".crashed")]
    assert markers, "the crash hook did not fire"
