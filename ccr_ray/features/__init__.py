"""The frozen-feature cache: image and English-teacher embeddings of a training split, computed once by the frozen
CLIP towers and read by the training stream instead of images and English captions.

    keys.py      what a stage may cache (from the stage table) and the fingerprint of a cache's inputs
    weights.py   the frozen towers' weights: loaded from the parent checkpoint or a CLIP file, per-tower digests
    store.py     the Parquet + JSON layout, validity, writing with an atomic publish, reading (pyarrow only)
    encoder.py   the frozen towers encoding rows (torch), and a build in one process
    plan.py      the stage's cache plan (driver, before any cluster work) and open-or-build
    build.py     the build on Ray Data: an actor pool holding the towers

`jobs/cache_features.py` builds or checks a cache ahead of time; `data.feature_cache=true` makes a stage build it
when missing or stale, then its training stream reads the cache's shards (data/pipeline.py).
"""


class CacheError(ValueError):
    """A cache cannot be planned, built or read; the message names the path or field."""
