"""Image indexes for text -> image search: exact (one matrix product) or approximate (faiss IVF or HNSW).

    index = build_index(embeddings_source("embeddings/demo-test").batches(), kind="hnsw", count=n, ...)
    index.save("indexes/demo")                      # index.json + ids.parquet + vectors.f32 | index.faiss
    index = Index.load("indexes/demo")              # or an embeddings folder: an exact index in memory
    index.check_model(encoder)                      # queries from another model are refused
    hits = index.top_k(encoder.encode_text(["ein roter Kreis"], "de"), k=10)   # [[(image id, cosine), ...]]

Every vector is L2-normalised, so inner product = cosine, the score the evaluation ranks by. An approximate
index is built in one pass over a stream of (ids, vectors) batches (a local Parquet reader or Ray Data), its
recall@10 against exact search is measured on build (caption embeddings as queries when the embeddings hold
them, else a random sample of the images with each query's own image left out), the cheapest search setting
(IVF `nprobe`, HNSW `efSearch`) that reaches `min_recall` is kept, and the build is refused when none does. The
figures, the image ids and the model fingerprint travel with the index (index.json, ids.parquet).

Torch-free and Ray-free (the Ray Data source is `embeddings.ray_image_batches`); faiss is imported only for
approximate indexes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ccr_ray.inference.embeddings import (
    EMBEDDING,
    ID,
    IMAGE_KIND,
    KIND,
    TEXT_KIND,
    EmbedError,
    embedding_matrix,
    read_sidecar,
)

FORMAT = "ccr_ray.index"
FORMAT_VERSION = 1
META_FILE = "index.json"
IDS_FILE = "ids.parquet"
VECTORS_FILE = "vectors.f32"  # exact: raw float32 [N, D], row-major (written batch by batch, shape in index.json)
FAISS_FILE = "index.faiss"
KINDS = ("exact", "ivf", "hnsw")
RECALL_K = 10
DEFAULT_MIN_RECALL = 0.98
DEFAULT_QUERIES = 1000
LARGE = 200_000  # images above which export/build_index.py streams the embeddings through Ray Data by default
NPROBE_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
EF_SEARCH_LADDER = (16, 32, 64, 128, 256, 512)
SCORE_BUDGET = 1 << 25  # floats of a [Q, N] exact score block (128 MB): queries are chunked to stay under it

Batch = tuple[list[str], np.ndarray]


class SearchIndexError(ValueError):
    """A bad index folder, a bad build request or a model mismatch; the message names the path or option."""


class RecallError(SearchIndexError):
    """An approximate index missed the recall threshold with every search setting it was allowed to try."""


def _faiss():
    try:
        import faiss
    except ImportError:
        raise SearchIndexError("approximate indexes need faiss: pip install faiss-cpu (or 'ccr-ray[serve]')") from None
    return faiss


def _normalise(matrix: np.ndarray) -> np.ndarray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


# ------------------------------------------------------------------------------------------------ the index


@dataclass
class Index:
    """Image ids and their vectors, searchable by cosine; `meta` is index.json (or an embeddings sidecar)."""

    ids: list[str]
    matrix: np.ndarray | None = None  # exact: [N, D] float32, L2-normalised
    meta: dict = field(default_factory=dict)
    kind: str = "exact"
    faiss_index: Any = None  # ivf / hnsw
    params: dict = field(default_factory=dict)  # search settings: nprobe (ivf), ef_search (hnsw)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SearchIndexError(f"kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "exact":
            if self.matrix is None:
                raise SearchIndexError("an exact index needs its matrix")
            self.matrix = np.ascontiguousarray(self.matrix, dtype=np.float32)
            if len(self.matrix) != len(self.ids):
                raise SearchIndexError(f"{len(self.ids)} ids but {len(self.matrix)} vectors")
        elif self.faiss_index is None:
            raise SearchIndexError(f"a {self.kind} index needs its faiss index")
        elif self.faiss_index.ntotal != len(self.ids):
            raise SearchIndexError(f"{len(self.ids)} ids but {self.faiss_index.ntotal} vectors in the faiss index")
        self.apply_params(self.params)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1]) if self.kind == "exact" else int(self.faiss_index.d)

    @property
    def fingerprint(self) -> str | None:
        return (self.meta.get("model") or {}).get("fingerprint")

    def apply_params(self, params: dict) -> None:
        self.params = dict(params)
        if self.kind == "ivf" and "nprobe" in params:
            self.faiss_index.nprobe = int(params["nprobe"])
        elif self.kind == "hnsw" and "ef_search" in params:
            self.faiss_index.hnsw.efSearch = int(params["ef_search"])

    @staticmethod
    def set_threads(threads: int) -> None:
        """faiss's OpenMP threads (a Serve replica gets its share of the node, not every core)."""
        try:
            import faiss
        except ImportError:
            return
        faiss.omp_set_num_threads(max(1, int(threads)))

    # -------------------------------------------------------------------------------------------- search
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, D] (normalised) -> (scores, rows), each [Q, min(k, N)], best first; row -1 = no hit."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise SearchIndexError(f"queries have {queries.shape[1]} dims, the index {self.dim}")
        k = max(1, min(int(k), len(self.ids)))
        if self.kind == "exact":
            return exact_search(self.matrix, queries, k)
        scores, rows = self.faiss_index.search(queries, k)
        return scores, rows

    def top_k(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """For each query, the k best (image id, cosine), best first."""
        scores, rows = self.search(queries, k)
        return [[(self.ids[r], float(s)) for s, r in zip(srow, rrow) if r >= 0] for srow, rrow in zip(scores, rows)]

    def check_model(self, encoder) -> None:
        """Queries and images must come from the same weights, or scores are meaningless."""
        mismatch = image_mismatch(self.meta.get("model") or {}, encoder.manifest.get("model") or {})
        if mismatch:
            stored, current = mismatch
            raise EmbedError(f"the image embeddings were made by model {stored[:12]}, the query encoder in "
                             f"{encoder.folder} is model {current[:12]}; re-run export/embed.py with this model")
        if self.dim != encoder.embed_dim:
            raise EmbedError(f"image embeddings have {self.dim} dims, the model {encoder.embed_dim}")

    # -------------------------------------------------------------------------------------------- files
    @staticmethod
    def check_out_folder(folder: str | os.PathLike) -> None:
        """A folder `save` may write: absent, empty or an earlier index (build_index.py checks before it builds)."""
        out = Path(folder)
        if out.exists() and not out.is_dir():
            raise SearchIndexError(f"--out: {out} is a file, not a folder")
        if out.exists() and any(out.iterdir()) and not (out / META_FILE).exists():
            raise SearchIndexError(f"--out: {out} exists, is not empty and is not an index folder; refusing to "
                                   "replace it")

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the index folder (into a temporary sibling, swapped in at the end)."""
        out = Path(folder)
        self.check_out_folder(out)
        import pyarrow.parquet as pq

        from ccr_ray.storage import staged_folder

        with staged_folder(out) as tmp:  # written beside `out`, swapped in with renames at the end
            pq.write_table(pa.table({ID: pa.array(self.ids, pa.string())}), tmp / IDS_FILE)
            if self.kind == "exact":
                self.matrix.tofile(tmp / VECTORS_FILE)
            else:
                _faiss().write_index(self.faiss_index, str(tmp / FAISS_FILE))
            meta = {**self.meta, "format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind,
                    "count": len(self.ids), "embed_dim": self.dim, "params": self.params,
                    "files": {"ids": IDS_FILE, "vectors": VECTORS_FILE if self.kind == "exact" else FAISS_FILE}}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        self.meta = meta
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> Index:
        """An index folder (export/build_index.py), or an embeddings folder / file (export/embed.py), whose
        images become an exact index."""
        path = Path(path)
        if (path / META_FILE).exists():
            return cls._load_folder(path)
        from ccr_ray.inference.embeddings import read_embeddings

        if not path.exists():
            raise EmbedError(f"{path}: no such index or embeddings folder")
        import pyarrow.compute as pc

        table = read_embeddings(path)
        images = table.filter(pc.equal(table[KIND], IMAGE_KIND))
        if images.num_rows == 0:
            raise EmbedError(f"{path}: no image embeddings to search")
        meta = read_sidecar(path) if path.is_dir() else {}
        return cls(images[ID].to_pylist(), embedding_matrix(images), {**meta, "kind": "exact", "source": str(path)})

    @classmethod
    def _load_folder(cls, path: Path) -> Index:
        import pyarrow.parquet as pq

        try:
            meta = json.loads((path / META_FILE).read_text())
        except json.JSONDecodeError as err:
            raise SearchIndexError(f"{path / META_FILE}: malformed JSON: {err}") from None
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise SearchIndexError(f"{path / META_FILE}: not a {FORMAT} v{FORMAT_VERSION} index "
                                   f"(format {meta.get('format')!r}, version {meta.get('format_version')!r})")
        for key in ("kind", "count", "embed_dim"):
            if key not in meta:
                raise SearchIndexError(f"{path / META_FILE}: missing field {key!r}")
        ids_file = path / IDS_FILE
        if not ids_file.exists():
            raise SearchIndexError(f"{ids_file}: missing (the image ids of the index)")
        ids = pq.read_table(ids_file, columns=[ID])[ID].to_pylist()
        kind, count, dim = meta["kind"], int(meta["count"]), int(meta["embed_dim"])
        if len(ids) != count:
            raise SearchIndexError(f"{ids_file}: {len(ids)} ids, index.json says {count}")
        if kind == "exact":
            vectors = path / VECTORS_FILE
            if not vectors.exists() or vectors.stat().st_size != count * dim * 4:
                raise SearchIndexError(f"{vectors}: missing or not {count} x {dim} float32 values")
            matrix = np.fromfile(vectors, dtype=np.float32).reshape(count, dim)
            return cls(ids, matrix, meta, params=meta.get("params", {}))
        file = path / FAISS_FILE
        if not file.exists():
            raise SearchIndexError(f"{file}: missing (the faiss index)")
        return cls(ids, None, meta, kind=kind, faiss_index=_faiss().read_index(str(file)),
                   params=meta.get("params", {}))


def read_index_meta(path: str | os.PathLike) -> dict:
    """What an index (index.json) or an embeddings folder (its sidecar) says about itself, without loading
    vectors: enough to check the model fingerprint and dimension before starting a service."""
    path = Path(path)
    if (path / META_FILE).exists():
        try:
            return json.loads((path / META_FILE).read_text())
        except json.JSONDecodeError as err:
            raise SearchIndexError(f"{path / META_FILE}: malformed JSON: {err}") from None
    if path.is_dir() and read_sidecar(path):
        return read_sidecar(path)
    raise SearchIndexError(f"{path}: neither an index folder (index.json) nor an embeddings folder "
                           "(embeddings.json)")


def image_mismatch(stored: dict, current: dict) -> tuple[str, str] | None:
    """(stored, current) fingerprints when the images an index holds were embedded by other weights than the
    model's; None when they match. An image embedding depends on the image tower alone, so a model that changed
    elsewhere (a language added, text adapters retrained) keeps its index; exports without the image tower's own
    fingerprint compare whole models."""
    key = "image_fingerprint" if stored.get("image_fingerprint") and current.get("image_fingerprint") \
        else "fingerprint"
    a, b = stored.get(key), current.get(key)
    return (a, b) if a and b and a != b else None


def check_pair(manifest: dict, meta: dict, where: str = "--index") -> None:
    """The index's images and the model's queries must come from the same weights and have the same size."""
    mismatch = image_mismatch(meta.get("model") or {}, manifest.get("model") or {})
    if mismatch:
        stored, current = mismatch
        raise SearchIndexError(f"{where}: its images were embedded by model {stored[:12]}, the model to serve is "
                               f"{current[:12]}; re-run export/embed.py and export/build_index.py with this model")
    if meta.get("embed_dim") is not None and int(meta["embed_dim"]) != int(manifest["embed_dim"]):
        raise SearchIndexError(f"{where}: {meta['embed_dim']}-dim vectors, the model's are {manifest['embed_dim']}")


def exact_search(matrix: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of matrix by inner product, best first (ties: lower row first, as a stable sort ranks them);
    queries are chunked so a [Q, N] score block stays under SCORE_BUDGET floats."""
    n = len(matrix)
    k = max(1, min(int(k), n))
    step = max(1, SCORE_BUDGET // max(n, 1))
    out_scores = np.empty((len(queries), k), dtype=np.float32)
    out_rows = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), step):
        scores = queries[start:start + step] @ matrix.T  # [q, N]
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(scores), 1))
        for i, (row, cand) in enumerate(zip(scores, best)):
            cand = np.sort(cand)  # stable order among equal scores: lower row first
            ranked = cand[np.argsort(-row[cand], kind="stable")]
            out_rows[start + i] = ranked
            out_scores[start + i] = row[ranked]
    return out_scores, out_rows


