"""Tune search spaces without Ray: parsing, per-stage defaults, validation that names the key, and the sweep
report rendered from a folder."""

import json
import sys

import pytest

from ccr_ray.stages import STAGES, resolve_config
from ccr_ray.tune import report
from ccr_ray.tune.space import Domain, SpaceError, count_trials, parse_domain, resolve_space, validate_space


def test_domains_parse_and_know_their_extremes():
    assert parse_domain("k", "loguniform(1e-5, 1e-3)") == Domain("loguniform", (1e-5, 1e-3))
    assert parse_domain("k", "choice(32,64,128)").extremes() == [32, 64, 128]
    assert parse_domain("k", "randint(1, 5)").extremes() == [1, 4]
    assert parse_domain("k", "choice(adamw, bertadam)").args == ("adamw", "bertadam")
    assert parse_domain("k", [1, 2]).kind == "choice"
    assert str(parse_domain("k", "uniform(0.1,0.3)")) == "uniform(0.1, 0.3)"
    assert parse_domain("k", str(parse_domain("k", "grid(1, 2)"))) == Domain("grid", (1, 2))
    for bad, message in [("normal(0,1)", "unknown domain"), ("loguniform(0, 1)", "low > 0"),
                         ("uniform(2, 1)", "low < high"), ("choice()", "at least one"), ("lr", "not a domain"),
                         ("uniform(a, 1)", "takes 2 numbers")]:
        with pytest.raises(SpaceError, match=message) as err:
            parse_domain("optim.lr", bad)
        assert "optim.lr" in str(err.value)


def test_grid_multiplies_the_trials():
    space = {"a": Domain("grid", (1, 2, 3)), "b": Domain("choice", (1, 2)), "c": Domain("grid", (0, 1))}
    assert count_trials(space, 2) == 12


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_default_space_is_valid_on_the_packaged_configs(name):
    for config in ("demo", "vitb32-mbert"):
        space = resolve_space(STAGES[name].search_space)
        assert "optim.lr" in space
        validate_space(space, lambda values, config=config: resolve_config(name, config, [], trial=values))


def test_overrides_replace_keys_and_fixed_drops_them(tmp_path):
    file = tmp_path / "space.json"
    file.write_text(json.dumps({"model.mla.hidden": [16, 32], "optim.warmup": "uniform(0, 0.2)"}))
    space = resolve_space(STAGES["nlt"].search_space, str(file), ["optim.lr=loguniform(1e-4,1e-2)",
                                                                  "optim.warmup=fixed"])
    assert space == {"model.mla.hidden": Domain("choice", (16, 32)), "optim.lr": Domain("loguniform", (1e-4, 1e-2))}
    yaml_file = tmp_path / "space.yaml"
    yaml_file.write_text("optim.lr: loguniform(1e-4, 1e-3)\nmodel.mla.hidden: [8, 16]\n")
    assert resolve_space({}, str(yaml_file))["model.mla.hidden"] == Domain("choice", (8, 16))


@pytest.mark.parametrize("item, key", [
    ("model.mla.hidden=choice(0,32)", "model.mla.hidden"),  # hidden size 0
    ("loss.weights.consistency_l1=uniform(-0.1,0.5)", "loss.weights.consistency_l1"),  # a negative weight
    ("model.mla.hiden=choice(32,64)", "model.mla.hiden"),  # an unknown key
    ("loss.weights.contrastive_target=uniform(0.5,1)", "loss.weights.contrastive_target"),  # not a cla loss
])
def test_a_space_that_can_give_an_invalid_config_is_refused_naming_the_key(item, key):
    stage = "cla" if "weights" in item else "nlt"
    space = resolve_space({}, None, [item])
    with pytest.raises(SpaceError) as err:
        validate_space(space, lambda values: resolve_config(stage, "demo", [], trial=values))
    assert key in str(err.value)


