"""XTD10 (github.com/adobe-research/Cross-lingual-Test-Dataset-XTD10): 1000 MSCOCO 2014 images, one caption per
image in each language, every caption file parallel by line to the image list.

    <root>/XTD10/test_image_names.txt          COCO_train2014_... / COCO_val2014_... file names
    <root>/**/test_1kcaptions_<code>.txt       XTD10/ (en es it ko pl ru tr zh), MIC/ (de fr), STAIR/ (jp = ja)

Several files use CRLF and have no final newline; `read_lines` handles both. Everything goes to split `test`.
"""

from __future__ import annotations

import re
from pathlib import Path

from ccr_ray.data.converters.records import (
    DUPLICATE_KEY,
    ImageResolver,
    InputError,
    ParseResult,
    Reject,
    SplitBuilder,
    add_parallel_captions,
    canonical_language,
    finish,
    is_known_language,
    read_image_list,
    read_lines,
    reject_unknown_language_lines,
    require_path,
)

NAME = "xtd10"
SPLIT = "test"
CAPTION_FILE = re.compile(r"test_1kcaptions_([A-Za-z]{2,3})\.txt")


def check_inputs(root: str, image_dirs: list[str]) -> tuple[Path, Path]:
    root_path = require_path(root, "--xtd10", "dir")
    lists = sorted(root_path.rglob("test_image_names.txt"))
    if not lists:
        raise InputError(f"--xtd10: no test_image_names.txt under {root_path}")
    for folder in image_dirs:
        require_path(folder, "--images", "dir")
    return root_path, lists[0]


def parse(root: str, image_dirs: list[str], languages: list[str] | None = None) -> ParseResult:
    root_path, image_list = check_inputs(root, image_dirs)
    resolve = ImageResolver(image_dirs)
    rejects: list[Reject] = []
    builder = SplitBuilder(SPLIT)
    keys = read_image_list(image_list, SPLIT, rejects)
    for lk in keys:
        if lk.key is not None:
            builder.image(lk.key, resolve(lk.key), str(image_list))
    seen: dict[str, Path] = {}
    for path in sorted(root_path.rglob("test_1kcaptions_*.txt")):
        m = CAPTION_FILE.fullmatch(path.name)
        if not m:
            continue
        code = m.group(1)
        lang = canonical_language(code)
        if languages is not None and lang not in languages:
            continue
        if not is_known_language(lang):
            reject_unknown_language_lines(path, code, SPLIT, rejects, keys)
            continue
        if lang in seen:  # two files for one language: the image would get two unrelated "parallel" captions
            for i, raw in enumerate(read_lines(path), 1):
                rejects.append(Reject(str(path), DUPLICATE_KEY, key=keys[i - 1].key if i <= len(keys) else None,
                                      split=SPLIT, language=lang, line=i, raw=raw,
                                      detail=f"language {lang} already read from {seen[lang]}"))
            continue
        seen[lang] = path
        add_parallel_captions(builder, keys, path, lang, rejects)
    records = finish([builder], rejects)
    return ParseResult(name="XTD10", source=f"ccr_ray.data.converters.xtd10 {root_path}", records=records,
                       rejects=rejects, inputs={"xtd10": str(root_path), "images": list(image_dirs)})


# --------------------------------------------------------------------------------------------- the CLI's view

HELP = "XTD10 caption files"


def add_arguments(parser) -> None:
    parser.add_argument("--xtd10", required=True)
    parser.add_argument("--images", action="append", required=True)


def from_args(args, languages: list[str] | None) -> ParseResult:
    return parse(args.xtd10, args.images, languages)
