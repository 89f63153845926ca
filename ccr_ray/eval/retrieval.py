"""Encode a retrieval split and score it per language (spec section 5). No Ray import: the Ray Train worker
(validation), `jobs/evaluate.py` and export's embedding evaluation all call this.

Each language is evaluated on the rows (images) that have captions in it; captions stay grouped by image, in
row order; images are encoded once and shared across languages. English goes through the untouched English
tower; other languages through the model's adapters, or through the English tower's own tokenizer for the
English-only baseline.

A model without an image tower (a text-only backbone) is scored by text-to-text retrieval instead, chosen by
`evaluate_table` (`evaluate_text_table`, same metrics and rules): each image's first English caption, encoded by
the untouched English tower (the teacher), stands in for the image. `t2i_*` are then language -> English and
`i2t_*` English -> language (group-max over an image's captions), mR their mean, as in spec section 5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch.nn import functional as F

from ccr_ray.data import schema
from ccr_ray.data.preprocess import tokenize_captions
from ccr_ray.data.transforms import ImageTransform, open_image
from ccr_ray.eval.metrics import average_metrics, retrieval_metrics
from ccr_ray.models.precision import autocast

# How non-English captions are encoded
ADAPTED = "adapted"  # the model's multilingual path (MLA acquirers / DASD adapters)
CLIP_BPE = "clip_bpe"  # baseline: the English tower applied to the raw caption through its own tokenizer
IMAGE_PROTOCOL = "text-image"  # captions vs images (spec section 5)
TEXT_PROTOCOL = "text-text"  # captions vs the teacher's English captions (a backbone without images)


def language_rows(table: pa.Table, lang: str, max_images: int = 0) -> pa.Table:
    col = schema.captions_column(lang)
    if col not in table.column_names:
        return table.slice(0, 0)
    lengths = pa.compute.list_value_length(table[col]).fill_null(0)
    rows = table.filter(pa.compute.greater(lengths, 0))
    return rows.slice(0, max_images) if max_images else rows


@torch.no_grad()
def encode_images(model, images: Sequence, transform: ImageTransform, device: torch.device, batch_size: int = 256,
                  precision: str = "fp32", root: str | None = None, progress: Callable | None = None
                  ) -> torch.Tensor:
    """images: sequence of (bytes | None, path | None) -> L2-normalised features [N, D] on CPU (fp32)."""
    feats = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pixels = transform.batch([open_image(data, path, root) for data, path in chunk])
        with autocast(device, precision):
            out = model.encode_image(torch.from_numpy(pixels).to(device))
        feats.append(F.normalize(out.float(), dim=-1).cpu())
        if progress:
            progress(len(chunk))
    return torch.cat(feats) if feats else torch.zeros(0, 1)


@torch.no_grad()
def encode_captions(model, texts: Sequence[str], lang: str, context_length: int, tokenizer: str | None,
                    device: torch.device, batch_size: int = 256, precision: str = "fp32", mode: str = ADAPTED
                    ) -> torch.Tensor:
    feats = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        if lang == "en" or mode == CLIP_BPE:
            ids = tokenize_captions(chunk, "en", context_length, None, english=model.english_tokenizer)["text_en_ids"]
            with autocast(device, precision):
                out = model.encode_text_en(torch.from_numpy(ids).to(device))
        else:
            enc = tokenize_captions(chunk, lang, context_length, tokenizer)
            with autocast(device, precision):
                out = model.encode_text(torch.from_numpy(enc["text_ids"]).to(device),
                                        torch.from_numpy(enc["text_mask"]).to(device), lang)
        feats.append(F.normalize(out.float(), dim=-1).cpu())
    return torch.cat(feats) if feats else torch.zeros(0, 1)


def score_language(image_feats: torch.Tensor, caption_feats: torch.Tensor, caption_image: np.ndarray,
                   folds: np.ndarray | None) -> dict[str, float]:
    """Metrics for one language; with folds (>= 0) each fold is scored on its own images and averaged."""
    sim = caption_feats @ image_feats.t()
    caption_image_t = torch.from_numpy(caption_image)
    if folds is None or (folds < 0).all():
        return retrieval_metrics(sim, caption_image_t)
    per_fold = []
    for fold in sorted(set(int(f) for f in folds if f >= 0)):
        img = np.flatnonzero(folds == fold)
        remap = -np.ones(len(folds), dtype=np.int64)
        remap[img] = np.arange(len(img))
        caps = np.flatnonzero(np.isin(caption_image, img))
        sub = sim[torch.from_numpy(caps)][:, torch.from_numpy(img)]
        per_fold.append(retrieval_metrics(sub, torch.from_numpy(remap[caption_image[caps]])))
    return average_metrics(per_fold)


def protocol_of(model) -> str:
    """How a model is scored: against images, or (no image tower) against the teacher's English captions."""
    return IMAGE_PROTOCOL if model.has_images else TEXT_PROTOCOL


