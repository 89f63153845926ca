"""Default intra-op threads per training worker leave Ray Data's CPUs to Ray Data."""

import pytest

from ccr_ray.train.worker import default_torch_threads


@pytest.mark.parametrize(("cpus", "data_cpus", "workers", "expected"), [
    (2, 1.0, 1, 1),    # the demo machine: one core for the stream, one for torch
    (2, 1.0, 2, 1),    # never fewer than one
    (16, 1.0, 1, 15),  # a GPU node
    (16, 1.5, 2, 7),   # fractional data CPUs reserve the whole core they touch
    (8, 0.5, 4, 1),
])
def test_default_torch_threads(cpus, data_cpus, workers, expected):
    assert default_torch_threads(cpus, data_cpus, workers) == expected
