"""Batch embeddings of a dataset split with the torch-free runtime, on Ray Data (the only Ray code in export).

    read_parquet(split shards) -> map_batches(EmbedBatch, actor pool: the ONNX sessions load once per actor)
                               -> write_parquet(OUT)

One output row per image and per caption (schema `EMBEDDING_SCHEMA`):

    id             string        the image id (captions carry the id of their image)
    kind           string        "image" or "text"
    lang           string        caption language; null for images
    caption_index  int32         index in the image's caption list of that language; -1 for images
    text           string        the caption; null for images
    fold           int16         the image's k-fold id (-1: none), for fold-wise evaluation
    embedding      list<float32> L2-normalised, D values

plus OUT/embeddings.json: model fingerprint, data, split, languages, precision, row counts. The folder is
written beside OUT and swapped in at the end, so readers never see half an output. `embed_table` is the
Ray-free core (one batch), used by the actors, the tests and the benchmark.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from ccr_ray import runtime as rt
from ccr_ray.data import schema
from ccr_ray.data.transforms import open_image
from ccr_ray.ray_utils import RayUnavailable, ensure_ray, read_parquet_blocks
from ccr_ray.storage import swap_in

log = logging.getLogger(__name__)

SIDECAR = "embeddings.json"
ID, KIND, LANG, CAPTION_INDEX, TEXT, FOLD, EMBEDDING = "id", "kind", "lang", "caption_index", "text", "fold", "embedding"
IMAGE_KIND, TEXT_KIND = "image", "text"
BLOCKS_PER_ACTOR = 4  # input blocks per actor: small enough to balance the pool, large enough to amortise calls
EMBEDDING_SCHEMA = pa.schema([
    pa.field(ID, pa.string(), nullable=False),
    pa.field(KIND, pa.string(), nullable=False),
    pa.field(LANG, pa.string()),
    pa.field(CAPTION_INDEX, pa.int32(), nullable=False),
    pa.field(TEXT, pa.string()),
    pa.field(FOLD, pa.int16(), nullable=False),
    pa.field(EMBEDDING, pa.list_(pa.float32()), nullable=False),
])


class EmbedError(ValueError):
    """Bad input to the embedding job (model folder, dataset, split, languages); the message names it."""


def _embedding_column(matrix: np.ndarray) -> pa.Array:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)  # [N, D]
    offsets = np.arange(len(matrix) + 1, dtype=np.int32) * matrix.shape[1]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.reshape(-1)))


def embed_table(encoder: rt.Encoder, table: pa.Table, languages: Sequence[str], root: str | None = None,
                images: bool = True) -> pa.Table:
    """Rows of a dataset split (schema.py) -> embedding rows (EMBEDDING_SCHEMA)."""
    ids = table[schema.IMAGE_ID].to_pylist()
    folds = (table[schema.FOLD].to_pylist() if schema.FOLD in table.column_names else [schema.NO_FOLD] * len(ids))
    cols: dict[str, list] = {ID: [], KIND: [], LANG: [], CAPTION_INDEX: [], TEXT: [], FOLD: []}
    matrices: list[np.ndarray] = []

    def add(kind: str, lang: str | None, row_ids: list[str], index: list[int], texts: list, row_folds: list[int],
            matrix: np.ndarray) -> None:
        n = len(row_ids)
        cols[ID] += row_ids
        cols[KIND] += [kind] * n
        cols[LANG] += [lang] * n
        cols[CAPTION_INDEX] += index
        cols[TEXT] += texts
        cols[FOLD] += row_folds
        matrices.append(matrix)

    if images and ids:
        data = table[schema.IMAGE].to_pylist() if schema.IMAGE in table.column_names else [None] * len(ids)
        paths = table[schema.IMAGE_PATH].to_pylist() if schema.IMAGE_PATH in table.column_names else [None] * len(ids)
        decoded = []
        for image_id, d, p in zip(ids, data, paths):
            try:
                decoded.append(open_image(d, p, root))
            except Exception as err:  # noqa: BLE001 - name the record whatever the decoder raised
                raise EmbedError(f"image {image_id!r} ({p or 'embedded bytes'}): cannot decode: "
                                 f"{type(err).__name__}: {err}") from None
        add(IMAGE_KIND, None, ids, [-1] * len(ids), [None] * len(ids), folds, encoder.encode_image(decoded))
    for lang in languages:
        column = schema.captions_column(lang)
        if column not in table.column_names:
            raise EmbedError(f"data: no column {column} (language {lang!r}) in the dataset rows")
        captions = table[column].to_pylist()
        row = [r for r, caps in enumerate(captions) for _ in (caps or [])]
        texts = [str(c) for caps in captions for c in (caps or [])]
        if not texts:
            continue
        index = [k for caps in captions for k in range(len(caps or []))]
        add(TEXT_KIND, lang, [ids[r] for r in row], index, texts, [folds[r] for r in row],
            encoder.encode_text(texts, lang))
    matrix = np.concatenate(matrices) if matrices else np.zeros((0, encoder.embed_dim), dtype=np.float32)
    arrays = [pa.array(cols[name], type=EMBEDDING_SCHEMA.field(name).type) for name in (ID, KIND, LANG, CAPTION_INDEX,
                                                                                         TEXT, FOLD)]
    return pa.Table.from_arrays([*arrays, _embedding_column(matrix)], schema=EMBEDDING_SCHEMA)


class EmbedBatch:
    """The actor-pool callable: loads the ONNX sessions once per actor, then embeds batch after batch."""

    def __init__(self, model_dir: str, languages: list[str], dataset_root: str, precision: str = "fp32",
                 threads: int = 1):
        # no spinning: actors share the node's cores with other actors and tasks
        self.encoder = rt.Encoder(model_dir, precision=precision, threads=threads, spinning=False)
        self.languages = list(languages)
        self.root = dataset_root

    def __call__(self, batch: pa.Table) -> pa.Table:
        return embed_table(self.encoder, batch, self.languages, self.root)


def resolve_languages(manifest: dict, data_languages: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    available = [lang for lang in manifest["languages"] if lang in data_languages]
    if not wanted:
        if not available:
            raise EmbedError(f"the model's languages ({', '.join(manifest['languages'])}) and the data's "
                             f"({', '.join(data_languages)}) have none in common")
        return available
    not_model = [lang for lang in wanted if lang not in manifest["languages"]]
    if not_model:
        raise EmbedError(f"--langs: the model has no {', '.join(not_model)} (it has "
                         f"{', '.join(manifest['languages'])})")
    not_data = [lang for lang in wanted if lang not in data_languages]
    if not_data:
        raise EmbedError(f"--langs: the data has no captions in {', '.join(not_data)} (it has "
                         f"{', '.join(data_languages)})")
    return list(wanted)


def embed_dataset(model_dir: str, data: str, out: str, split: str = "test", languages: Sequence[str] | None = None,
                  precision: str = "fp32", concurrency: int = 2, cpus_per_actor: float = 0.5, batch_size: int = 64,
                  progress: bool = True) -> dict:
    """Embed every image and caption of `data`'s `split` with an actor pool; returns the sidecar dict.

    Joins or starts Ray as every job does (ray_utils.ensure_ray) unless it is already initialised."""
    try:
        manifest = rt.load_manifest(model_dir)
        files = schema.split_files(data, split)
        dataset = schema.load_manifest(data)
    except (rt.ModelFolderError, schema.DatasetError) as err:
        raise EmbedError(str(err)) from None
    if precision == "int8" and not any(r.endswith(rt.INT8_SUFFIX) for r in manifest["graphs"]):
        raise EmbedError(f"--int8: {model_dir} has no int8 graphs (export with --int8)")
    langs = resolve_languages(manifest, dataset.languages, languages)
    if concurrency < 1 or cpus_per_actor <= 0 or batch_size < 1:
        raise EmbedError("--concurrency and --batch-size must be >= 1 and --cpus-per-actor > 0")
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise EmbedError(f"--out: {out} is a file, not a folder")
    if out_path.exists() and any(out_path.iterdir()) and not (out_path / SIDECAR).exists():
        raise EmbedError(f"--out: {out} exists, is not empty and holds no {SIDECAR}; refusing to replace it")

    import ray
    import ray.data

    try:
        ensure_ray(log_to_driver=False)
    except RayUnavailable as err:
        raise EmbedError(str(err)) from None
    started = time.perf_counter()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    columns = [schema.IMAGE_ID, schema.FOLD, schema.IMAGE, schema.IMAGE_PATH, *map(schema.captions_column, langs)]
    # row-group blocks (V1 reader), so every actor of the pool gets work
    ds = read_parquet_blocks(files, columns=columns, num_cpus=cpus_per_actor,
                             override_num_blocks=max(len(files), BLOCKS_PER_ACTOR * concurrency))
    ds = ds.map_batches(EmbedBatch, fn_constructor_kwargs={
        "model_dir": str(Path(model_dir).resolve()), "languages": langs, "dataset_root": str(Path(data).resolve()),
        "precision": precision, "threads": max(1, int(cpus_per_actor))},
        batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cpus_per_actor)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        ds.write_parquet(str(tmp))
        written = read_embeddings(tmp, require_sidecar=False)
        kinds = written[KIND].to_numpy(zero_copy_only=False)
        text_langs = written[LANG].to_numpy(zero_copy_only=False)[kinds == TEXT_KIND]
        sidecar = {"model": manifest.get("model", {}), "model_dir": str(Path(model_dir).resolve()),
                   "data": str(Path(data).resolve()), "split": split, "languages": langs, "precision": precision,
                   "embed_dim": manifest["embed_dim"], "images": int((kinds == IMAGE_KIND).sum()),
                   "captions": {lang: int((text_langs == lang).sum()) for lang in langs},
                   "seconds": round(time.perf_counter() - started, 2), "actors": concurrency,
                   "cpus_per_actor": cpus_per_actor}
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))
        swap_in(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sidecar


def embed_split_local(model_dir: str, data: str, out: str | os.PathLike, split: str = "test",
                      languages: Sequence[str] | None = None, precision: str = "fp32") -> dict:
    """`embed_dataset`'s output for a small split, computed in this process without Ray (tests, benchmarks,
    a few thousand images). Returns the sidecar."""
    import pyarrow.parquet as pq

    encoder = rt.Encoder(model_dir, precision=precision)
    dataset = schema.load_manifest(data)
    langs = resolve_languages(encoder.manifest, dataset.languages, languages)
    rows = embed_table(encoder, schema.read_split_table(data, split, langs), langs, root=str(Path(data).resolve()))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    pq.write_table(rows, out / "part-00000.parquet")
    kinds = rows[KIND].to_numpy(zero_copy_only=False)
    text_langs = rows[LANG].to_numpy(zero_copy_only=False)[kinds == TEXT_KIND]
    sidecar = {"model": encoder.manifest.get("model", {}), "model_dir": str(Path(model_dir).resolve()),
               "data": str(Path(data).resolve()), "split": split, "languages": langs, "precision": precision,
               "embed_dim": encoder.embed_dim, "images": int((kinds == IMAGE_KIND).sum()),
               "captions": {lang: int((text_langs == lang).sum()) for lang in langs}}
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2))
    return sidecar


def ray_image_batches(files: Sequence[str], batch_rows: int = 65536) -> Iterator[pa.Table]:
    """The image rows (id, kind, embedding) of embeddings files, read and filtered in Ray Data tasks and
    streamed to the caller batch by batch, each row once (export/build_index.py --engine ray). Joins or starts Ray
    as every job does (ray_utils.ensure_ray) unless it is already initialised."""
    import ray
    import ray.data
    from ray.data.expressions import col

    try:
        ensure_ray(log_to_driver=False)
    except RayUnavailable as err:
        raise EmbedError(str(err)) from None
    ds = ray.data.read_parquet(list(files), columns=[ID, KIND, EMBEDDING])
    for table in ds.filter(expr=col(KIND) == IMAGE_KIND).iter_batches(batch_size=batch_rows, batch_format="pyarrow"):
        if table.num_rows:
            yield table


def read_embeddings(path: str | os.PathLike, require_sidecar: bool = True) -> pa.Table:
    """Every row of an embeddings folder (or one Parquet file) as one table."""
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if require_sidecar and not (path / SIDECAR).exists():
            raise EmbedError(f"{path}: no {SIDECAR} (is it a folder written by export/embed.py?)")
        if not files:
            raise EmbedError(f"{path}: no Parquet files")
    elif path.is_file():
        files = [path]
    else:
        raise EmbedError(f"{path}: no such embeddings folder or file")
    tables = [pq.read_table(f) for f in files]
    missing = [c for c in EMBEDDING_SCHEMA.names if c not in tables[0].column_names]
    if missing:
        raise EmbedError(f"{files[0]}: not an embeddings file (missing columns {missing})")
    return pa.concat_tables([t.select(EMBEDDING_SCHEMA.names).cast(EMBEDDING_SCHEMA) for t in tables])


def read_sidecar(path: str | os.PathLike) -> dict:
    file = Path(path) / SIDECAR
    return json.loads(file.read_text()) if file.exists() else {}


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The embedding column as a float32 [N, D] matrix."""
    column = table[EMBEDDING].combine_chunks()
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), -1).astype(np.float32, copy=False)
