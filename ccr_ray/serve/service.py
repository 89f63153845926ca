"""The retrieval service without Ray: the torch-free runtime, an image index and (optionally) the dataset's
images, behind input checks that name the offending field.

    service = RetrievalService("exports/demo", "indexes/demo", images="~/ccr_ray/data/demo")
    service.search_texts([("ein roter Kreis oben links", "de", 5)])    # [{"ids": [...], "scores": [...]}]

Calls take lists, so a Serve replica hands them a whole `@serve.batch` at once: captions are grouped by
language (one graph call per language) and every query of the batch goes through the index in one search.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image

from ccr_ray import runtime as rt
from ccr_ray.inference.index import Index
from ccr_ray.serve.images import ImageInputError, ImageStore, decode_upload

LANGUAGE_NAMES = {
    "en": "English", "de": "German", "fr": "French", "cs": "Czech", "zh": "Chinese", "ja": "Japanese",
    "es": "Spanish", "it": "Italian", "pt": "Portuguese", "ru": "Russian", "ko": "Korean", "ar": "Arabic",
    "tr": "Turkish", "pl": "Polish", "nl": "Dutch", "id": "Indonesian", "sw": "Swahili", "ta": "Tamil",
    "hi": "Hindi", "vi": "Vietnamese", "th": "Thai", "uk": "Ukrainian", "he": "Hebrew", "sv": "Swedish",
}


@dataclass
class Limits:
    """What one request may ask for; every limit is a Serve `user_config` key under `limits`."""

    max_text_chars: int = 1000  # a caption, after stripping outer whitespace
    max_k: int = 100  # results per query
    max_texts: int = 64  # captions per /encode/text call
    max_body_bytes: int = 64 * 1024  # a JSON request body
    max_upload_bytes: int = 10 * 1024 * 1024  # an uploaded image, encoded
    max_pixels: int = 40_000_000  # an uploaded image, decoded (width x height)

    @classmethod
    def from_dict(cls, values: dict | None) -> Limits:
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"limits: unknown {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        for key, value in values.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"limits.{key}: {value!r} must be an integer >= 1")
        bound = Image.MAX_IMAGE_PIXELS
        if bound and values.get("max_pixels", 0) > bound:
            raise ValueError(f"limits.max_pixels: {values['max_pixels']:,} is over Pillow's decompression-bomb bound "
                             f"({bound:,} pixels: PIL.Image.MAX_IMAGE_PIXELS)")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


class ActiveLimits:
    """The limits of the service in this process (a Serve replica holds one): the HTTP layer's body-size check
    runs before any route reaches the replica object, so it reads them here. A class attribute, because Serve
    ships the deployment's methods by value and a module global they set would be a copy."""

    current = Limits()


