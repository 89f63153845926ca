"""2-worker DDP (gloo) equals 1 worker on the same global batch: gradients through the all-gathered contrastive
loss, DDP averaging and BertAdam's per-tensor clipping compose to the single-process update. For DASD (cla, cma)
also the discriminator: its own Adam with hand-averaged gradients, and the adversarial pairing over the global
batch reversal."""

import os
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import micro_config
from tests.ray.conftest import train_logs_tail

pytestmark = pytest.mark.ray
GLOBAL_BATCH = 8
STEPS = 3


def global_batches(micro_data, cfg_dict):
    """The first STEPS global batches of the training stream, read without Ray (every stream language's columns;
    the loop draws each step's language)."""
    from ccr_ray.config import ExperimentConfig
    from ccr_ray.data import schema
    from ccr_ray.data.local import local_batches
    from ccr_ray.data.preprocess import PreprocessSpec
    from ccr_ray.models import backbone
    from ccr_ray.stages import STAGES

    cfg = ExperimentConfig.from_dict(cfg_dict)
    stage = STAGES[cfg.stage]
    clip_cfg = backbone.backbone_model_config(cfg.model.backbone.name)
    spec = PreprocessSpec(languages=tuple(stage.train_languages(cfg.model.languages)), inputs=stage.inputs,
                          image=backbone.preprocess_from_model_config(clip_cfg) if stage.needs_images else None,
                          context_length=77, tokenizer=os.path.join(micro_data, "tokenizer"), dataset_root=micro_data)
    source = local_batches(schema.split_files(micro_data, "train"), spec, GLOBAL_BATCH)
    return [next(source) for _ in range(STEPS)]


def trained_vector(state) -> np.ndarray:
    """Every parameter the stage updates: the model's trainable ones, then DASD's discriminator (if any)."""
    params = [p for _, p in state.model.named_parameters() if p.requires_grad]
    if state.adversary is not None:
        params += list(state.adversary.disc.parameters())
    return torch.cat([p.detach().flatten() for p in params]).numpy()


def run_steps(cfg_dict, data, rank=0, world=1, wrap=None):
    """STEPS steps of the production loop on this rank's share of each global batch."""
    from ccr_ray.config import ExperimentConfig
    from ccr_ray.train import loop
    from ccr_ray.train.state import TrainState

    cfg = ExperimentConfig.from_dict(cfg_dict)
    state = TrainState.create(cfg, os.path.join(data, "tokenizer"), None, "cpu", rank, world)
    if wrap is not None:
        state.module = wrap(state.model)
    local = GLOBAL_BATCH // world
    shares = ({k: v[rank * local:(rank + 1) * local] for k, v in batch.items()}
              for batch in global_batches(data, cfg_dict))
    return loop.run(state, shares)


STAGES_UNDER_TEST = ["le", "nlt", "cla", "cma"]


def train_fn(config):
    """Every stage in turn in one worker group (one Train start-up, ~20 s here, instead of one per stage)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    wrap = lambda model: ray.train.torch.prepare_model(  # noqa: E731
        model, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True,
                                                               "broadcast_buffers": False})
    if rank == 0:  # one line per start of the worker group: the fixture reports a restart
        with open(os.path.join(config["out"], "starts.txt"), "a") as starts:
            starts.write("start\n")
    for stage, experiment in config["experiments"].items():
        state = run_steps(experiment, config["data"], rank, world, wrap)
        # every worker writes what it holds: DDP replicas and the (hand-synchronised) discriminators must agree
        np.save(os.path.join(config["out"], f"{stage}-rank{rank}.npy"), trained_vector(state))
    ray.train.report({"done": 1})


def config_for(stage, micro_data, tmp_path):
    from ccr_ray.stages import resolve_config

    return resolve_config(stage, micro_config(micro_data, str(tmp_path), optim={"lr": 1e-2, "warmup": 0.0},
                                              train={"batch_size": GLOBAL_BATCH, "max_steps": STEPS})).to_dict()


@pytest.fixture(scope="module")
def two_workers(ray_local, micro_data, tmp_path_factory):
    """STEPS steps of every stage on 2 DDP workers; returns the folder of the ranks' trained vectors, and the
    stages' configs."""
    import ray.train
    from ray.train.torch import TorchTrainer

    tmp_path = tmp_path_factory.mktemp("ddp")
    out = tmp_path / "out"
    out.mkdir()
    experiments = {stage: config_for(stage, micro_data, tmp_path) for stage in STAGES_UNDER_TEST}
    trainer = TorchTrainer(
        train_fn, train_loop_config={"experiments": experiments, "data": micro_data, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="ddp", storage_path=str(tmp_path / "ray"),
                                       # a worker that dies (CI saw one die once, no Python error, on a busy
                                       # 2-core VM) restarts the group from scratch, as production's run
                                       # .max_failures does; the outputs are deterministic, and the restart is
                                       # reported as a warning with the dead worker's logs
                                       failure_config=ray.train.FailureConfig(max_failures=1,
                                                                              controller_failure_limit=0)))
    try:
        trainer.fit()
    except Exception as err:
        raise AssertionError(f"{err}\n{train_logs_tail()}") from err
    starts = (out / "starts.txt").read_text().count("start")
    if starts > 1:
        warnings.warn(f"the DDP worker group was restarted ({starts} starts):\n{train_logs_tail()}",
                      stacklevel=2)
    return out, experiments


@pytest.mark.parametrize("stage", STAGES_UNDER_TEST)
def test_two_workers_match_one_worker(two_workers, micro_data, stage):
    """The 1-worker reference runs in this process: the same TrainState code a 1-worker Ray run executes."""
    out, experiments = two_workers
    cfg = experiments[stage]
    rank0, rank1 = np.load(out / f"{stage}-rank0.npy"), np.load(out / f"{stage}-rank1.npy")
    torch.set_num_threads(1)
    one = trained_vector(run_steps(cfg, micro_data))
    from ccr_ray.config import ExperimentConfig
    from ccr_ray.train.state import TrainState

    start = trained_vector(TrainState.create(ExperimentConfig.from_dict(cfg), os.path.join(micro_data, "tokenizer"),
                                             None, "cpu"))
    assert one.shape == rank0.shape == rank1.shape == start.shape
    assert np.abs(one - start).max() > 1e-3  # training moved the weights, so agreement means something
    assert np.array_equal(rank0, rank1)  # replicas (and discriminators) stay identical across workers
    # float reduction order differs (all-gather, gradient averaging); Adam's normalisation magnifies it in a few
    # rarely-updated elements, so bound the worst element loosely and the typical one tightly. Worst elements seen
    # when correct: up to 6.9e-5 (le; it varies between test sessions); a real bug
    # (DASD's adversarial pairs reversed per worker instead of over the global batch) gave 4.3e-4.
    diff = np.abs(rank0 - one)
    assert diff.max() < 2e-4, diff.max()
    assert diff.mean() < 1e-7, diff.mean()
