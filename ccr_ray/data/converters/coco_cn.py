"""COCO-CN (github.com/li-xirong/coco-cn) sentence files: one line per Chinese sentence,

    COCO_<train|val>2014_<12-digit id>#<n>\t<sentence>

(e.g. `coco-cn_ext.icap2020.txt`, or the human-written `imageid.human-written-caption.txt`). Sentences of one
image are ordered by <n>. Splits come from COCO-CN's split lists (`coco-cn_train.txt` etc.: one image id a line,
or a .npy of keys) given as `split_lists={"train": FILE, ...}`; an image in none of them is left out and counted
under `filtered`. Without split lists every image goes to `split` (default test).
The image id is the COCO file name (`COCO_val2014_000000217153.jpg`); images are found in the --images folders or
their train2014/val2014 subfolders.
"""

from __future__ import annotations

import re
from pathlib import Path

from ccr_ray.data.converters.records import (
    DUPLICATE_KEY,
    MALFORMED_LINE,
    ImageResolver,
    InputError,
    ParseResult,
    Reject,
    SplitBuilder,
    decode_caption,
    finish,
    iter_lines,
    load_name_list,
    name_pairs,
    require_path,
)

NAME = "coco-cn"
LINE = re.compile(rb"(COCO_(?:train|val|test)2014_\d+)(?:\.jpg)?#(\d+)(?:\t|\s+)(.*)", re.DOTALL)
IMAGE_ID = re.compile(r"(COCO_(?:train|val|test)2014_\d+)(?:\.jpg)?")


def check_inputs(files: list[str], image_dirs: list[str], split_lists: dict[str, str] | None) -> None:
    if not files:
        raise InputError("--captions: at least one COCO-CN sentence file is needed")
    for f in files:
        require_path(f, "--captions", "file")
    for folder in image_dirs:
        require_path(folder, "--images", "dir")
    for name, f in (split_lists or {}).items():
        require_path(f, f"--split-list {name}", "file")


def parse(files: list[str], image_dirs: list[str], split: str = "test", split_lists: dict[str, str] | None = None,
          language: str = "zh") -> ParseResult:
    check_inputs(files, image_dirs, split_lists)
    resolve = ImageResolver(image_dirs)
    rejects: list[Reject] = []
    sentences: dict[str, dict[int, str]] = {}  # image id -> {n: sentence}, first-seen image order
    sources: dict[str, str] = {}
    seen: dict[tuple[str, int], str] = {}
    for path in files:
        src = str(path)
        for i, raw in iter_lines(path):
            if not raw.strip():
                continue
            m = LINE.fullmatch(raw.strip(b"\r\n"))
            if not m:
                rejects.append(Reject(src, MALFORMED_LINE, split=None, language=language, line=i, raw=raw,
                                      detail="expected COCO_<split>2014_<id>#<n><TAB><sentence>"))
                continue
            base, n = m.group(1).decode("ascii"), int(m.group(2))
            key = base + ".jpg"
            if (base, n) in seen:
                rejects.append(Reject(src, DUPLICATE_KEY, key=f"{base}#{n}", language=language, line=i, raw=raw,
                                      detail=f"sentence id already at {seen[(base, n)]}"))
                continue
            seen[(base, n)] = f"{Path(src).name}:{i}"
            text, reason, detail = decode_caption(m.group(3))
            if text is None:
                rejects.append(Reject(src, reason, key=f"{base}#{n}", language=language, line=i, detail=detail,
                                      raw=raw))
                sentences.setdefault(key, {})  # the image still exists; finish() rejects it if nothing is left
                sources.setdefault(key, src)
                continue
            sentences.setdefault(key, {})[n] = text
            sources.setdefault(key, src)
    filtered: dict[str, int] = {}
    builders: list[SplitBuilder] = []
    if split_lists:
        assigned: dict[str, str] = {}
        for name, list_file in split_lists.items():
            builder = SplitBuilder(name)
            builders.append(builder)
            for entry in load_name_list(list_file, f"--split-list {name}"):
                m = IMAGE_ID.fullmatch(entry.strip())
                if not m:
                    raise InputError(f"--split-list {name}: {list_file}: {entry!r} is not a COCO image id")
                key = m.group(1) + ".jpg"
                if key in assigned:  # in two split lists (or twice in one): kept where it came first
                    rejects.append(Reject(str(list_file), DUPLICATE_KEY, key=key, split=name, captions=0,
                                          language=language, detail=f"already in split {assigned[key]}"))
                elif key in sentences:
                    assigned[key] = name
                    _add(builder, key, sentences[key], resolve, sources[key], language)
        filtered["not_in_split_lists"] = len(set(sentences) - set(assigned))
    else:
        builder = SplitBuilder(split)
        builders.append(builder)
        for key, by_n in sentences.items():
            _add(builder, key, by_n, resolve, sources[key], language)
    records = finish(builders, rejects)
    for r in rejects:
        if r.split is None and r.key:
            r.split = next((b.split for b in builders if r.key.split("#")[0] + ".jpg" in b.rows), None)
    return ParseResult(name="COCO-CN", source="ccr_ray.data.converters.coco_cn " + " ".join(map(str, files)),
                       records=records, rejects=rejects, filtered=filtered,
                       inputs={"captions": [str(f) for f in files], "images": list(image_dirs),
                               "split_lists": dict(split_lists or {}), "split": split})


def _add(builder: SplitBuilder, key: str, by_n: dict[int, str], resolve: ImageResolver, src: str,
         language: str) -> None:
    builder.image(key, resolve(key), src)
    for n in sorted(by_n):
        builder.caption(key, language, by_n[n])


# --------------------------------------------------------------------------------------------- the CLI's view

HELP = "COCO-CN sentence files"


def add_arguments(parser) -> None:
    parser.add_argument("--captions", nargs="+", required=True)
    parser.add_argument("--images", action="append", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--split-list", action="append", default=[], metavar="NAME=FILE")


def from_args(args, languages: list[str] | None) -> ParseResult:
    lang = languages or ["zh"]
    if len(lang) != 1:
        raise InputError("--languages: COCO-CN files hold one language (zh)")
    return parse(args.captions, args.images, args.split, name_pairs(args.split_list, "--split-list") or None, lang[0])
