"""The converters' parallel writer: the only Ray code of data preparation.

Parsing (converters/*) runs in the driver without Ray. Here each shard of records becomes one Ray Data row; a
`map_batches` task per shard checks and reads its images, counts captions the tokenizers would truncate and writes
the shard's Parquet file (`converters.shards.process_shard`), returning a small summary table that the driver
streams back. One pass over the images, nothing image-sized in the object store, and a shard's order is its
records' order, so evaluation order survives.

Files are written by the tasks, so on a multi-node cluster `--out` and the images must be on a filesystem every
node sees.
"""

from __future__ import annotations

import pyarrow as pa
import ray
import ray.data

from ccr_ray.data.converters.shards import SUMMARY_SCHEMA, WriteSpec, process_shard


def process_batch(batch: pa.Table, spec: WriteSpec) -> pa.Table:
    tables = [process_shard(row["split"], int(row["shard"]), row["records"], spec) for row in batch.to_pylist()]
    return pa.concat_tables(tables) if tables else SUMMARY_SCHEMA.empty_table()



def run_shards(shards: list[dict], spec: WriteSpec, task_cpus: float = 0.5) -> pa.Table:
    """Process every shard in parallel; the concatenated summaries (record and shard rows)."""
    if not shards:
        return SUMMARY_SCHEMA.empty_table()
    ds = ray.data.from_items(shards, override_num_blocks=len(shards))  # one block (one task) per shard
    ds = ds.map_batches(process_batch, fn_kwargs={"spec": spec}, batch_size=1, batch_format="pyarrow",
                        num_cpus=task_cpus)
    tables = [t for t in ds.iter_batches(batch_size=None, batch_format="pyarrow") if t.num_rows]
    return pa.concat_tables(tables).cast(SUMMARY_SCHEMA) if tables else SUMMARY_SCHEMA.empty_table()