class BadRequest(ValueError):
    """A request the service refuses; `field` names what is wrong, `status` is the HTTP status."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


class RetrievalService:
    """One encoder, one index, optionally one image store; loaded once (a Serve replica builds one)."""

    def __init__(self, model: str | os.PathLike, index: str | os.PathLike | Index,
                 images: str | os.PathLike | ImageStore | None = None, precision: str = "fp32", threads: int = 1,
                 limits: Limits | None = None):
        # no spinning: a replica shares its node's cores with other replicas and the proxy
        self.model_dir = str(model)
        self.threads = threads
        self.encoder = rt.Encoder(model, precision=precision, threads=threads, spinning=False)
        self.index = index if isinstance(index, Index) else Index.load(index)
        self.index.check_model(self.encoder)
        Index.set_threads(threads)
        self.images = images if images is None or isinstance(images, ImageStore) else ImageStore(images)
        self.limits = limits or Limits()
        self.precision = precision
        self.languages = list(self.encoder.languages)
        self.language_names = {lang: LANGUAGE_NAMES.get(lang, lang) for lang in self.languages}
        self.warm_up()

    def with_model(self, model: str | os.PathLike) -> RetrievalService:
        """A service for another export of the model (a language added, text adapters retrained) that keeps this
        one's index, image store and limits: image embeddings depend on the image tower alone, and the index is
        checked against the new export's image-tower fingerprint (EmbedError when they differ). Loaded and warmed
        up before it is returned, so the caller can swap it in at once."""
        return RetrievalService(model, self.index, self.images, self.precision, self.threads, self.limits)

    def warm_up(self, max_batch: int = 16) -> None:
        """Open every session now, so the first request does not pay for it (and a broken graph fails the
        replica's start, not a user's request), and run each at batch sizes 1, 2, 4, ... up to `max_batch` with
        captions as long as the tokenizer takes: onnxruntime's memory arena and the allocator then hold what a
        loaded replica needs from the start. Without it a replica's resident memory kept growing for minutes under
        mixed traffic as new shapes came (+7.5% from minute 1 to 10 in bench/soak.py; in one process, 3.6% over
        100 s with batches of 1-16, 0.6% after this warm-up)."""
        sizes = [1 << i for i in range(max(1, max_batch).bit_length()) if 1 << i <= max_batch]
        long_caption = " ".join(["warm up"] * 400)  # cut at the tower's context length
        for lang in self.languages:
            for n in sizes:
                self.search_texts([(long_caption, lang, 10)] * n)
        if self.encoder.manifest["graphs"].get(rt.IMAGE):
            from PIL import Image

            for n in sizes:
                self.search_vectors(self.embed_images([Image.new("RGB", (8, 8))] * n), [10] * n)

    # ------------------------------------------------------------------------------------------ checks
    def check_text(self, text, field: str = "text", lang: str | None = None) -> str:
        """The caption stripped of outer whitespace; with `lang` (a language of the model), also refused when the
        language's tokenizer finds nothing in it to read (control or zero-width characters only, ...)."""
        if not isinstance(text, str):
            raise BadRequest(field, f"must be a string, got {type(text).__name__}")
        stripped = text.strip()
        if not stripped:
            raise BadRequest(field, "empty or whitespace-only")
        if len(stripped) > self.limits.max_text_chars:
            raise BadRequest(field, f"{len(stripped):,} characters; the limit is {self.limits.max_text_chars:,}")
        problem = self.encoder.caption_problem(stripped, lang) if lang in self.languages else None
        if problem:
            raise BadRequest(field, problem)
        return stripped

    def check_lang(self, lang, field: str = "lang") -> str:
        if lang not in self.languages:
            raise BadRequest(field, f"{lang!r} is not a language of this model (it has {', '.join(self.languages)})")
        return lang

    def check_k(self, k, field: str = "k") -> int:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.limits.max_k:
            raise BadRequest(field, f"{k!r} is out of range: 1 <= k <= {self.limits.max_k}")
        return k

    def check_texts(self, texts, field: str = "texts", lang: str | None = None) -> list[str]:
        if not isinstance(texts, list) or not texts:
            raise BadRequest(field, "must be a non-empty list of captions")
        if len(texts) > self.limits.max_texts:
            raise BadRequest(field, f"{len(texts)} captions; the limit is {self.limits.max_texts}")
        return [self.check_text(t, f"{field}[{i}]", lang) for i, t in enumerate(texts)]

    def decode_image(self, data: bytes, field: str = "image"):
        try:
            return decode_upload(data, self.limits.max_upload_bytes, self.limits.max_pixels)
        except ImageInputError as err:
            raise BadRequest(field, str(err), err.status) from None

    # ------------------------------------------------------------------------------------------ compute
    def embed_texts(self, items: Sequence[tuple[str, str]]) -> np.ndarray:
        """[(caption, lang)] -> [N, D]; one graph call per language present."""
        out = np.zeros((len(items), self.encoder.embed_dim), dtype=np.float32)
        for lang in dict.fromkeys(lang for _, lang in items):
            rows = [i for i, (_, item_lang) in enumerate(items) if item_lang == lang]
            out[rows] = self.encoder.encode_text([items[i][0] for i in rows], lang)
        return out

    def embed_images(self, images: Sequence) -> np.ndarray:
        return self.encoder.encode_image(list(images))

    def search_vectors(self, vectors: np.ndarray, ks: Sequence[int]) -> list[dict]:
        """One index search for the whole batch at the largest k, cut per query."""
        if not len(ks):
            return []
        scores, rows = self.index.search(vectors, max(ks))
        out = []
        for k, srow, rrow in zip(ks, scores, rows):
            keep = [(int(r), float(s)) for r, s in zip(rrow[:k], srow[:k]) if r >= 0]
            out.append({"ids": [self.index.ids[r] for r, _ in keep], "scores": [s for _, s in keep]})
        return out

    def search_texts(self, items: Sequence[tuple[str, str, int]]) -> list[dict]:
        """[(caption, lang, k)] -> [{"ids", "scores"}], best first."""
        vectors = self.embed_texts([(text, lang) for text, lang, _ in items])
        return self.search_vectors(vectors, [k for _, _, k in items])

    # ------------------------------------------------------------------------------------------ about
    def describe(self) -> dict:
        model = self.encoder.manifest.get("model", {})
        return {"model": {"fingerprint": model.get("fingerprint"), "stage": model.get("stage"),
                          "adapter": model.get("adapter"), "embed_dim": self.encoder.embed_dim,
                          "precision": self.precision},
                "languages": self.languages,
                "index": {"kind": self.index.kind, "images": len(self.index), "params": self.index.params,
                          "recall_at_10": self.index.meta.get("recall_at_10")},
                "images": len(self.images) if self.images is not None else None,
                "limits": self.limits.to_dict()}