@pytest.mark.parametrize("args, message", [
    # the user's own key is named, not the stage's default entry evaluated first
    (["--space", "model.mla.hiddn=choice(16,64)"],
     "error: --space model.mla.hiddn: unknown field (did you mean model.mla.hidden?)"),
    (["--space", "modle.mla.hidden=choice(16,64)"],
     "error: --space modle.mla.hidden: unknown field (did you mean model.mla.hidden?)"),
    (["--set", "model.mla.hiddn=16"], "error: --set model.mla.hiddn: unknown field (did you mean model.mla.hidden?)"),
    (["--set", "optim.lr=-1"], "error: optim.lr: must be > 0"),  # the config's error, not a space entry's
    (["--max-concurrent", "-1"], "error: --max-concurrent: -1 must be >= 0 (0: as many as the cluster fits)"),
    (["--space", "loss.weights.consistency_l1=uniform(0.1,0.5)"],
     "error: --space loss.weights.consistency_l1=uniform(0.1, 0.5): the value 0.1 gives an invalid config: "
     "loss.weights: ['consistency_l1'] are not losses of stage 'nlt' (its losses: distill_mse)"),
])
def test_a_bad_key_is_blamed_on_itself_beside_the_default_space(args, message, capsys):
    import tune

    assert tune.main(["--stage", "nlt", *args, "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == message


def test_the_job_refuses_a_bad_space_before_ray_starts(capsys):
    import tune

    code = tune.main(["--stage", "nlt", "--space", "model.mla.hidden=choice(0,32)", "--dry-run"])
    assert code == 2
    assert "model.mla.hidden" in capsys.readouterr().err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert tune.main(["--stage", "nlt", "--space", "optim.lr=loguniform(0,1)"]) == 2
    assert "low > 0" in capsys.readouterr().err


def test_dry_run_prints_space_trials_resources_and_concurrency(micro_data, tmp_path, capsys):
    import tune

    from tests.conftest import micro_config

    config = tmp_path / "micro.json"
    config.write_text(json.dumps(micro_config(micro_data, str(tmp_path / "home"))))
    assert tune.main(["--stage", "clip", "--config", str(config), "--space", "optim.lr=grid(1e-3,1e-2)",
                      "--space", "optim.warmup=uniform(0,0.2)", "--num-samples", "3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr = grid(0.001, 0.01)" in out and "trials       6" in out
    assert "concurrency" in out and "per trial" in out and "2 CPU" in out


# ------------------------------------------------------------------------------------------ report from a folder


def fake_sweep(folder, stage="nlt"):
    """A sweep folder as Tune and the trial driver leave it: three trials, one stopped early, one errored."""
    (folder / "tune").mkdir(parents=True)
    meta = {"name": "s", "stage": stage, "config": {}, "config_source": "demo", "overrides": [], "search": "random",
            "scheduler": "asha", "space": {"optim.lr": "loguniform(0.0001, 0.01)", "model.mla.hidden": "choice(8, 16)"},
            "finished": True, "timing": {"wall_seconds": 110.0, "trial_seconds": 100.0}}
    (folder / report.SWEEP_FILE).write_text(json.dumps(meta))
    trials = {"t1": ({"optim.lr": 1e-3, "model.mla.hidden": 8}, [(2, 10.0), (4, 20.0)], "end"),
              "t2": ({"optim.lr": 1e-4, "model.mla.hidden": 16}, [(2, 5.0)], None),
              "t3": ({"optim.lr": 1e-2, "model.mla.hidden": 16}, [(2, 12.0), (4, 25.0)], "end")}
    for i, (tid, (values, curve, end)) in enumerate(trials.items()):
        tdir = folder / "tune" / f"run_trial_{tid}_{i}"
        tdir.mkdir()
        (tdir / "params.json").write_text(json.dumps(values))
        (tdir / "result.json").write_text("".join(
            json.dumps({"trial_id": tid, "step": s, "val/mR": v, "time_total_s": 10.0 * s}) + "\n" for s, v in curve))
        ours = folder / "trials" / tid
        (ours / report.EVENTS_DIR).mkdir(parents=True)
        events = [{"event": "start"}] + ([{"event": "end", "seconds": 40.0}] if end else [])
        for n, event in enumerate(events):
            (ours / report.EVENTS_DIR / f"{n:05d}-{event['event']}.json").write_text(json.dumps(event))
        if end:
            (ours / "checkpoint").mkdir()
            (ours / "checkpoint" / "x").write_text("")
    return folder


def test_report_renders_table_csv_best_and_plots(tmp_path):
    folder = fake_sweep(tmp_path / "s")
    text = report.render(folder)
    assert "| t2    |" in text and "stopped early" in text
    rows = (folder / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("trial,optim.lr,model.mla.hidden,best_val_mR")
    best = json.loads((folder / "best.json").read_text())
    assert best["trial_id"] == "t3" and best["score"] == 25.0
    assert best["checkpoint"].endswith("trials/t3/checkpoint")
    assert any(c.startswith("python jobs/train_stage.py --stage le") and "run.init_from=" in c for c in best["next"])
    assert any("--set model.mla.hidden=16" in c for c in best["next"])  # the child must build the same adapters
    assert best["next"][-1].startswith("python jobs/evaluate.py")
    records = {r.trial_id: r for r in report.collect_trials(folder)}
    assert records["t2"].status == report.STOPPED and records["t1"].status == report.COMPLETED
    assert records["t2"].seconds == 20.0 and records["t1"].seconds == 40.0
    for png in ("sweep_values.png", "sweep_curves.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1.10x" in text  # the sweep machinery's cost


def test_a_trial_with_a_second_folder_after_a_resume_is_one_trial(tmp_path):
    # the driver was killed while a trial waited at its start, before Tune's snapshot named its folder: the resume
    # ran it in a new folder, and the first stays behind with params and no results (seen in tests/ray/test_tune.py)
    folder = fake_sweep(tmp_path / "s")
    resumed = folder / "tune" / "run_trial_t2_1"
    orphan = folder / "tune" / "run_trial_a33a4_00001_1_optim_lr=0.0001_2026-12-07_11-17-11"
    orphan.mkdir()
    (orphan / "params.json").write_text((resumed / "params.json").read_text())
    (orphan / "result.json").write_text("")
    (resumed / "result.json").write_text((resumed / "result.json").read_text().replace('"t2"', '"a33a4_00001"'))
    (folder / "trials" / "t2").rename(folder / "trials" / "a33a4_00001")
    records = {r.trial_id: r for r in report.collect_trials(folder)}
    assert sorted(records) == ["a33a4_00001", "t1", "t3"]
    assert records["a33a4_00001"].curve == [(2, 5.0)] and records["a33a4_00001"].attempts == 1
