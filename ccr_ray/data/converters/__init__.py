"""Real-data converters: each source is a small Ray-free module whose `parse(...)` returns a `ParseResult`
(records in evaluation order + quarantined rejects); `shards.process_shard` checks images and writes one Parquet
shard; `ccr_ray.data.ingest` runs the shards in parallel on Ray Data; `jobs/prepare_data.py` is the CLI, which
asks each source for its options (`add_arguments`) and hands it the parsed arguments (`from_args`).

    seeds      the MLA/DASD path JSON + caption JSON + .npy split layout (spec 4.4), k-fold name lists -> fold
    cc300k     UC2 translated CC3M TSVs -> the seeds' CC300K selection
    multi30k   Multi30K raw text files (task1 translations, task2 descriptions)
    xtd10      XTD10 caption files parallel to test_image_names.txt
    xflickrco  IGLUE xFlickr&CO JSON lines
    coco-cn    COCO-CN sentence files
"""

import importlib
from types import ModuleType

# source name -> converter module; each module has HELP, add_arguments(parser) and from_args(args, languages)
SOURCES = {"seeds": "seeds", "cc300k": "cc300k", "multi30k": "multi30k", "xtd10": "xtd10", "xflickrco": "xflickrco",
           "coco-cn": "coco_cn"}


def source(name: str) -> ModuleType:
    """The converter module of a source (imported on demand)."""
    if name not in SOURCES:
        raise KeyError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    return importlib.import_module(f"ccr_ray.data.converters.{SOURCES[name]}")
