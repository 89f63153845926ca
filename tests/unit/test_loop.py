"""The training loop without Ray, on the micro model: cadence of logs and validations, the language draw, stop,
resume in slices, and hooks."""

import os

import pytest

from ccr_ray.data import schema
from ccr_ray.data.local import local_batches
from ccr_ray.data.preprocess import PreprocessSpec
from ccr_ray.train import loop
from ccr_ray.train.plan import plan_stage
from ccr_ray.train.state import TrainState


def stream(plan, batch_size=16):
    spec = PreprocessSpec(languages=tuple(plan.train_languages), inputs=plan.stage.inputs,
                          image=plan.preprocess if plan.stage.needs_images else None,
                          context_length=plan.context_length, tokenizer=plan.tokenizer_dir,
                          dataset_root=plan.dataset_root)
    return local_batches(schema.split_files(plan.dataset_root, "train"), spec, batch_size)


@pytest.fixture()
def clip_plan(micro_cfg):
    return plan_stage(micro_cfg("clip", train={"max_steps": 6, "eval_every": 4, "log_every": 2}))


def test_run_steps_logs_and_validates_on_cadence(clip_plan, micro_data):
    state = TrainState.create(clip_plan.cfg, clip_plan.tokenizer_dir, None, "cpu")
    logged, evaluated, stepped = [], [], []
    val = schema.read_split_table(micro_data, "val", ["en"])
    loop.run(state, stream(clip_plan), on_step=lambda s, m: stepped.append((s.step, m["loss"])),
             on_log=lambda s, r: logged.append(r["step"]),
             on_eval=lambda s: evaluated.append((s.step, s.validate(val)["val/mR"])))
    assert state.step == 6
    assert [s for s, _ in stepped] == [1, 2, 3, 4, 5, 6]
    assert logged == [2, 4, 6]  # every log_every steps, and the last
    assert [s for s, _ in evaluated] == [4, 6]  # every eval_every steps, and the last
    assert all(0 <= mr <= 100 for _, mr in evaluated)
    records = [r for r in state.history if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6] and all(r["lang"] == "en" and r["samples_per_s"] > 0
                                                            for r in records)
    assert stepped[0][1] != stepped[-1][1]  # it trained


def test_steps_slices_equal_one_run_and_follow_the_draw(micro_cfg, micro_data, tmp_path):
    """Two slices of 3 steps = one run of 6 (same weights), and every logged language is the seed's draw."""
    import torch

    cfg = micro_cfg("clip", train={"max_steps": 6, "eval_every": 0, "log_every": 1})
    plan = plan_stage(cfg)
    whole = TrainState.create(cfg, plan.tokenizer_dir, None, "cpu")
    loop.run(whole, stream(plan))
    sliced = TrainState.create(cfg, plan.tokenizer_dir, None, "cpu")
    batches = stream(plan)
    loop.run(sliced, batches, steps=3)
    assert sliced.step == 3
    loop.run(sliced, batches, steps=100)  # never past train.max_steps
    assert sliced.step == 6
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), sliced.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_language_for_step_is_a_function_of_seed_and_step():
    langs = ["de", "fr", "zh"]
    draws = [loop.language_for_step(42, s, langs) for s in range(200)]
    assert draws == [loop.language_for_step(42, s, langs) for s in range(200)]
    assert set(draws) == set(langs)  # every language is drawn
    assert draws != [loop.language_for_step(7, s, langs) for s in range(200)]
    assert loop.language_for_step(1, 5, ["ja"]) == "ja"


def test_each_step_trains_the_drawn_language(micro_cfg, micro_data, tmp_path):
    """nlt: the log names the language of every step, and it is the seed's draw for that step."""
    clip = micro_cfg("clip")
    TrainState.create(clip, os.path.join(micro_data, "tokenizer"), None, "cpu").save(
        clip.stage_dir() / "checkpoint", with_optimizer=False)
    plan = plan_stage(micro_cfg("nlt", train={"max_steps": 6, "log_every": 1, "eval_every": 0}))
    state = TrainState.create(plan.cfg, plan.tokenizer_dir, plan.parent, "cpu")
    loop.run(state, stream(plan))
    langs = [r["lang"] for r in state.history if "loss" in r]
    assert langs == [loop.language_for_step(plan.cfg.train.seed, s, ["de", "zh"]) for s in range(6)]
    assert set(langs) == {"de", "zh"}


def test_a_hook_that_raises_stops_the_loop(clip_plan):
    state = TrainState.create(clip_plan.cfg, clip_plan.tokenizer_dir, None, "cpu")

    def boom(s, m):
        if s.step == 2:
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        loop.run(state, stream(clip_plan), on_step=boom)
    assert state.step == 2