def evaluate_table(model, table: pa.Table, languages: Sequence[str], transform: ImageTransform | None,
                   context_length: int, tokenizer: str | None, device: torch.device | str = "cpu",
                   batch_size: int = 256, max_images: int = 0, precision: str = "fp32", mode: str = ADAPTED,
                   root: str | None = None, progress: Callable | None = None) -> dict[str, dict[str, float]]:
    """{lang: metrics} for every language in `languages` that has captions in `table`; text-to-text retrieval
    (`evaluate_text_table`) when the model has no image tower."""
    if protocol_of(model) == TEXT_PROTOCOL:
        return evaluate_text_table(model, table, languages, context_length, tokenizer, device, batch_size,
                                   max_images, precision, mode)
    device = torch.device(device)
    per_lang = {lang: language_rows(table, lang, max_images) for lang in languages}
    per_lang = {k: v for k, v in per_lang.items() if v.num_rows}
    # encode every needed image once
    wanted: dict[str, int] = {}
    images: list[tuple] = []
    for rows in per_lang.values():
        ids = rows[schema.IMAGE_ID].to_pylist()
        data = rows[schema.IMAGE].to_pylist() if schema.IMAGE in rows.column_names else [None] * len(ids)
        paths = rows[schema.IMAGE_PATH].to_pylist() if schema.IMAGE_PATH in rows.column_names else [None] * len(ids)
        for image_id, d, p in zip(ids, data, paths):
            if image_id not in wanted:
                wanted[image_id] = len(images)
                images.append((d, p))
    image_feats = encode_images(model, images, transform, device, batch_size, precision, root, progress)
    results = {}
    for lang, rows in per_lang.items():
        ids = rows[schema.IMAGE_ID].to_pylist()
        captions = rows[schema.captions_column(lang)].to_pylist()
        texts = [c for caps in captions for c in caps]
        caption_image = np.repeat(np.arange(len(ids)), [len(c) for c in captions])
        feats = encode_captions(model, texts, lang, context_length, tokenizer, device, batch_size, precision, mode)
        img = image_feats[torch.tensor([wanted[i] for i in ids])]
        folds = rows[schema.FOLD].to_numpy() if schema.FOLD in rows.column_names else None
        results[lang] = score_language(img, feats, caption_image, folds)
    return results


def text_rows(table: pa.Table, lang: str, max_images: int = 0) -> pa.Table:
    """Rows with captions in `lang` and an English caption (the gallery entry); for "en", rows with a second
    English caption (a query other than the gallery entry itself)."""
    en = schema.captions_column("en")
    if en not in table.column_names:
        return table.slice(0, 0)
    en_count = pa.compute.list_value_length(table[en]).fill_null(0)
    if lang == "en":
        rows = table.filter(pa.compute.greater(en_count, 1))
    else:
        rows = language_rows(table, lang)
        rows = rows.filter(pa.compute.greater(pa.compute.list_value_length(rows[en]).fill_null(0), 0))
    return rows.slice(0, max_images) if max_images else rows


