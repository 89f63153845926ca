"""CC300K (spec 4.5) from UC2's translated Conceptual Captions TSVs, one per language:

    <tsv-dir>/train_imageId2Ann_<lang>.tsv     id \\t url \\t caption \\t success|fail

The seeds' recipe (convert2json.py, get_pairs.py, the `top: 300000` config):
  1. per language, keep rows whose status is `success` and whose caption is usable (others: filtered / rejected);
  2. keep the ids that have a caption in every language (six: en de fr cs zh ja);
  3. shuffle them with numpy seed 42 (`np.random.seed(42); np.random.shuffle(names)`), names '%08d.jpg' % id;
  4. keep those whose image exists (`existing_ids` JSON list of file names, else a file check in the image folder);
  5. take the first N (300,000). Everything goes to split `train`.
The order before the shuffle is ascending id (the seeds' names_aligned.npy order is not published). Rows left
out by steps 1-5 for selection reasons (status fail, not in every language, image not downloaded, beyond N) are
counted under `filtered`, not rejected: they are not bad input. An image found corrupt later (image stage) is
rejected and not replaced, so the output then has fewer than N images (the report says how many).

Two streaming passes over the TSVs (multi-GB): the first finds the usable ids per language, the second reads
captions for the N selected ids only, so memory holds id sets rather than millions of captions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ccr_ray.data.converters.records import (
    DUPLICATE_KEY,
    MALFORMED_LINE,
    InputError,
    ParseResult,
    Record,
    Reject,
    check_languages,
    decode_caption,
    iter_lines,
    name_pairs,
    require_path,
)

NAME = "cc300k"
LANGUAGES = ("en", "de", "fr", "cs", "zh", "ja")
SPLIT = "train"
TOP = 300_000
SEED = 42


def image_name(image_id: int) -> str:
    return f"{image_id:08d}.jpg"  # the seeds' "%08d.jpg" % id


def find_tsvs(tsv_dir: str | None, explicit: dict[str, str] | None, languages: list[str]) -> dict[str, Path]:
    """{lang: TSV}: explicit LANG=FILE pairs win, else train_imageId2Ann_<lang>.tsv (en: also the unsuffixed
    train_imageId2Ann.tsv) in tsv_dir."""
    explicit = {k: v for k, v in (explicit or {}).items()}
    out: dict[str, Path] = {}
    for lang in languages:
        if lang in explicit:
            out[lang] = require_path(explicit[lang], f"--tsv {lang}", "file")
            continue
        if tsv_dir is None:
            raise InputError(f"--tsv-dir or --tsv {lang}=FILE: no TSV for language {lang}")
        folder = require_path(tsv_dir, "--tsv-dir", "dir")
        candidates = [folder / f"train_imageId2Ann_{lang}.tsv"] + (
            [folder / "train_imageId2Ann.tsv"] if lang == "en" else [])
        candidates += [c.with_name(c.name + ".gz") for c in candidates]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise InputError(f"--tsv-dir: {candidates[0]} does not exist (no TSV for language {lang})")
        out[lang] = found
    unknown = set(explicit) - set(languages)
    if unknown:
        raise InputError(f"--tsv: language(s) {', '.join(sorted(unknown))} not in --languages")
    return out


def _rows(path: Path, lang: str, rejects: list[Reject] | None) -> Iterator[tuple[int, int, str | None, bool]]:
    """(line, id, caption or None, success) for each well-formed row; malformed rows go to `rejects` (when given)."""
    src = str(path)
    for i, raw in iter_lines(path):
        if not raw.strip():
            continue
        fields = raw.split(b"\t")
        if len(fields) != 4 or not fields[0].strip().isdigit() or fields[3].strip() not in (b"success", b"fail"):
            if rejects is not None:
                rejects.append(Reject(src, MALFORMED_LINE, split=SPLIT, language=lang, line=i, raw=raw,
                                      detail=f"expected id<TAB>url<TAB>caption<TAB>success|fail, got {len(fields)} "
                                             "field(s)"))
            continue
        image_id = int(fields[0])
        if fields[3].strip() == b"fail":
            yield i, image_id, None, False
            continue
        text, reason, detail = decode_caption(fields[2])
        if text is None and rejects is not None:
            rejects.append(Reject(src, reason, key=image_name(image_id), split=SPLIT, language=lang, line=i,
                                  detail=detail, raw=raw))
        yield i, image_id, text, True


def check_inputs(tsv_dir, tsvs, image_dir, existing_ids, languages, top) -> tuple[dict[str, Path], list[str]]:
    langs = check_languages(languages) if languages is not None else list(LANGUAGES)
    if top <= 0:
        raise InputError(f"--top must be > 0, got {top}")
    files = find_tsvs(tsv_dir, tsvs, langs)
    require_path(image_dir, "--images", "dir")
    if existing_ids is not None:
        require_path(existing_ids, "--existing-ids", "file")
    return files, langs


def parse(image_dir: str, tsv_dir: str | None = None, tsvs: dict[str, str] | None = None,
          languages: list[str] | None = None, top: int = TOP, seed: int = SEED,
          existing_ids: str | None = None) -> ParseResult:
    files, langs = check_inputs(tsv_dir, tsvs, image_dir, existing_ids, languages, top)
    rejects: list[Reject] = []
    filtered = {"status_fail": 0, "not_in_every_language": 0, "image_not_found": 0, "beyond_top": 0}
    usable: set[int] | None = None
    any_usable: set[int] = set()
    for lang in langs:  # pass 1: usable ids per language
        ok: set[int] = set()
        for image_id, text, success in _rows_with_dups(files[lang], lang, rejects):
            if not success:
                filtered["status_fail"] += 1
            elif text is not None:
                ok.add(image_id)
        any_usable |= ok
        usable = ok if usable is None else usable & ok
    usable = usable or set()
    filtered["not_in_every_language"] = len(any_usable - usable)
    names = np.array([image_name(i) for i in sorted(usable)])
    np.random.RandomState(seed).shuffle(names)  # == np.random.seed(seed); np.random.shuffle(names)
    existing = _existing(existing_ids)
    selected: list[str] = []
    for k, name in enumerate(names.tolist()):
        if len(selected) == top:
            filtered["beyond_top"] = len(names) - k
            break
        found = name in existing if existing is not None else os.path.isfile(os.path.join(image_dir, name))
        if found:
            selected.append(name)
        else:
            filtered["image_not_found"] += 1
    wanted = {int(n[:-4]): n for n in selected}
    captions: dict[str, dict[str, str]] = {n: {} for n in selected}
    for lang in langs:  # pass 2: captions of the selected ids (the first usable row, as pass 1 kept)
        for image_id, text, success in _rows_with_dups(files[lang], lang, None):
            name = wanted.get(image_id)
            if name is not None and success and text is not None and lang not in captions[name]:
                captions[name][lang] = text
    src = str(files[langs[0]])
    records = [Record(image_id=n, split=SPLIT, image_file=os.path.join(image_dir, n), source=src,
                      captions={lang: [captions[n][lang]] for lang in langs}) for n in selected]
    notes = [f"{len(usable)} ids have a caption in all of {', '.join(langs)}; shuffled with seed {seed}; "
             f"first {len(selected)} with an image kept (top {top})"]
    return ParseResult(name="CC300K",
                       source="ccr_ray.data.converters.cc300k " + " ".join(str(files[lang]) for lang in langs),
                       records=records, rejects=rejects, filtered=filtered, notes=notes,
                       inputs={"tsv": {lang: str(files[lang]) for lang in langs}, "images": image_dir, "top": top,
                               "seed": seed, "existing_ids": existing_ids})


def _rows_with_dups(path: Path, lang: str, rejects: list[Reject] | None):
    """Rows with repeated ids removed (the first is kept, the others rejected as duplicate_key when rejects are
    collected)."""
    seen: dict[int, int] = {}
    for line, image_id, text, success in _rows(path, lang, rejects):
        if image_id in seen:
            if rejects is not None:
                rejects.append(Reject(str(path), DUPLICATE_KEY, key=image_name(image_id), split=SPLIT,
                                      language=lang, line=line, detail=f"id {image_id} already on line {seen[image_id]}"))
            continue
        seen[image_id] = line
        yield image_id, text, success


def _existing(path: str | None) -> set[str] | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise InputError(f"--existing-ids: {path} is not a JSON list of image file names ({err})") from None
    if not isinstance(data, list):
        raise InputError(f"--existing-ids: {path} must be a JSON list of image file names")
    return {os.path.basename(str(x)) for x in data}


# --------------------------------------------------------------------------------------------- the CLI's view

HELP = "UC2 translated CC3M TSVs"


def add_arguments(parser) -> None:
    parser.add_argument("--images", required=True)
    parser.add_argument("--tsv-dir", default=None)
    parser.add_argument("--tsv", action="append", default=[], metavar="LANG=FILE")
    parser.add_argument("--top", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--existing-ids", default=None)


def from_args(args, languages: list[str] | None) -> ParseResult:
    return parse(args.images, args.tsv_dir, name_pairs(args.tsv, "--tsv"), languages, args.top, args.seed,
                 args.existing_ids)
