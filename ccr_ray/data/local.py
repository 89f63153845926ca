"""The training stream without Ray: shards read in order with pyarrow, preprocessed by the same
`TrainPreprocessor` Ray Data runs (pipeline.py), re-cut into fixed-size torch batches. For the training loop in
one process: tests, benchmarks, and machines without a cluster."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from ccr_ray.data.preprocess import PREPROCESS_BATCH, PreprocessSpec, TrainPreprocessor
from ccr_ray.storage import parquet_file


def local_batches(files: Sequence[str], spec: PreprocessSpec, batch_size: int, repeat: bool = True
                  ) -> Iterator[dict]:
    """Batches of `batch_size` samples (torch tensors, every stream language's columns) from `files` in order;
    with `repeat` the files are read again and again (iteration mode), else the last partial batch is dropped."""
    import torch

    pre = TrainPreprocessor(spec)
    pending: dict[str, np.ndarray] | None = None
    while True:
        for file in files:
            for rb in parquet_file(file).iter_batches(batch_size=PREPROCESS_BATCH, columns=spec.columns):
                part = pre({c: rb.column(c).to_numpy(zero_copy_only=False) for c in rb.schema.names})
                pending = part if pending is None else {k: np.concatenate([pending[k], part[k]]) for k in part}
                while len(next(iter(pending.values()))) >= batch_size:
                    yield {k: torch.from_numpy(v[:batch_size]) for k, v in pending.items()}
                    pending = {k: v[batch_size:] for k, v in pending.items()}
        if not repeat:
            return
