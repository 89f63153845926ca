"""Real inputs for the export checks: images and captions, every language, several batch sizes and lengths.

Taken from a dataset split when one is given (the checkpoint's own data by default, `to_onnx.py --data`); a
language the data lacks gets captions of rendered demo scenes (ccr_ray.data.scenes / grammar: en, de, fr, cs,
zh, ja), and a language the grammar lacks gets word sequences drawn from its tokenizer's vocabulary. Without
data the images are rendered scenes too, captioned in every language, so retrieval agreement is meaningful.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ccr_ray.data import grammar, schema
from ccr_ray.data.scenes import SceneSampler, heldout_pairs, render
from ccr_ray.data.transforms import open_image


@dataclass
class Probes:
    images: list  # PIL images
    captions: dict[str, list[str]] = field(default_factory=dict)  # lang -> captions
    caption_image: dict[str, np.ndarray] = field(default_factory=dict)  # lang -> index into `images` per caption
    source: dict[str, str] = field(default_factory=dict)  # "images" / lang -> where it came from


def _from_dataset(root: str, split: str, languages: Sequence[str], max_images: int, images: bool = True
                  ) -> Probes | None:
    try:
        manifest = schema.load_manifest(root)
    except schema.DatasetError:
        return None
    if split not in manifest.splits:
        return None
    table = schema.read_split_table(root, split, [lang for lang in languages if lang in manifest.languages])
    table = table.slice(0, max_images)
    if images:
        data = table[schema.IMAGE].to_pylist()
        paths = table[schema.IMAGE_PATH].to_pylist()
        probes = Probes(images=[open_image(d, p, root) for d, p in zip(data, paths)])
        probes.source["images"] = f"{root} [{split}]"
    else:
        probes = Probes(images=[])
        probes.source["images"] = "none (a backbone without an image tower)"
    for lang in languages:
        col = schema.captions_column(lang)
        if col not in table.column_names:
            continue
        caps = table[col].to_pylist()
        texts = [c for row in caps for c in row]
        if texts:
            probes.captions[lang] = texts
            probes.caption_image[lang] = np.repeat(np.arange(len(caps)), [len(row) for row in caps])
            probes.source[lang] = f"{root} [{split}]"
    return probes


def build_probes(languages: Sequence[str], image_size: int, data: str | None = None, split: str = "test",
                 max_images: int = 24, seed: int = 0, vocabulary: Callable[[], list[str]] | None = None,
                 images: bool = True) -> Probes:
    """Images and captions for `languages` ("en" included where wanted); captions only with `images=False`
    (a backbone without an image tower).

    vocabulary: returns the tokenizer's word list, for languages neither the data nor the grammar covers."""
    probes = _from_dataset(data, split, languages, max_images, images) if data and os.path.isdir(data) else None
    rng = np.random.default_rng(seed)
    scenes = [SceneSampler(heldout_pairs(seed)).sample(rng) for _ in range(max_images)]
    if not images:
        if probes is None or not probes.captions:
            probes = Probes(images=[])
            probes.source["images"] = "none (a backbone without an image tower)"
        else:
            scenes = None  # captions from the data
    elif probes is None or not probes.images:
        probes = Probes(images=[render(scene, image_size, rng) for scene in scenes])
        probes.source["images"] = "rendered demo scenes"
    else:
        scenes = None  # captions must describe the dataset's images; the grammar cannot
    for lang in languages:
        if lang in probes.captions:
            continue
        n = len(probes.images) if images else max_images
        if scenes is not None and lang in grammar.LANGUAGES:
            texts = [grammar.describe(scene, lang, t) for scene in scenes for t in (0, 1)]
            probes.captions[lang] = texts
            probes.caption_image[lang] = np.repeat(np.arange(n), 2)
            probes.source[lang] = "demo grammar"
            continue
        words = [w for w in (vocabulary() if vocabulary else []) if w.isalpha()]
        if not words:
            raise ValueError(f"no captions for language {lang!r}: not in the data, not in the demo grammar, and "
                             "no tokenizer vocabulary to draw from")
        texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 14)))) for _ in range(2 * n)]
        probes.captions[lang] = texts
        probes.caption_image[lang] = np.repeat(np.arange(n), 2)
        probes.source[lang] = "tokenizer vocabulary (random words)"
    return probes


def short_text(text: str) -> str:
    """One word (or two characters of an unspaced script): the shortest real caption prefix."""
    words = text.split()
    return words[0] if len(words) > 1 else text[:2]


def long_text(captions: Sequence[str], truncated: Callable[[list[str]], int]) -> str:
    """Captions joined until the tokenizer truncates at the context length (the longest possible input)."""
    out = captions[0]
    for i in range(1, 400):
        if truncated([out]):
            break
        out = f"{out} {captions[i % len(captions)]}"
    return out


def text_cases(captions: Sequence[str], truncated: Callable[[list[str]], int]) -> list[tuple[str, list[str]]]:
    """Batches of 1, 3 and 8 captions: short, real and context-filling ones, mixed so rows carry padding."""
    short, long = short_text(captions[0]), long_text(captions, truncated)
    real = [captions[i % len(captions)] for i in range(6)]
    return [("b1-short", [short]), ("b1-long", [long]), ("b3-mixed", [short, real[0], long]),
            ("b8-mixed", [*real[:3], long, short, *real[3:]])]


def image_cases(count: int) -> list[tuple[str, list[int]]]:
    """Batches of 1, 3 and 8 images (indices into the probe images, cycled when fewer exist)."""
    return [(f"b{b}", [i % count for i in range(b)]) for b in (1, 3, 8)]
