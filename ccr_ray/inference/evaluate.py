"""Retrieval metrics from an embeddings folder (export/embed.py), with the spine's own scoring.

The same functions as the PyTorch evaluation (`ccr_ray.eval.retrieval.score_language` -> `retrieval_metrics`:
group-max image->text, k-fold averaging), fed with the stored embeddings instead of a model: per language, the
images that have captions in it, and their captions grouped by image. So the figures equal
`jobs/evaluate.py` on the same checkpoint and split up to the ONNX/PyTorch rounding of the embeddings
(tests/export checks it). Torch is imported here for the metrics only; search (`search.py`) stays torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ccr_ray.inference.embeddings import (
    CAPTION_INDEX,
    FOLD,
    ID,
    IMAGE_KIND,
    KIND,
    LANG,
    TEXT_KIND,
    EmbedError,
    embedding_matrix,
    read_embeddings,
    read_sidecar,
)


def language_arrays(table: pa.Table, lang: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image features [N, D], caption features [C, D], caption -> image index [C], image folds [N]) for the
    images that have captions in `lang`, captions ordered by (image, caption index) as the dataset stores them."""
    images = table.filter(pc.equal(table[KIND], IMAGE_KIND))
    image_ids = images[ID].to_pylist()
    if len(set(image_ids)) != len(image_ids):
        raise EmbedError("embeddings: an image id occurs twice; was the folder written twice into one place?")
    texts = table.filter(pc.and_(pc.equal(table[KIND], TEXT_KIND), pc.equal(table[LANG], lang)))
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    text_ids = texts[ID].to_pylist()
    unknown = sorted({i for i in text_ids if i not in position})
    if unknown:
        raise EmbedError(f"embeddings: captions of images without an image row, e.g. {unknown[:3]}")
    wanted = sorted({position[i] for i in text_ids})  # images with captions in lang, in stored order
    remap = {old: new for new, old in enumerate(wanted)}
    caption_image = np.asarray([remap[position[i]] for i in text_ids], dtype=np.int64)
    order = np.lexsort((texts[CAPTION_INDEX].to_numpy(), caption_image))
    image_feats = embedding_matrix(images)[wanted]
    folds = images[FOLD].to_numpy()[wanted].astype(np.int64)
    return image_feats, embedding_matrix(texts)[order], caption_image[order], folds


def evaluate_embeddings(path: str | os.PathLike, languages: Sequence[str] | None = None) -> dict:
    """{"results": {lang: metrics}, "mean_mR": ..., "embeddings": path, plus the folder's sidecar fields}."""
    import torch

    from ccr_ray.eval.retrieval import mean_mr, score_language

    table = read_embeddings(path)
    sidecar = read_sidecar(path) if os.path.isdir(path) else {}
    texts = table.filter(pc.equal(table[KIND], TEXT_KIND))
    present = list(dict.fromkeys(texts[LANG].to_pylist()))
    order = sidecar.get("languages") or present
    langs = list(languages) if languages else [lang for lang in order if lang in present]
    missing = [lang for lang in langs if lang not in present]
    if missing:
        raise EmbedError(f"--langs: no caption embeddings for {', '.join(missing)} in {path} (it has "
                         f"{', '.join(present) or 'none'})")
    results = {}
    for lang in langs:
        image_feats, caption_feats, caption_image, folds = language_arrays(table, lang)
        results[lang] = score_language(torch.from_numpy(image_feats), torch.from_numpy(caption_feats),
                                       caption_image, folds)
    return {"embeddings": str(path), "data": sidecar.get("data"), "split": sidecar.get("split"),
            "precision": sidecar.get("precision"), "model": sidecar.get("model", {}), "results": results,
            "mean_mR": mean_mr(results)}
