"""Turn dataset rows (schema.py) into model inputs: decode + resize/crop images to uint8, tokenize captions.
Pixels leave here as uint8 [3, H, W] and are normalised in the training step (train/loop.py), on the device.

`TrainPreprocessor` is what Ray Data's `map_batches` runs (pipeline.py) and what the plain single-process loop
in `bench/` runs, so both see identical inputs. No Ray import here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ccr_ray.data import schema
from ccr_ray.data.transforms import ImageTransform, open_image
from ccr_ray.features.store import BATCH_KEYS, FEATURE_COLUMNS, vectors

log = logging.getLogger(__name__)
PREPROCESS_BATCH = 64  # rows per preprocessing call: large enough to amortise task overhead, small for latency


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything a preprocessing task needs; plain data so it pickles into Ray tasks cheaply."""

    languages: tuple[str, ...]  # caption languages of the stream: ("en",) or the stage's target languages
    inputs: tuple[str, ...]  # "image", "text_en", "text_target"
    image: dict | None  # ImageTransform config; None when the stage needs no pixels
    context_length: int
    tokenizer: str | None  # target-language tokenizer folder (None for English-only stages)
    dataset_root: str = ""  # for image paths relative to the dataset
    # inputs read as precomputed embeddings from a frozen-feature cache (data/feature_cache.py) instead of being
    # decoded / tokenized: "image" -> batch key image_features, "text_en" -> text_en_features(_<lang>)
    cached: tuple[str, ...] = ()
    feature_dim: int = 0  # width of the cached embeddings
    english_tokenizer: str | None = None  # the English tower's tokenizer folder; None = CLIP's BPE

    @property
    def english_only(self) -> bool:
        return self.languages == ("en",)

    @property
    def columns(self) -> list[str]:
        """Parquet columns this stream reads (NLT never touches image bytes: spec 7, MLA bug 3)."""
        cols = [schema.IMAGE_ID]
        if "image" in self.inputs:
            cols += [FEATURE_COLUMNS["image"]] if "image" in self.cached else [schema.IMAGE, schema.IMAGE_PATH]
        if "text_en" in self.inputs or self.english_only:
            cols.append(schema.captions_column("en"))  # with a cached teacher still read: it counts the pairs
        if "text_en" in self.cached:
            cols.append(FEATURE_COLUMNS["text_en"])
        cols += [schema.captions_column(lang) for lang in self.languages if lang != "en"]
        return cols


def column(name: str, lang: str) -> str:
    """Per-language model-input column of a training batch, e.g. text_ids_de."""
    return f"{name}_{lang}"


def select_language(batch: dict, lang: str, english_only: bool) -> dict:
    """The model inputs of one language from a training batch that carries every language."""
    if english_only:
        return batch
    out = {k: v for k, v in batch.items() if k in ("pixels", BATCH_KEYS["image"])}
    for name in ("text_ids", "text_mask", "text_en_ids", BATCH_KEYS["text_en"]):
        key = column(name, lang)
        if key in batch:
            out[name] = batch[key]
    return out


def caption_slots(counts: np.ndarray) -> np.ndarray:
    """Rows per image: the largest caption count over the stream's languages (>= 1 where all are present)."""
    return counts.max(axis=1)


