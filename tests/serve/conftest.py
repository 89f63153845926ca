"""Service fixtures: a demo model trained here (clip -> nlt -> le, in-process, no Ray), exported to ONNX, its
test-split embeddings and indexes; a private local Ray with Serve on a free loopback port, per test module."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time

import pytest

from ccr_ray.net import free_port
from tests.conftest import micro_config

LANGS = ("de", "zh")
# The schedule that trains the micro backbone well enough that test captions find their image (measured with
# the PyTorch model: T->I R@5 over the first caption of each of the 64 test images, en 0.97, de 0.95, zh 0.97;
# chance 0.08). One torch thread:
# with two, the OpenMP team stalls whenever anything else runs on the second core (50 s instead of 2.5 s
# for 40 `clip` steps here).
SCHEDULE = {"clip": (400, 2e-3), "nlt": (800, 3e-3), "le": (100, 1e-4)}
BATCH = 32


def wait_until(condition, what: str, timeout: float = 120) -> float:
    """Poll `condition` (an event the test waits for, never a guess at a duration); the time it came true."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.1)
    return time.monotonic()


@pytest.fixture(scope="session")
def serve_data(tmp_path_factory) -> str:
    """The demo generator at 32 px: 2,048 train images (256 are too few for test captions to find their
    image), 64 val, 64 test with held-out compositions; six languages."""
    from ccr_ray.data.synthetic import DemoDataConfig, write_demo_dataset

    out = tmp_path_factory.mktemp("serve_data") / "demo"
    write_demo_dataset(DemoDataConfig(out=str(out), sizes={"train": 2048, "val": 64, "test": 64}, image_size=32,
                                      seed=3, shard_size=512, tokenizer_vocab=1500, workers=1))
    return str(out)


def train_chain(data: str, home: str) -> str:
    """clip -> nlt -> le with the production loop (train.loop.run) on local batches; returns le's checkpoint."""
    import torch

    from ccr_ray.data import schema
    from ccr_ray.data.local import local_batches
    from ccr_ray.data.preprocess import PreprocessSpec
    from ccr_ray.stages import resolve_config
    from ccr_ray.train import loop
    from ccr_ray.train.plan import plan_stage
    from ccr_ray.train.state import TrainState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for stage, (steps, lr) in SCHEDULE.items():
            cfg = resolve_config(stage, micro_config(data, home, languages=LANGS, optim={"lr": lr}, train={
                "max_steps": steps, "batch_size": BATCH, "eval_every": 0, "log_every": steps}))
            plan = plan_stage(cfg)  # finds the previous stage's checkpoint under run.home
            spec = PreprocessSpec(languages=tuple(plan.train_languages), inputs=plan.stage.inputs,
                                  image=plan.preprocess if plan.stage.needs_images else None,
                                  context_length=plan.context_length, tokenizer=plan.tokenizer_dir,
                                  dataset_root=plan.dataset_root)
            state = TrainState.create(cfg, plan.tokenizer_dir, plan.parent, "cpu")
            loop.run(state, local_batches(schema.split_files(plan.dataset_root, "train"), spec, BATCH))
            path = state.save(cfg.stage_dir() / "checkpoint", with_optimizer=False)
        return str(path)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_model(serve_data, tmp_path_factory) -> dict:
    """The trained le checkpoint exported (fp32 graphs, parity-checked), the test split's embeddings, an exact
    and an HNSW index over them."""
    import torch

    from ccr_ray.export.onnx_export import export_checkpoint, resolve_plan
    from ccr_ray.inference.embeddings import embed_split_local
    from ccr_ray.inference.index import build_index, embeddings_source

    root = tmp_path_factory.mktemp("demo_model")
    started = time.perf_counter()
    ckpt = train_chain(serve_data, str(root / "home"))
    trained = time.perf_counter() - started
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plan, model, meta = resolve_plan(ckpt, str(root / "onnx"), data=serve_data)
        export_checkpoint(plan, model, meta)
    finally:
        torch.set_num_threads(threads)
    embeddings = str(root / "embeddings")
    embed_split_local(str(root / "onnx"), serve_data, embeddings)
    source = embeddings_source(embeddings)
    meta = {"model": source.sidecar["model"]}
    build_index(source.batches(), "exact", meta=dict(meta)).save(root / "index-exact")
    build_index(source.batches(), "hnsw", count=source.count, meta=dict(meta),
                queries=source.caption_queries(200)).save(root / "index-hnsw")
    print(f"demo model: trained in {trained:.0f}s, ready in {time.perf_counter() - started:.0f}s")
    return {"ckpt": ckpt, "model": str(root / "onnx"), "data": serve_data, "embeddings": embeddings,
            "exact": str(root / "index-exact"), "hnsw": str(root / "index-hnsw")}


@pytest.fixture(scope="module")
def serve_port():
    """A private local Ray with Serve's HTTP ingress on 127.0.0.1:PORT; everything stopped at the end."""
    import ray
    from ray import serve

    from ccr_ray.ray_utils import start_with_retries
    from ccr_ray.serve.ray_env import apply_serve_env, local_ingress_env

    if ray.is_initialized():
        ray.shutdown()
    saved = dict(os.environ)
    temp = tempfile.mkdtemp(prefix="ccrsrv-", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:  # a setup that fails still stops its Ray and restores the environment (later tests' services start clean)
        # Serve's controller, proxy and replicas inherit the environment the local Ray starts with: the proxy gets the
        # time it needs to start on a busy machine, HAProxy is the ingress (its side listeners on free loopback
        # ports), as under export/serve.py (ccr_ray/serve/ray_env.py)
        serve_env = apply_serve_env()
        serve_env.update(local_ingress_env(temp))
        start_with_retries(lambda: ray.init(
            address="local", num_cpus=2, _temp_dir=temp, log_to_driver=False, include_dashboard=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **serve_env}}))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        os.environ.clear()  # later tests' subprocesses (export/serve.py, the serving install) start clean
        os.environ.update(saved)