# ------------------------------------------------------------------------------------------------ recall


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = RECALL_K, exclude: np.ndarray | None = None) -> float:
    """Mean |found top-k ∩ true top-k| / k over queries. `exclude[q]`: a row to leave out of both lists (the
    query's own image when images are the queries), so a trivial self-match does not count."""
    total = 0.0
    for q in range(len(truth)):
        skip = -2 if exclude is None else int(exclude[q])
        t = [r for r in truth[q] if r != skip and r >= 0][:k]
        f = [r for r in found[q] if r != skip and r >= 0][:k]
        total += len(set(t) & set(f)) / max(len(t), 1)
    return total / max(len(truth), 1)


class Reservoir:
    """A uniform random sample of n rows of a stream (Algorithm R), kept as (global row, vector)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seen = n, 0
        self.rng = np.random.default_rng(seed)
        self.rows: list[int] = []
        self.vectors: list[np.ndarray] = []

    def add(self, matrix: np.ndarray) -> None:
        t = self.seen + np.arange(len(matrix))
        for i in np.flatnonzero(t < self.n):  # filling up
            self.rows.append(int(t[i]))
            self.vectors.append(matrix[i].copy())
        later = np.flatnonzero(t >= self.n)
        if len(later):
            slots = self.rng.integers(0, t[later] + 1)  # row t replaces slot j < n with probability n / (t + 1)
            for i, j in zip(later[slots < self.n], slots[slots < self.n]):
                self.rows[j], self.vectors[j] = int(t[i]), matrix[i].copy()
        self.seen += len(matrix)

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.rows, dtype=np.int64), np.asarray(self.vectors, dtype=np.float32)


# ------------------------------------------------------------------------------------------------ building


def default_nlist(count: int) -> int:
    """~sqrt(N) inverted lists, and at least 39 training points per list (faiss's k-means minimum)."""
    return max(1, min(int(round(math.sqrt(count))), count // 39 or 1))


def build_index(batches: Iterable[Batch], kind: str = "exact", *, count: int | None = None, meta: dict | None = None,
                nlist: int | None = None, nprobe: int | None = None, max_nprobe: int | None = None,
                hnsw_m: int = 32, ef_construction: int = 80, ef_search: int | None = None, max_ef_search: int = 512,
                min_recall: float = DEFAULT_MIN_RECALL, queries: np.ndarray | None = None,
                n_queries: int = DEFAULT_QUERIES, train_size: int | None = None, seed: int = 0,
                log=None) -> Index:
    """One pass over (ids, vectors) batches -> an Index. Approximate kinds: recall@10 measured, search setting
    chosen (the fixed `nprobe` / `ef_search` if given, else the first of the ladder reaching `min_recall`,
    capped at `max_nprobe` (default nlist/4) / `max_ef_search`); RecallError when none reaches it.

    count      images in the stream (needed for IVF's default nlist and training sample; optional otherwise)
    queries    caption embeddings to measure recall with; default: a random sample of the images themselves
    train_size IVF k-means sample: the first rows of the stream (default min(count, 64 * nlist))
    """
    if kind not in KINDS:
        raise SearchIndexError(f"--kind: {kind!r} is not one of {', '.join(KINDS)}")
    if not 0 < min_recall <= 1:
        raise SearchIndexError(f"--min-recall: {min_recall} is not in (0, 1]")
    say = log or (lambda message: None)
    started = time.perf_counter()
    ids: list[str] = []
    chunks: list[np.ndarray] = []  # exact: the vectors; ivf: the training buffer until trained
    reservoir = Reservoir(n_queries, seed) if queries is None and kind != "exact" else None
    index = None
    dim = None
    faiss = _faiss() if kind != "exact" else None
    if kind == "ivf":
        if count is None and nlist is None:
            raise SearchIndexError("an IVF build needs the image count (or --nlist)")
        nlist = int(nlist or default_nlist(count))
        if nlist < 1:
            raise SearchIndexError(f"--nlist: {nlist} must be >= 1")
        train_size = int(train_size or min(count or 64 * nlist, 64 * nlist))
    buffered = 0

    def train_ivf() -> None:
        nonlocal index, chunks, buffered
        sample = np.concatenate(chunks)
        if len(sample) < nlist:
            raise SearchIndexError(f"--nlist: {nlist} lists need at least {nlist} images to train, got {len(sample)}")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        say(f"training {nlist} IVF lists on {len(sample):,} images")
        index.train(sample)
        index.add(sample)
        chunks, buffered = [], 0

    for batch_ids, matrix in batches:
        if len(batch_ids) == 0:
            continue
        matrix = _normalise(matrix)
        if dim is None:
            dim = matrix.shape[1]
            if kind == "hnsw":
                index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = ef_construction
        elif matrix.shape[1] != dim:
            raise SearchIndexError(f"vectors of {matrix.shape[1]} dims after {dim}-dim ones")
        if len(batch_ids) != len(matrix):
            raise SearchIndexError(f"a batch of {len(batch_ids)} ids and {len(matrix)} vectors")
        ids.extend(str(i) for i in batch_ids)
        if reservoir is not None:
            reservoir.add(matrix)
        if kind == "exact" or (kind == "ivf" and index is None):
            chunks.append(matrix)
            buffered += len(matrix)
            if kind == "ivf" and buffered >= train_size:
                train_ivf()
        else:
            index.add(matrix)
        if log and len(ids) // 100_000 != (len(ids) - len(batch_ids)) // 100_000:
            say(f"{len(ids):,} images indexed")
    if not ids:
        raise SearchIndexError("no image embeddings to index")
    if kind == "ivf" and index is None:
        train_ivf()
    meta = dict(meta or {})
    build = {"seconds": None, "images": len(ids)}
    if kind == "exact":
        result = Index(ids, np.concatenate(chunks), meta)
        recall = {"k": RECALL_K, "recall_at_10": 1.0, "note": "exact search"}
    else:
        build["faiss"] = faiss.__version__
        if kind == "ivf":
            build.update(nlist=nlist, train_size=train_size)
            ladder = [nprobe] if nprobe else [p for p in NPROBE_LADDER if p <= (max_nprobe or max(1, nlist // 4))]
            ladder = ladder or [1]
            settings = [{"nprobe": int(p)} for p in ladder]
            exact_params = {"nprobe": nlist}  # every list probed: IVF-Flat is exact
        else:
            build.update(m=hnsw_m, ef_construction=ef_construction)
            ladder = [ef_search] if ef_search else [e for e in EF_SEARCH_LADDER if e <= max_ef_search] or [max_ef_search]
            settings = [{"ef_search": int(e)} for e in ladder]
            exact_params = None
        result = Index(ids, None, meta, kind=kind, faiss_index=index)
        recall = tune(result, queries, reservoir, settings, exact_params, min_recall, say)
    build["seconds"] = round(time.perf_counter() - started, 2)
    result.meta.update({"recall_at_10": recall["recall_at_10"], "recall": recall, "build": build})
    return result


def tune(index: Index, queries: np.ndarray | None, reservoir: Reservoir | None, settings: list[dict],
         exact_params: dict | None, min_recall: float, say) -> dict:
    """Measure recall@10 of each setting against exact search on the same vectors; keep the first that reaches
    min_recall (settings go from cheap to expensive)."""
    if queries is not None and len(queries):
        q, exclude, source = _normalise(queries), None, "captions"
    else:
        rows, q = reservoir.take()
        exclude, source = rows, "images (own image left out)"
    extra = 0 if exclude is None else 1
    k = min(RECALL_K + extra, len(index))
    if index.kind == "ivf":
        index.apply_params(exact_params)
        _, truth = index.faiss_index.search(q, k)
    else:  # HNSW-Flat keeps every vector in a flat store: search that exhaustively
        _, truth = _faiss().downcast_index(index.faiss_index.storage).search(q, k)
    tried = []
    for params in settings:
        index.apply_params(params)
        start = time.perf_counter()
        _, found = index.faiss_index.search(q, k)
        seconds = time.perf_counter() - start
        value = recall_at_k(found, truth, RECALL_K, exclude)
        tried.append({**params, "recall_at_10": round(value, 5), "ms_per_query": round(1000 * seconds / len(q), 4)})
        say(f"{index.kind} {params}: recall@10 {value:.4f}")
        if value >= min_recall:
            return {"k": RECALL_K, "recall_at_10": round(value, 5), "min_recall": min_recall, "queries": int(len(q)),
                    "query_source": source, "params": params, "tried": tried}
    best = max(tried, key=lambda t: t["recall_at_10"])
    raise RecallError(f"{index.kind}: recall@10 {best['recall_at_10']:.4f} < --min-recall {min_recall} with every "
                      f"setting tried ({', '.join(f'{k}={v}' for t in tried for k, v in t.items() if k in ('nprobe', 'ef_search'))}); "
                      "allow a larger search setting, change the index parameters, or use --kind exact")


# ------------------------------------------------------------------------------------------------ sources


@dataclass
class EmbeddingSource:
    """The image rows of an embeddings folder (export/embed.py), read batch by batch."""

    path: Path
    files: list[Path]
    sidecar: dict
    count: int  # image rows
    captions: int  # caption rows

    def batches(self, batch_rows: int = 65536) -> Iterator[Batch]:
        """Local: pyarrow, one file and one batch at a time."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        for file in self.files:
            for record in pq.ParquetFile(file).iter_batches(batch_size=batch_rows, columns=[ID, KIND, EMBEDDING]):
                table = pa.Table.from_batches([record])
                table = table.filter(pc.equal(table[KIND], IMAGE_KIND))
                if table.num_rows:
                    yield table[ID].to_pylist(), embedding_matrix(table)

    def ray_batches(self, batch_rows: int = 65536) -> Iterator[Batch]:
        """On Ray Data (the cluster in RAY_ADDRESS, or a local one): the files are read and filtered in Ray
        tasks and the image rows stream to this process once, batch by batch (inference/embeddings.py)."""
        from ccr_ray.inference.embeddings import ray_image_batches

        for table in ray_image_batches([str(f) for f in self.files], batch_rows):
            yield table[ID].to_pylist(), embedding_matrix(table)

    def caption_queries(self, n: int, seed: int = 0) -> np.ndarray | None:
        """Up to n caption embeddings at random (files in random order, rows at random within each), or None."""
        if not self.captions:
            return None
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        rng = np.random.default_rng(seed)
        picked: list[np.ndarray] = []
        got = 0
        for i in rng.permutation(len(self.files)):
            table = pq.read_table(self.files[i], columns=[KIND, EMBEDDING])
            table = table.filter(pc.equal(table[KIND], TEXT_KIND))
            if not table.num_rows:
                continue
            take = rng.choice(table.num_rows, size=min(n - got, table.num_rows), replace=False)
            picked.append(embedding_matrix(table.take(pa.array(np.sort(take)))))
            got += len(take)
            if got >= n:
                break
        return np.concatenate(picked) if picked else None


def embeddings_source(path: str | os.PathLike) -> EmbeddingSource:
    """Open an embeddings folder: its sidecar (model fingerprint), files and row counts (the `kind` column only)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_dir():
        raise EmbedError(f"{path}: no such embeddings folder")
    sidecar = read_sidecar(path)
    if not sidecar:
        raise EmbedError(f"{path}: no embeddings.json (is it a folder written by export/embed.py?)")
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise EmbedError(f"{path}: no Parquet files")
    images = captions = 0
    for file in files:
        kinds = pq.read_table(file, columns=[KIND])[KIND]
        n_images = pc.sum(pc.equal(kinds, IMAGE_KIND)).as_py() or 0
        images += n_images
        captions += len(kinds) - n_images
    return EmbeddingSource(path, files, sidecar, images, captions)


def manifold_vectors(n: int, dim: int, intrinsic: int = 16, noise: float = 0.1, seed: int = 0) -> np.ndarray:
    """Synthetic unit vectors for benchmarks: Gaussian points in a random `intrinsic`-dimensional subspace plus
    isotropic noise, normalised. Neighbour similarities fall off gradually (with the defaults: top-1 ~0.86,
    top-10 ~0.79, top-100 ~0.70 at 100k points), as in real embedding collections, whose intrinsic dimension
    is far below their width."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((intrinsic, dim), dtype=np.float32) / math.sqrt(intrinsic)
    out = np.empty((n, dim), dtype=np.float32)
    step = 65536
    for start in range(0, n, step):
        m = min(step, n - start)
        z = rng.standard_normal((m, intrinsic), dtype=np.float32)
        out[start:start + m] = _normalise(z @ basis + rng.standard_normal((m, dim), dtype=np.float32)
                                          * (noise / math.sqrt(dim)))
    return out


def clustered_vectors(n: int, dim: int, clusters: int = 1000, spread: float = 0.5, seed: int = 0) -> np.ndarray:
    """Synthetic unit vectors for benchmarks and tests: a mixture of `clusters` random directions with Gaussian
    noise of `spread` x the centre's norm (image embeddings cluster by content; uniform random vectors in high
    dimensions have no near neighbours at all, which no real index sees)."""
    rng = np.random.default_rng(seed)
    centres = _normalise(rng.standard_normal((clusters, dim), dtype=np.float32))
    out = np.empty((n, dim), dtype=np.float32)
    step = 65536
    for start in range(0, n, step):
        m = min(step, n - start)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * (spread / math.sqrt(dim))
        out[start:start + m] = _normalise(centres[rng.integers(0, clusters, m)] + noise)
    return out
