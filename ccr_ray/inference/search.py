"""Text -> image search over an image index (`ccr_ray.inference.index`), torch-free.

    index = ImageIndex.load("runs/demo/index")          # an index folder, or an embeddings folder (exact)
    hits = search(Encoder("runs/demo/le/onnx"), index, "ein roter Kreis oben links", "de", k=5)
    # [(image_id, cosine), ...] best first

`ImageIndex` is `ccr_ray.inference.index.Index`: exact search (one matrix product over the normalised image
embeddings, which is what the evaluation ranks by) or a faiss IVF / HNSW index built by export/build_index.py.
Either way a query encoder made by another model is refused (fingerprint check).
"""

from __future__ import annotations

from ccr_ray import runtime as rt
from ccr_ray.inference.index import Index

ImageIndex = Index  # the name search callers know; one index implementation


def search(encoder: rt.Encoder, index: Index, queries: str | list[str], lang: str, k: int = 5
           ) -> list[list[tuple[str, float]]] | list[tuple[str, float]]:
    """Top-k image ids for one query (a list of hits) or several (a list of lists)."""
    index.check_model(encoder)
    single = isinstance(queries, str)
    hits = index.top_k(encoder.encode_text([queries] if single else list(queries), lang), k)
    return hits[0] if single else hits
