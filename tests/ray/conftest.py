"""A private local Ray cluster per test module (never attaches to a stray cluster; private temp dir)."""

import os
import tempfile

import pytest

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="ccrray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(address="local", num_cpus=2, _temp_dir=temp, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
    os.system(f"rm -rf {temp}")
