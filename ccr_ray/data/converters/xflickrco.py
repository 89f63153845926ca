"""xFlickr&CO (IGLUE, github.com/e-bug/iglue `datasets/xFlickrCO/annotations/<lang>/test.jsonl`): JSON lines
`{"sentences": [...], "id": ..., "img_path": "<file name>"}`, one file per language, the same 2000 images
(1000 Flickr30K = Multi30K test_2016, 1000 COCO val2014) in every file.

    <root>/test_<lang>.jsonl                         -> split test, every sentence
    <root>/<lang>/test.jsonl                         -> split test (IGLUE's own layout)
    <root>/flickr30k_val_mt/valid-<lang>_gmt.jsonl   -> split val, sentences[0] only: IGLUE machine-translated
                                                        only the first of the five Flickr30K captions; the other
                                                        four are still English

Rows are keyed by img_path and merged across languages; images may live in several folders (--images twice:
Flickr30K and COCO val2014).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ccr_ray.data.converters.records import (
    DUPLICATE_KEY,
    MALFORMED_JSON,
    UNKNOWN_LANGUAGE,
    ImageResolver,
    InputError,
    ParseResult,
    Reject,
    SplitBuilder,
    canonical_language,
    check_caption,
    csv_list,
    finish,
    is_known_language,
    iter_lines,
    raw_of,
    require_path,
)

NAME = "xflickrco"
PATTERNS = [  # (regex on the path relative to root, split, first sentence only)
    (re.compile(r"test_([A-Za-z]{2,3})\.jsonl"), "test", False),
    (re.compile(r"([A-Za-z]{2,3})/test\.jsonl"), "test", False),
    (re.compile(r"(?:.*/)?valid-([A-Za-z]{2,3})_gmt\.jsonl"), "val", True),
]


def discover(root: Path) -> list[tuple[Path, str, str, bool]]:
    """[(file, language code, split, first_only)] in a stable order."""
    found = []
    for path in sorted(root.rglob("*.jsonl")):
        rel = path.relative_to(root).as_posix()
        for regex, split, first_only in PATTERNS:
            m = regex.fullmatch(rel)
            if m:
                found.append((path, m.group(1), split, first_only))
                break
    return found


def check_inputs(root: str, image_dirs: list[str]) -> Path:
    root_path = require_path(root, "--xflickrco", "dir")
    if not discover(root_path):
        raise InputError(f"--xflickrco: no test_<lang>.jsonl / <lang>/test.jsonl / valid-<lang>_gmt.jsonl "
                         f"under {root_path}")
    for folder in image_dirs:
        require_path(folder, "--images", "dir")
    return root_path


def parse(root: str, image_dirs: list[str], languages: list[str] | None = None,
          splits: list[str] | None = None) -> ParseResult:
    root_path = check_inputs(root, image_dirs)
    resolve = ImageResolver(image_dirs)
    rejects: list[Reject] = []
    builders: dict[str, SplitBuilder] = {}
    for path, code, split, first_only in discover(root_path):
        if splits is not None and split not in splits:
            continue
        lang = canonical_language(code)
        if languages is not None and lang not in languages:
            continue
        builder = builders.setdefault(split, SplitBuilder(split))
        _parse_file(path, lang, code, builder, first_only, resolve, rejects)
    order = ["train", "val", "test"]
    ordered = sorted(builders.values(), key=lambda b: order.index(b.split) if b.split in order else 9)
    records = finish(ordered, rejects)
    return ParseResult(name="xFlickr&CO", source=f"ccr_ray.data.converters.xflickrco {root_path}", records=records,
                       rejects=rejects, inputs={"xflickrco": str(root_path), "images": list(image_dirs)},
                       notes=["val (valid-<lang>_gmt.jsonl): sentences[0] only; IGLUE translated only that one"])


def _parse_file(path: Path, lang: str, code: str, builder: SplitBuilder, first_only: bool,
                resolve: ImageResolver, rejects: list[Reject]) -> None:
    src, split = str(path), builder.split
    known = is_known_language(lang)
    seen: dict[str, int] = {}
    for i, raw in iter_lines(path):
        if not raw.strip():
            continue  # blank lines separate nothing in JSON lines
        try:
            item = json.loads(raw.decode("utf-8", errors="surrogateescape"))
        except ValueError as err:
            rejects.append(Reject(src, MALFORMED_JSON, split=split, language=lang, line=i, detail=str(err), raw=raw))
            continue
        key = item.get("img_path") if isinstance(item, dict) else None
        sentences = item.get("sentences") if isinstance(item, dict) else None
        if not isinstance(key, str) or not key.strip() or not isinstance(sentences, list):
            rejects.append(Reject(src, MALFORMED_JSON, split=split, language=lang, line=i, raw=raw,
                                  detail="expected {\"sentences\": [...], \"img_path\": \"...\"}",
                                  captions=max(1, len(sentences) if isinstance(sentences, list) else 1)))
            continue
        key = key.strip()
        if first_only:
            sentences = sentences[:1]
        if not known:
            rejects.append(Reject(src, UNKNOWN_LANGUAGE, key=key, split=split, language=code, line=i, raw=raw,
                                  captions=max(1, len(sentences)), detail=f"language code {code!r} is not known"))
            continue
        if key in seen:
            rejects.append(Reject(src, DUPLICATE_KEY, key=key, split=split, language=lang, line=i, raw=raw,
                                  captions=max(1, len(sentences)), detail=f"img_path already on line {seen[key]}"))
            continue
        seen[key] = i
        builder.image(key, resolve(key), src)
        if not sentences:
            rejects.append(Reject(src, MALFORMED_JSON, key=key, split=split, language=lang, line=i, raw=raw,
                                  detail="empty sentences list"))
        for sentence in sentences:
            text, reason, detail = check_caption(sentence)
            if text is None:
                rejects.append(Reject(src, reason, key=key, split=split, language=lang, line=i, detail=detail,
                                      raw=raw_of(sentence)))
            else:
                builder.caption(key, lang, text)


# --------------------------------------------------------------------------------------------- the CLI's view

HELP = "IGLUE xFlickr&CO JSON lines"


def add_arguments(parser) -> None:
    parser.add_argument("--xflickrco", required=True)
    parser.add_argument("--images", action="append", required=True)
    parser.add_argument("--splits", default=None)


def from_args(args, languages: list[str] | None) -> ParseResult:
    return parse(args.xflickrco, args.images, languages, csv_list(args.splits))