@torch.no_grad()
def evaluate_text_table(model, table: pa.Table, languages: Sequence[str], context_length: int,
                        tokenizer: str | None, device: torch.device | str = "cpu", batch_size: int = 256,
                        max_images: int = 0, precision: str = "fp32", mode: str = ADAPTED
                        ) -> dict[str, dict[str, float]]:
    """Text-to-text retrieval, spec section 5 with each image's first English caption (through the untouched
    English tower, the teacher) in place of the image. Queries: a target language's captions (through the
    adapters, or the English tower's tokenizer for the baseline); for "en", the image's other English captions
    (e.g. independent descriptions: how well the teacher itself retrieves an English paraphrase), skipped when
    every row has one. {lang: metrics}, `t2i_*` = query -> English, `i2t_*` = English -> query captions."""
    device = torch.device(device)
    en = schema.captions_column("en")
    per_lang = {lang: text_rows(table, lang, max_images) for lang in languages}
    per_lang = {k: v for k, v in per_lang.items() if v.num_rows}
    wanted: dict[str, int] = {}
    gallery_texts: list[str] = []
    for rows in per_lang.values():
        for image_id, caps in zip(rows[schema.IMAGE_ID].to_pylist(), rows[en].to_pylist()):
            if image_id not in wanted:
                wanted[image_id] = len(gallery_texts)
                gallery_texts.append(caps[0])
    gallery = encode_captions(model, gallery_texts, "en", context_length, None, device, batch_size, precision)
    results = {}
    for lang, rows in per_lang.items():
        ids = rows[schema.IMAGE_ID].to_pylist()
        column = rows[en if lang == "en" else schema.captions_column(lang)].to_pylist()
        captions = [caps[1:] for caps in column] if lang == "en" else column
        texts = [c for caps in captions for c in caps]
        caption_image = np.repeat(np.arange(len(ids)), [len(c) for c in captions])
        feats = encode_captions(model, texts, lang, context_length, tokenizer, device, batch_size, precision, mode)
        folds = rows[schema.FOLD].to_numpy() if schema.FOLD in rows.column_names else None
        results[lang] = score_language(gallery[torch.tensor([wanted[i] for i in ids])], feats, caption_image, folds)
    return results


def mean_mr(results: dict[str, dict[str, float]], languages: Sequence[str] | None = None) -> float:
    langs = [lang for lang in (languages or results) if lang in results]
    if not langs:
        return float("nan")
    return sum(results[lang]["mR"] for lang in langs) / len(langs)


def format_table(rows: dict[str, dict[str, dict[str, float]]], languages: Sequence[str]) -> str:
    """Markdown table: one row per model/setting, per-language mR columns + the mean over non-English ones."""
    header = "| model | " + " | ".join(languages) + " | mean (non-en) |"
    lines = [header, "|" + "---|" * (len(languages) + 2)]
    for name, results in rows.items():
        cells = [f"{results[lang]['mR']:.1f}" if lang in results else "-" for lang in languages]
        non_en = [lang for lang in languages if lang != "en" and lang in results]
        mean = f"{mean_mr(results, non_en):.1f}" if non_en else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def format_recall_table(results: dict[str, dict[str, float]], title: str = "", protocol: str = IMAGE_PROTOCOL
                        ) -> str:
    """Per-language R@1/5/10 both ways + mR, markdown."""
    cols = ["t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "mR"]
    lines = []
    if title:
        lines.append(f"**{title}**\n")
    if protocol == TEXT_PROTOCOL:
        lines.append("| lang | L→en R@1 | R@5 | R@10 | en→L R@1 | R@5 | R@10 | mR | captions | en gallery |")
    else:
        lines.append("| lang | T→I R@1 | R@5 | R@10 | I→T R@1 | R@5 | R@10 | mR | captions | images |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for lang, m in results.items():
        vals = " | ".join(f"{m[c]:.1f}" for c in cols)
        lines.append(f"| {lang} | {vals} | {int(m['n_captions'])} | {int(m['n_images'])} |")
    return "\n".join(lines)
