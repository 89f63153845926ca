"""Text -> image search over stored image embeddings (export/embed.py output), torch-free.

    index = ImageIndex.load("runs/demo/embeddings/test")
    hits = search(Encoder("runs/demo/le/onnx"), index, "ein roter Kreis oben links", "de", k=5)
    # [(image_id, cosine), ...] best first

Exact search: one matrix product over the (normalised) image embeddings, which is what the evaluation ranks
by; an approximate index (faiss, ScaNN) would be the next step beyond a few million images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc

from ccr_ray import runtime as rt
from ccr_ray.export.embeddings import (
    ID,
    IMAGE_KIND,
    KIND,
    EmbedError,
    embedding_matrix,
    read_embeddings,
    read_sidecar,
)


@dataclass
class ImageIndex:
    ids: list[str]
    matrix: np.ndarray  # [N, D] float32, L2-normalised
    meta: dict = field(default_factory=dict)  # the embeddings folder's sidecar (model fingerprint, data, split)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImageIndex:
        table = read_embeddings(path)
        images = table.filter(pc.equal(table[KIND], IMAGE_KIND))
        if images.num_rows == 0:
            raise EmbedError(f"{path}: no image embeddings to search")
        return cls(images[ID].to_pylist(), embedding_matrix(images),
                   read_sidecar(path) if os.path.isdir(path) else {})

    def check_model(self, encoder: rt.Encoder) -> None:
        """Queries and images must come from the same weights, or scores are meaningless."""
        stored = self.meta.get("model", {}).get("fingerprint")
        current = encoder.manifest.get("model", {}).get("fingerprint")
        if stored and current and stored != current:
            raise EmbedError(f"the image embeddings were made by model {stored[:12]}, the query encoder in "
                             f"{encoder.folder} is model {current[:12]}; re-run export/embed.py with this model")
        if self.matrix.shape[1] != encoder.embed_dim:
            raise EmbedError(f"image embeddings have {self.matrix.shape[1]} dims, the model {encoder.embed_dim}")

    def top_k(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """queries [Q, D] (normalised) -> for each, the k best (image id, cosine), best first."""
        k = max(1, min(int(k), len(self.ids)))
        scores = queries.astype(np.float32) @ self.matrix.T  # [Q, N]
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        out = []
        for row, cand in zip(scores, best):
            ranked = cand[np.argsort(-row[cand], kind="stable")]
            out.append([(self.ids[i], float(row[i])) for i in ranked])
        return out


def search(encoder: rt.Encoder, index: ImageIndex, queries: str | list[str], lang: str, k: int = 5
           ) -> list[list[tuple[str, float]]] | list[tuple[str, float]]:
    """Top-k image ids for one query (a list of hits) or several (a list of lists)."""
    index.check_model(encoder)
    single = isinstance(queries, str)
    hits = index.top_k(encoder.encode_text([queries] if single else list(queries), lang), k)
    return hits[0] if single else hits
