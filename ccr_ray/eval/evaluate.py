"""Evaluate a checkpoint folder on a dataset split without Ray (jobs/evaluate.py, the demo, export checks)."""

from __future__ import annotations

from pathlib import Path

import torch

from ccr_ray import checkpoint as ckpt
from ccr_ray.data import schema
from ccr_ray.data.transforms import ImageTransform
from ccr_ray.eval.retrieval import ADAPTED, evaluate_table, mean_mr, protocol_of
from ccr_ray.stages import STAGES


class EvalError(ValueError):
    """Missing checkpoint, dataset, split or language; the message names it."""


def evaluate_checkpoint(path: str, data: str | None = None, split: str | None = None,
                        languages: list[str] | None = None, mode: str = ADAPTED, device: str = "cpu",
                        batch_size: int = 256, max_images: int = 0, model=None, meta=None) -> dict:
    try:
        if model is None:
            model, meta = ckpt.load_checkpoint(path, device)
    except ckpt.CheckpointError as err:
        raise EvalError(str(err)) from None
    cfg = meta.experiment
    root = data or STAGES[meta.stage].dataset_root(cfg)
    split = split or cfg.data.test_split
    try:
        manifest = schema.load_manifest(root)
        if split not in manifest.splits:
            raise EvalError(f"--split: {root} has no split {split!r} (splits: {', '.join(manifest.splits)})")
    except schema.DatasetError as err:
        raise EvalError(str(err)) from None
    available = ["en", *model.languages] if mode == ADAPTED else ["en", *manifest.languages]
    langs = languages or [lang for lang in available if lang in manifest.languages]
    unknown = [lang for lang in langs if lang not in available]
    if unknown:
        raise EvalError(f"--langs: the model has no adapters for {', '.join(unknown)} (it has en, "
                        f"{', '.join(model.languages)}); --baseline evaluates any language through the English "
                        "tower's own tokenizer")
    # English is read even when not evaluated: the text-to-text protocol's gallery
    table = schema.read_split_table(root, split, list(dict.fromkeys(["en", *langs])))
    tokenizer = ckpt.tokenizer_of(path) or cfg.path(cfg.model.text.tokenizer)
    model.eval()
    with torch.no_grad():
        transform = ImageTransform.from_config(meta.preprocess) if meta.preprocess is not None else None
        results = evaluate_table(model, table, langs, transform,
                                 model.context_length, tokenizer, device, batch_size=batch_size,
                                 max_images=max_images, mode=mode, root=root)
    return {"checkpoint": str(Path(path)), "stage": meta.stage, "step": meta.step, "data": root, "split": split,
            "mode": mode, "protocol": protocol_of(model), "results": results, "mean_mR": mean_mr(results)}
