"""Shared fixtures: a micro dataset (procedural scenes, generated here), a micro backbone preset, configs.

Nothing downloads: HF_HUB_OFFLINE is set before anything imports transformers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from ccr_ray.ray_utils import own_worker_priority

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Every Ray the suite starts (in this process, a simulated cluster, `ray start`, export/serve.py) runs its workers at
# the suite's priority, as a job's own local Ray does (ccr_ray/ray_utils.py own_worker_priority): at Ray's nice 15
# they got ~2 % of a core beside two CPU hogs
os.environ.update(own_worker_priority())
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Train's 60-s limit on starting a worker group is a speed assumption (a worker imports torch in a new process;
# beside the other xdist worker and two CPU hogs that can take minutes): the suite waits, it does not time out
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
MICRO_PRESET = str(FIXTURES / "micro-vit.json")
SHARED_DATA = Path(os.environ.get("CCR_RAY_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "jobs"))  # tests import the job CLIs by module name

# `make test` runs the suite on two pytest-xdist workers: most of a Ray test's wall time is spent waiting on
# process start-ups, so two run side by side on 2 cores. A group runs whole on one worker: a test file (its
# module fixtures are built once), or all of tests/serve and tests/export (their session fixtures train and
# export a model, built once). Groups are handed out in collection order, which puts the longest first
# (durations of a serial run, NOTES.md "The suite's cost on 2 cores"), so the two workers finish close
# together. (xdist's own --dist loadgroup does not group under pytest 9: it renames item._nodeid, which pytest
# 9 no longer reads; a scheduler of our own groups by path instead.)
LONGEST_FIRST = ("tests/ray/test_multinode.py", "tests/serve", "tests/ray/test_stages_on_ray.py",
                 "tests/ray/test_tune.py", "tests/export", "tests/ray/test_real_text.py",
                 "tests/ray/test_storage.py")
SHARED_SESSION_FIXTURES = ("tests/serve", "tests/export")


# A test marked cpu_hogs (two `yes` beside a service start) slows whatever the other worker runs at the time by
# ~2x: beside the 30-s storage drill it cost that drill 180 s. It is a group of its own, handed out last, when
# the other worker is on short unit-test files or done. (Named here: xdist's scheduler runs in the controller,
# which sees node ids, not markers; collection checks that the marked tests are exactly these.)
CPU_HOGS = {"tests/serve/test_serve_cli.py::test_a_busy_machine_starts_the_service_and_ctrl_c_stops_it"}


def schedule_group(nodeid: str) -> str:
    if nodeid in CPU_HOGS:
        return nodeid
    path = nodeid.split("::", 1)[0]
    return next((d for d in SHARED_SESSION_FIXTURES if path.startswith(d + "/")), path)


def schedule_rank(item: pytest.Item) -> int:
    if item.nodeid in CPU_HOGS:
        return len(LONGEST_FIRST) + 1
    group = schedule_group(item.nodeid)
    return next((i for i, g in enumerate(LONGEST_FIRST) if group == g), len(LONGEST_FIRST))


def pytest_collection_modifyitems(items):
    marked = {item.nodeid for item in items if item.get_closest_marker("cpu_hogs")}
    collected = {item.nodeid for item in items}
    if marked != CPU_HOGS & collected:
        raise pytest.UsageError(f"tests marked cpu_hogs {sorted(marked)} != tests/conftest.py CPU_HOGS "
                                f"{sorted(CPU_HOGS & collected)}: keep the two in step")
    items.sort(key=schedule_rank)  # stable: a file's tests keep their order and stay together


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent without the plugin
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        """xdist's loadscope (whole units, handed out as workers free up) with our groups as the units."""

        def _split_scope(self, nodeid: str) -> str:
            return schedule_group(nodeid)

    return GroupScheduling(config, log)


WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@contextlib.contextmanager
def private_ray(prefix: str = "ccrray-", env: dict | None = None, **init):
    """A private local Ray (never attached to a stray cluster) with a short temp dir (Ray's socket paths have a
    length limit), shut down and removed afterwards."""
    import ray

    from ccr_ray.ray_utils import STATE_API_ENV, environment, start_with_retries

    if ray.is_initialized():
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    # no dashboard: no test of a private cluster asks it anything, and it is one process fewer on cores the other
    # xdist worker shares (the job-submit test starts its own cluster, with one). Its processes' state API is a
    # port nothing serves (1, privileged), so Train's placement-group cleaner gets "unavailable" instead of asking
    # another cluster's dashboard at 127.0.0.1:8265 (export/serve.py's, on the other xdist worker), which answered
    # "not found" for a live controller and the run's workers were killed (ccr_ray/ray_utils.py STATE_API_ENV)
    with environment({STATE_API_ENV: "http://127.0.0.1:1"}):  # (again when a busy machine's start-up gives up)
        start_with_retries(lambda: ray.init(**{
            "address": "local", "num_cpus": 2, "_temp_dir": temp, "log_to_driver": False, "include_dashboard": False,
            "runtime_env": {"env_vars": {**WORKER_ENV, **(env or {})}}, **init}))
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory) -> str:
    """A tiny dataset in the real layout: 256 train / 64 val / 64 test images, 32 px, six languages."""
    from ccr_ray.data.synthetic import DemoDataConfig, write_demo_dataset

    out = tmp_path_factory.mktemp("data") / "micro"
    write_demo_dataset(DemoDataConfig(out=str(out), sizes={"train": 256, "val": 64, "test": 64}, image_size=32,
                                      seed=3, shard_size=128, tokenizer_vocab=1500, workers=1))
    return str(out)


def micro_config(data_root: str, home: str, languages=("de", "zh"), **sections) -> dict:
    """A config dict for `resolve_config(stage, config=...)` on the micro dataset and backbone."""
    cfg = {
        "model": {"backbone": {"name": MICRO_PRESET}, "text": {"embed_dim": 32}, "mla": {"hidden": 16},
                  "dasd": {"core": 8, "latent_dim": 32}, "languages": list(languages)},
        "data": {"pretrain": data_root, "downstream": data_root, "val_max_images": 32, "shuffle_buffer": 0},
        "train": {"batch_size": 16, "max_steps": 4, "eval_every": 2, "log_every": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "run": {"home": home, "experiment": "t"},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


@pytest.fixture()
def micro_cfg(micro_data, tmp_path):
    from ccr_ray.stages import resolve_config

    def make(stage: str, **sections):
        return resolve_config(stage, micro_config(micro_data, str(tmp_path), **sections))

    return make
