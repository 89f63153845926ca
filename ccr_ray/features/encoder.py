"""Encoding a split with the frozen towers (torch): the encoder both builders run, one actor or one process each.

Features are computed in fp32, in eval mode, without gradients, by the functions the model itself runs
(`backbone.encode_image` / `backbone.encode_text_en`), so a stage gives the same losses with and without the cache
up to float reordering (batched matmuls over different batch shapes, ~1e-6).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from ccr_ray.data import schema
from ccr_ray.data.transforms import ImageTransform, open_image
from ccr_ray.features import CacheError
from ccr_ray.features.keys import CacheKey, CacheRequest
from ccr_ray.features.store import IMAGE_EMBEDDING, TEXT_EN_EMBEDDINGS, CacheInfo, CacheWriter, feature_schema
from ccr_ray.features.weights import load_frozen_clip, tower_digests
from ccr_ray.storage import parquet_file

log = logging.getLogger(__name__)


def encoder_columns(request: CacheRequest) -> list[str]:
    """Dataset columns the encoder reads."""
    cols = [schema.IMAGE_ID]
    if "image" in request.features:
        cols += [schema.IMAGE, schema.IMAGE_PATH]
    if "text_en" in request.features:
        cols.append(schema.captions_column("en"))
    return cols


class FeatureEncoder:
    """Dataset rows -> image_id + embeddings (a pyarrow table, rows in input order).

    A callable class: Ray Data's `map_batches` builds one per actor, so the towers load once per actor
    (build.py); the in-process builder below runs the same class. The features are what
    `CCRModel.forward` would compute: the same functions, fp32, eval mode, no autograd. The actor checks the
    weights it loaded against the planned fingerprint, so a cache can never hold features of other weights.
    """

    def __init__(self, request: CacheRequest, expected: dict[str, str] | None = None, device: str = "cpu",
                 threads: int = 0):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.request = request
        self.device = torch.device(device)
        self.clip = load_frozen_clip(request.weights, request.clip_cfg, request.quick_gelu)
        if expected is not None:
            got = tower_digests(self.clip.state_dict(), request.features)
            changed = [name for name, digest in got.items() if expected.get(name) != digest]
            if changed:
                raise CacheError(f"{request.weights}: the {', '.join(changed)} weights changed since the cache was "
                                 "planned; plan again")
        self.clip.to(self.device)
        self.dim = request.embed_dim
        self.schema = feature_schema(request.features, self.dim)
        self.transform = ImageTransform.from_config(request.preprocess) if "image" in request.features else None
        self.bad_images = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        columns: dict[str, pa.Array] = {schema.IMAGE_ID: pa.array([str(v) for v in batch[schema.IMAGE_ID]],
                                                                 pa.string())}
        if "image" in self.request.features:
            columns[IMAGE_EMBEDDING] = self._images(batch)
        if "text_en" in self.request.features:
            columns[TEXT_EN_EMBEDDINGS] = self._teacher(batch[schema.captions_column("en")])
        return pa.table(columns, schema=self.schema)

    def _encode(self, fn, inputs: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = fn(self.clip, torch.from_numpy(inputs).to(self.device))
        return out.float().cpu().numpy().astype(np.float32, copy=False)

    def _images(self, batch: dict[str, np.ndarray]) -> pa.Array:
        """Decode + transform exactly as TrainPreprocessor does; an undecodable image becomes a null (the stream
        then drops its samples, as it drops them when it decodes images itself)."""
        from ccr_ray.models import backbone

        n = len(batch[schema.IMAGE_ID])
        pixels, ok = [], np.zeros(n, dtype=bool)
        for r in range(n):
            data = batch[schema.IMAGE][r] if schema.IMAGE in batch else None
            path = batch[schema.IMAGE_PATH][r] if schema.IMAGE_PATH in batch else None
            try:
                pixels.append(self.transform(open_image(data, path, self.request.dataset_root or None)))
                ok[r] = True
            except Exception as err:  # noqa: BLE001 - any decoder error makes the record unusable
                self.bad_images += 1
                log.warning("feature cache: undecodable image %s (%s: %s) is stored as null; %d so far",
                            batch[schema.IMAGE_ID][r], type(err).__name__, err, self.bad_images)
        values = np.zeros((n, self.dim), dtype=np.float32)
        if pixels:
            values[ok] = self._encode(backbone.encode_image, np.stack(pixels))  # [n_ok, D]
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), self.dim, mask=pa.array(~ok))

    def _teacher(self, captions: np.ndarray) -> pa.Array:
        """Every English caption of every row, tokenized as the stream tokenizes it; encoded with the padding
        columns that are padding in every row cut (exact under the causal mask, as `trim_padding` in training)."""
        from ccr_ray.models import backbone
        from ccr_ray.tokenization import english_tokenizer, english_tokenizer_folder

        counts = np.asarray([len(c) for c in captions], dtype=np.int64)
        texts = [str(t) for c in captions for t in c]
        values = np.zeros((len(texts), self.dim), dtype=np.float32)
        if texts:
            tokenize = english_tokenizer(self.request.context_length, english_tokenizer_folder(self.request.clip_cfg))
            ids = tokenize.trim(tokenize(texts))  # [N, T], common padding cut
            values = self._encode(backbone.encode_text_en, ids)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), self.dim)
        return pa.ListArray.from_arrays(pa.array(offsets), inner)


def build_cache_in_process(request: CacheRequest, key: CacheKey, batch_size: int = 64, replace: bool = False,
                           device: str = "cpu") -> CacheInfo:
    """The cache without Ray: one encoder in this process over the shards in order (tests, benchmarks, and
    machines without a cluster). Same encoder and writer as the Ray build."""
    encoder = FeatureEncoder(request, expected=key.components, device=device)
    writer = CacheWriter(request, key)
    try:
        for source in writer.sources:
            for rb in parquet_file(source).iter_batches(batch_size=batch_size, columns=encoder_columns(request)):
                writer.add(encoder({c: rb.column(c).to_numpy(zero_copy_only=False) for c in rb.schema.names}))
        return writer.finish({"builder": "in-process", "batch_size": batch_size}, replace=replace)
    except BaseException:
        writer.abort()
        raise
