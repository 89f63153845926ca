"""The embedded default dataset: procedurally rendered scenes with parallel captions in six languages.

Deterministic by seed: shard k of split s is generated from `default_rng([seed, s, k])` alone, so shards are
produced in parallel processes and still reproduce exactly. Written in the layout of `schema.py` (the same the
real-data converters write), with a WordPiece tokenizer trained on the demo captions plus, when available,
the real caption text in ../shared/data (Multi30K, XTD10, xFlickr&CO, COCO-CN).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ccr_ray.data import grammar, schema
from ccr_ray.data.scenes import SceneSampler, heldout_pairs, render

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


@dataclass
class DemoDataConfig:
    out: str
    sizes: dict[str, int] = field(default_factory=lambda: {"train": 20_000, "val": 1_000, "test": 1_000})
    captions_per_image: dict[str, int] = field(default_factory=lambda: {"train": 1, "val": 2, "test": 2})
    image_size: int = 64
    seed: int = 0
    languages: tuple[str, ...] = grammar.LANGUAGES
    shard_size: int = 2_500
    test_heldout_fraction: float = 0.5  # test scenes forced to contain a held-out (shape, colour) pair
    tokenizer_vocab: int = 8_000
    extra_text: str | None = None  # folder of real caption text for the tokenizer (../shared/data)
    workers: int = 0  # processes; 0 = os.cpu_count()


def _shard(cfg: DemoDataConfig, split: str, index: int, start: int, count: int) -> tuple[str, dict[str, int]]:
    rng = np.random.default_rng([cfg.seed, SPLIT_IDS[split], index])
    sampler = SceneSampler(heldout_pairs(cfg.seed))
    n_caps = cfg.captions_per_image[split]
    rows: dict[str, list] = {c: [] for c in schema.arrow_schema(list(cfg.languages)).names}
    for k in range(count):
        held = split == "test" and rng.random() < cfg.test_heldout_fraction
        scene = sampler.sample(rng, include_held_out=held)
        templates = rng.choice(grammar.NUM_TEMPLATES, size=n_caps, replace=False)
        buffer = io.BytesIO()
        render(scene, cfg.image_size, rng).save(buffer, format="PNG", optimize=False)
        rows[schema.IMAGE_ID].append(f"demo-{split}-{start + k:06d}")
        rows[schema.SPLIT].append(split)
        rows[schema.IMAGE].append(buffer.getvalue())
        rows[schema.IMAGE_PATH].append(None)
        rows[schema.FOLD].append(schema.NO_FOLD)
        for lang in cfg.languages:
            rows[schema.captions_column(lang)].append([grammar.describe(scene, lang, int(t)) for t in templates])
    table = pa.Table.from_pydict(rows, schema=schema.arrow_schema(list(cfg.languages)))
    rel = f"{split}/part-{index:05d}.parquet"
    path = Path(cfg.out) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=512)
    return rel, {lang: count * n_caps for lang in cfg.languages}


def _jobs(cfg: DemoDataConfig) -> Iterator[tuple[str, int, int, int]]:
    for split, n in cfg.sizes.items():
        for index, start in enumerate(range(0, n, cfg.shard_size)):
            yield split, index, start, min(cfg.shard_size, n - start)


def real_caption_text(folder: str | None) -> Iterator[str]:
    """Lines of every caption text file under `folder` (JSON lines yield their sentences)."""
    if not folder or not os.path.isdir(folder):
        return
    import json

    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file() or path.name.upper().startswith(("LICENSE", "README", "MANIFEST", "SHA256")):
            continue
        if "image_splits" in path.parts or "splits" in path.parts or path.name.endswith("_names.txt"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    yield from json.loads(line).get("sentences", [])
                except (json.JSONDecodeError, AttributeError):
                    continue
            elif "\t" in line:
                yield line.split("\t", 1)[1]
            else:
                yield line


def write_demo_dataset(cfg: DemoDataConfig, progress=None) -> schema.Manifest:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = list(_jobs(cfg))
    workers = cfg.workers or os.cpu_count() or 1
    results: dict[str, list] = {split: [] for split in cfg.sizes}
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [(job, pool.submit(_shard, cfg, *job)) for job in jobs]
            for job, future in futures:
                results[job[0]].append(future.result())
                if progress:
                    progress(job[3])
    else:
        for job in jobs:
            results[job[0]].append(_shard(cfg, *job))
            if progress:
                progress(job[3])
    splits = {}
    for split, shards in results.items():
        captions = {lang: sum(c[lang] for _, c in shards) for lang in cfg.languages}
        splits[split] = schema.SplitInfo(images=cfg.sizes[split], captions=captions,
                                         files=[rel for rel, _ in shards])
    tokenizer_dir = out / schema.TOKENIZER_DIR
    # train captions only: the test split's captions stay unseen, even by the tokenizer
    texts = list(_caption_texts(out, {"train": splits["train"]})) + list(real_caption_text(cfg.extra_text))
    from ccr_ray.tokenization import train_wordpiece

    train_wordpiece(texts, tokenizer_dir, vocab_size=cfg.tokenizer_vocab)
    manifest = schema.Manifest(
        name="ccr-ray demo scenes", languages=list(cfg.languages), splits=splits, image_storage="bytes",
        image_format="PNG", tokenizer=schema.TOKENIZER_DIR,
        source=f"ccr_ray.data.synthetic seed={cfg.seed} image_size={cfg.image_size}",
        extra={"heldout_pairs": sorted(map(list, heldout_pairs(cfg.seed))),
               "test_heldout_fraction": cfg.test_heldout_fraction,
               "tokenizer_extra_text": cfg.extra_text if cfg.extra_text and os.path.isdir(cfg.extra_text) else None,
               "tokenizer_texts": len(texts)})
    schema.write_manifest(out, manifest)
    return manifest


def _caption_texts(root: Path, splits: dict[str, schema.SplitInfo]) -> Iterator[str]:
    for info in splits.values():
        for rel in info.files:
            table = pq.read_table(root / rel, columns=[c for c in pq.read_schema(root / rel).names
                                                       if c.startswith(schema.CAPTIONS_PREFIX)])
            for column in table.itercolumns():
                for caps in column.to_pylist():
                    yield from caps