class TrainPreprocessor:
    """Rows (one per image) -> training samples with pixels and token ids for every language of the stream.

    One stream carries all target languages so that one Ray Data execution feeds training; the worker picks the
    step's language (train/worker.py). An image with captions c_1..c_n in language l yields max_l n_l samples
    ("slots"); slot k uses caption k mod n_l of language l (and, when an English teacher is needed, the English
    caption at the same index: captions are parallel by index, schema.py). So each language sees each of its
    captions equally often and every image equally often, as the seeds' per-language loaders do. Images
    lacking a stream language cannot serve a monolingual batch of it: they are counted and logged, not used.

    With a frozen-feature cache (`spec.cached`) the rows carry the image embedding and one teacher embedding per
    English caption instead of image bytes: slot k takes the row's image embedding and the teacher embedding of
    the same English caption index it would have tokenized, so the samples are the same, only precomputed.
    """

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec
        self.image_transform = ImageTransform.from_config(spec.image) if spec.image else None
        self.bad_images = 0
        self.missing_language = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ccr_ray.tokenization import english_tokenizer, target_tokenizer

        spec = self.spec
        en_col = schema.captions_column("en")
        teacher = "text_en" in spec.inputs
        n_rows = len(batch[schema.IMAGE_ID])
        # usable caption count per (row, language): paired with English where a teacher is needed
        counts = np.zeros((n_rows, len(spec.languages)), dtype=np.int64)
        for j, lang in enumerate(spec.languages):
            caps = batch[schema.captions_column(lang)]
            for r in range(n_rows):
                n = len(caps[r])
                counts[r, j] = min(n, len(batch[en_col][r])) if teacher and lang != "en" else n
        usable = counts.min(axis=1) > 0
        if not usable.all():
            self.missing_language += int((~usable).sum())
            log.warning("%d images lack captions in one of %s and are not used (%d so far in this worker)",
                        int((~usable).sum()), ",".join(spec.languages), self.missing_language)
        slots = np.where(usable, caption_slots(counts), 0)
        rows = np.repeat(np.arange(n_rows), slots)
        slot = np.concatenate([np.arange(n) for n in slots]) if len(rows) else np.zeros(0, dtype=np.int64)
        out: dict[str, np.ndarray] = {}
        teacher_cache: dict = {}
        if "image" in spec.cached:
            features, keep = self._cached_images(batch, rows)
            rows, slot, out[BATCH_KEYS["image"]] = rows[keep], slot[keep], features[keep]
        elif self.image_transform is not None:
            pixels, keep = self._images(batch, rows)
            rows, slot, out["pixels"] = rows[keep], slot[keep], pixels[keep]
        cached_teacher = "text_en" in spec.cached
        for j, lang in enumerate(spec.languages):
            caps = batch[schema.captions_column(lang)]
            index = slot % np.maximum(counts[rows, j], 1)
            if lang == "en":
                if cached_teacher:
                    out[BATCH_KEYS["text_en"]] = self._cached_teacher(batch, rows, index)
                else:
                    texts = [str(caps[r][i]) for r, i in zip(rows, index)]
                    out["text_en_ids"] = english_tokenizer(spec.context_length, spec.english_tokenizer)(texts)
                continue
            texts = [str(caps[r][i]) for r, i in zip(rows, index)]
            ids, mask = target_tokenizer(spec.tokenizer, spec.context_length)(texts)
            out[column("text_ids", lang)], out[column("text_mask", lang)] = ids, mask
            if teacher and cached_teacher:
                out[column(BATCH_KEYS["text_en"], lang)] = self._cached_teacher(batch, rows, index)
            elif teacher:
                out[column("text_en_ids", lang)] = self._english(batch[en_col], rows, index, teacher_cache)
        return out

    def _cached_images(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image embeddings per sample from the cache; a null (the image did not decode when the cache was built)
        drops the row's samples, counted and logged as `_images` does."""
        features, ok = vectors(batch[FEATURE_COLUMNS["image"]], self.spec.feature_dim)
        bad = np.unique(rows[~ok[rows]]) if len(rows) else np.zeros(0, dtype=np.int64)
        if len(bad):
            self.bad_images += len(bad)
            log.warning("skipping %d images without a cached embedding (undecodable when the cache was built); "
                        "%d so far in this worker", len(bad), self.bad_images)
        return features[rows], ok[rows]

    def _cached_teacher(self, batch: dict[str, np.ndarray], rows: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Teacher embeddings of English caption `index` of each row, from the cache: [len(rows), D]."""
        table = batch[FEATURE_COLUMNS["text_en"]]
        out = np.zeros((len(rows), self.spec.feature_dim), dtype=np.float32)
        for k, (r, i) in enumerate(zip(rows.tolist(), index.tolist())):
            out[k] = np.asarray(table[r][i], dtype=np.float32)
        return out

    def _english(self, captions, rows: np.ndarray, index: np.ndarray, cache: dict) -> np.ndarray:
        """Teacher token ids for (row, caption index) pairs; each distinct English caption is tokenized once per
        batch (with parallel single-caption data every language shares the same teacher)."""
        from ccr_ray.tokenization import english_tokenizer

        keys = list(zip(rows.tolist(), index.tolist()))
        todo = sorted({k for k in keys if k not in cache})
        if todo:
            tokenize = english_tokenizer(self.spec.context_length, self.spec.english_tokenizer)
            ids = tokenize([str(captions[r][i]) for r, i in todo])
            cache.update(zip(todo, ids))
        if not keys:
            return np.zeros((0, self.spec.context_length), dtype=np.int64)
        return np.stack([cache[k] for k in keys])

    def _images(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decode each image once (rows repeat per caption slot). An undecodable image is logged, counted and
        left out of this batch; converters (prepare_data) quarantine such records before training."""
        size = self.image_transform.size
        decoded: dict[int, np.ndarray | None] = {}
        for r in np.unique(rows):
            data = batch[schema.IMAGE][r] if schema.IMAGE in batch else None
            path = batch[schema.IMAGE_PATH][r] if schema.IMAGE_PATH in batch else None
            try:
                decoded[int(r)] = self.image_transform.to_uint8(open_image(data, path, self.spec.dataset_root or None))
            except Exception as err:  # noqa: BLE001 - any decoder error makes the record unusable
                self.bad_images += 1
                log.warning("skipping undecodable image %s (%s: %s); %d so far in this worker",
                            batch[schema.IMAGE_ID][r], type(err).__name__, err, self.bad_images)
                decoded[int(r)] = None
        keep = np.asarray([decoded[int(r)] is not None for r in rows], dtype=bool)
        pixels = np.zeros((len(rows), 3, size, size), dtype=np.uint8)  # normalised in the training step
        for k, r in enumerate(rows):
            if keep[k]:
                pixels[k] = decoded[int(r)]
        return pixels, keep


def tokenize_captions(texts: Sequence[str], lang: str, context_length: int, tokenizer: str | None,
                      english: str | None = None) -> dict[str, np.ndarray]:
    """Model text inputs for evaluation/export: English -> the English tower's ids (`english`: its tokenizer
    folder, None = CLIP's BPE); others -> ids + mask."""
    from ccr_ray.tokenization import english_tokenizer, target_tokenizer

    if lang == "en":
        return {"text_en_ids": english_tokenizer(context_length, english)(texts)}
    ids, mask = target_tokenizer(tokenizer, context_length)(texts)
    return {"text_ids": ids, "text_mask": mask}
