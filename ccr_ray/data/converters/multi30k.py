"""Multi30K from its raw text files (github.com/multi30k/dataset, `data/`): task1 translations and task2
independent descriptions, each file parallel by line to an image list.

    <root>/task1/image_splits/<split>.txt          one Flickr30K file name a line (test_2017_mscoco: COCO names
                                                   with a '#<id>' suffix)
    <root>/task1[/raw]/<split>.<lang>[.gz]         line i translates the English line i (en de fr cs)
    <root>/task2/image_splits/<split>_images.txt
    <root>/task2[/raw]/<split>.<k>.<lang>[.gz]     k = 1..5 independent descriptions (en de)

As the seeds evaluate (spec 4.5): a language with task2 files for a split takes its 5 descriptions from task2
(en/de: 5 captions per image), the others their task1 translation (fr/cs: 1). `task2=False` takes every
language from task1 (1 caption each, all parallel by index: captions_de[0] translates captions_en[0]).
Output split names follow the seeds: test_2016 (task1 test_2016_flickr, task2 test_2016) is `test`; the other
test years keep their task1 names.
"""

from __future__ import annotations

import re
from pathlib import Path

from ccr_ray.data.converters.records import (
    ImageResolver,
    InputError,
    LineKey,
    ParseResult,
    Reject,
    SplitBuilder,
    add_parallel_captions,
    canonical_language,
    csv_list,
    finish,
    is_known_language,
    read_image_list,
    reject_unknown_language_lines,
    require_path,
)

NAME = "multi30k"
OUTPUT_SPLIT = {"test_2016_flickr": "test"}  # the seeds' "test" is test_2016
TASK2_FOR_TASK1 = {"train": "train", "val": "val", "test_2016_flickr": "test_2016"}
SPLIT_ORDER = ("train", "val", "test_2016_flickr", "test_2017_flickr", "test_2017_mscoco", "test_2018_flickr")


def _text_dirs(task_dir: Path) -> list[Path]:
    return [d for d in (task_dir, task_dir / "raw") if d.is_dir()]


def _language_files(task_dir: Path, pattern: str) -> dict[tuple, Path]:
    """{match groups: file} for files named by `pattern` (plain or .gz; plain wins)."""
    regex = re.compile(pattern + r"(\.gz)?$")
    found: dict[tuple, Path] = {}
    for folder in _text_dirs(task_dir):
        for path in sorted(folder.iterdir(), key=lambda p: (p.suffix == ".gz", p.name)):
            m = regex.fullmatch(path.name)
            if m and path.is_file():
                found.setdefault(m.groups()[:-1], path)
    return found


def check_inputs(root: str, image_dirs: list[str], text_only: bool = False) -> Path:
    root_path = require_path(root, "--multi30k", "dir")
    if not image_dirs and not text_only:
        raise InputError("--images: at least one image folder is needed (or --images-as none: captions only)")
    require_path(root_path / "task1" / "image_splits", "--multi30k (task1/image_splits)", "dir")
    for folder in image_dirs:
        require_path(folder, "--images", "dir")
    return root_path


def parse(root: str, image_dirs: list[str], languages: list[str] | None = None, splits: list[str] | None = None,
          task2: bool = True, text_only: bool = False) -> ParseResult:
    """`text_only`: no image is looked up (a captions-only dataset: `--images-as none`)."""
    root_path = check_inputs(root, image_dirs, text_only)
    resolve = (lambda key: "") if text_only else ImageResolver(image_dirs)
    t1, t2 = root_path / "task1", root_path / "task2"
    available = sorted((p.stem for p in (t1 / "image_splits").glob("*.txt")),
                       key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))
    wanted = splits or available
    for s in wanted:
        if s not in available:
            raise InputError(f"--splits: {s!r} is not a task1 split under {t1 / 'image_splits'} "
                             f"(found: {', '.join(available)})")
    rejects: list[Reject] = []
    builders: list[SplitBuilder] = []
    notes: list[str] = []
    for split in wanted:
        builder = SplitBuilder(OUTPUT_SPLIT.get(split, split))
        builders.append(builder)
        list1 = t1 / "image_splits" / f"{split}.txt"
        keys1 = _image_rows(builder, read_image_list(list1, builder.split, rejects), resolve, str(list1))
        task2_langs: dict[str, dict[int, Path]] = {}
        t2_split = TASK2_FOR_TASK1.get(split)
        list2 = t2 / "image_splits" / f"{t2_split}_images.txt"
        if task2 and t2_split and list2.is_file():
            for (k, code), path in _language_files(t2, re.escape(t2_split) + r"\.(\d+)\.([A-Za-z]{2,3})").items():
                task2_langs.setdefault(code, {})[int(k)] = path
        files1 = {code: path for (code,), path in
                  _language_files(t1, re.escape(split) + r"\.([A-Za-z]{2,3})").items()}
        keys2 = None
        if task2_langs:
            keys2 = _image_rows(builder, read_image_list(list2, builder.split, rejects), resolve, str(list2))
        for code in sorted(set(files1) | set(task2_langs)):
            lang = canonical_language(code)
            if languages is not None and lang not in languages:
                continue
            if not is_known_language(lang):
                for path in [files1[code]] if code in files1 else []:
                    reject_unknown_language_lines(path, code, builder.split, rejects, keys1)
                for path in task2_langs.get(code, {}).values():
                    reject_unknown_language_lines(path, code, builder.split, rejects, keys2)
                continue
            if code in task2_langs:
                for k in sorted(task2_langs[code]):
                    add_parallel_captions(builder, keys2, task2_langs[code][k], lang, rejects)
                if code in files1:
                    notes.append(f"{builder.split}/{lang}: {len(task2_langs[code])} task2 descriptions per image "
                                 f"(task1 file {files1[code].name} not used)")
            else:
                add_parallel_captions(builder, keys1, files1[code], lang, rejects)
    records = finish(builders, rejects)
    return ParseResult(name="Multi30K", source=f"ccr_ray.data.converters.multi30k {root_path}", records=records,
                       rejects=rejects, notes=notes,
                       inputs={"multi30k": str(root_path), "images": list(image_dirs), "task2": task2})


def _image_rows(builder: SplitBuilder, keys: list[LineKey], resolve: ImageResolver, source: str) -> list[LineKey]:
    for lk in keys:
        if lk.key is not None:
            builder.image(lk.key, resolve(lk.key), source)
    return keys


# --------------------------------------------------------------------------------------------- the CLI's view

HELP = "Multi30K raw text files"


def add_arguments(parser) -> None:
    parser.add_argument("--multi30k", required=True)
    parser.add_argument("--images", action="append", default=[], help="image folder(s); not with --images-as none")
    parser.add_argument("--no-task2", action="store_true", help="every language from task1 (1 caption, parallel)")
    parser.add_argument("--splits", default=None)


def from_args(args, languages: list[str] | None) -> ParseResult:
    text_only = getattr(args, "images_as", "bytes") == "none"
    return parse(args.multi30k, [] if text_only else args.images, languages, csv_list(args.splits),
                 task2=not args.no_task2, text_only=text_only)
