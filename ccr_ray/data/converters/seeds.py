"""The seeds' own layout (MLA / DASD `dataset/`, spec 4.1-4.4): one path JSON per benchmark,

    {"<split>": {"anno_file": [...], "feature": [...], "name_file": [...], "langs": [...]}}

with four parallel lists: entry i reads language langs[i]'s caption JSON anno_file[i] (`{image key: [captions]}`)
for the image keys in name_file[i] (a 1-D .npy of keys, in evaluation order), images under feature[i]. A
name_file entry that is a list of .npy files is k-fold evaluation (COCO 5x1K): keys of file j get fold j.
Several path JSONs may be given ("m30k+coco" concatenates them).

The released files carry absolute paths from the authors' machines (`/disk/dzy/VisualSearch/MLA_dataset/dataset/`
...): `data_root` replaces such a prefix (and roots relative paths), so the files work unchanged.

Folds: the row's fold comes from the folded entries of its split; an unfolded language over the same images
shares it (retrieval then scores it per fold too). An image that two languages put in different folds keeps the
first and the later language's captions for it are rejected as fold_conflict.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ccr_ray.data import schema
from ccr_ray.data.converters.records import (
    DUPLICATE_KEY,
    FOLD_CONFLICT,
    MALFORMED_JSON,
    MISSING_CAPTION,
    UNKNOWN_LANGUAGE,
    InputError,
    ParseResult,
    Reject,
    SplitBuilder,
    canonical_language,
    check_caption,
    csv_list,
    finish,
    image_file_of,
    is_known_language,
    load_caption_json,
    load_name_list,
    raw_of,
    read_bytes,
    require_path,
)

NAME = "seeds"
AUTHOR_PREFIXES = ("/disk/dzy/VisualSearch/MLA_dataset/dataset/",)  # as found in the released path JSONs
FIELDS = ("anno_file", "feature", "name_file", "langs")
SPLIT_ORDER = ("train", "val", "test")


@dataclass
class Entry:
    path_json: str
    split: str
    index: int
    lang: str  # as written in the file
    anno: Path
    feature: Path
    name_files: list[Path]
    folded: bool

    @property
    def field(self) -> str:
        return f"{self.path_json}: {self.split}"


def rewrite(path: str, data_root: str | None, prefixes: tuple[str, ...] = AUTHOR_PREFIXES) -> Path:
    """An authors' absolute path -> the same file under data_root; relative paths are relative to data_root."""
    for prefix in prefixes:
        if data_root and path.startswith(prefix):
            return Path(data_root) / path[len(prefix):]
    if data_root and not os.path.isabs(path):
        return Path(data_root) / path
    return Path(path)


def load_entries(path_jsons: list[str], data_root: str | None, prefixes: tuple[str, ...] = AUTHOR_PREFIXES,
                 splits: list[str] | None = None) -> list[Entry]:
    """Every (split, entry) of the path JSONs, each field validated and each path checked, before any parsing."""
    if not path_jsons:
        raise InputError("--path-json: at least one path JSON is needed")
    if data_root is not None:
        require_path(data_root, "--data-root", "dir")
    entries: list[Entry] = []
    found_splits: set[str] = set()
    for pj in path_jsons:
        require_path(pj, "--path-json", "file")
        try:
            cfg = json.loads(read_bytes(pj).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise InputError(f"--path-json: {pj} is not valid JSON ({err})") from None
        if not isinstance(cfg, dict) or not cfg:
            raise InputError(f"--path-json: {pj} must be an object {{split: {{{', '.join(FIELDS)}}}}}")
        for split, spec in cfg.items():
            found_splits.add(split)
            if splits is not None and split not in splits:
                continue
            where = f"{pj}: {split}"
            if not isinstance(spec, dict):
                raise InputError(f"{where}: expected an object with {', '.join(FIELDS)}")
            for f in FIELDS:
                if f not in spec:
                    raise InputError(f"{where}.{f} is missing")
                if not isinstance(spec[f], list):
                    raise InputError(f"{where}.{f} must be a list (parallel to the other three)")
            lengths = {f: len(spec[f]) for f in FIELDS}
            if len(set(lengths.values())) != 1:
                raise InputError(f"{where}: the parallel lists differ in length ("
                                 + ", ".join(f"{f} {n}" for f, n in lengths.items()) + ")")
            for i in range(lengths["langs"]):
                lang = spec["langs"][i]
                if not isinstance(lang, str) or not lang.strip():
                    raise InputError(f"{where}.langs[{i}] must be a language code, got {lang!r}")
                for f in ("anno_file", "feature"):
                    if not isinstance(spec[f][i], str):
                        raise InputError(f"{where}.{f}[{i}] must be a path, got {spec[f][i]!r}")
                anno = require_path(rewrite(spec["anno_file"][i], data_root, prefixes), f"{where}.anno_file[{i}]",
                                    "file")
                feature = require_path(rewrite(spec["feature"][i], data_root, prefixes), f"{where}.feature[{i}]",
                                       "dir")
                nf = spec["name_file"][i]
                folded = isinstance(nf, list)
                items = nf if folded else [nf]
                if not items or not all(isinstance(x, str) for x in items):
                    raise InputError(f"{where}.name_file[{i}] must be a path or a non-empty list of paths")
                name_files = [require_path(rewrite(x, data_root, prefixes),
                                           f"{where}.name_file[{i}]" + (f"[{j}]" if folded else ""), "file")
                              for j, x in enumerate(items)]
                entries.append(Entry(str(pj), split, i, lang, anno, feature, name_files, folded))
    for s in splits or []:
        if s not in found_splits:
            raise InputError(f"--splits: {s!r} is in none of the path JSONs (found: {', '.join(sorted(found_splits))})")
    return entries


def parse(path_jsons: list[str], data_root: str | None = None, prefixes: tuple[str, ...] = AUTHOR_PREFIXES,
          languages: list[str] | None = None, splits: list[str] | None = None) -> ParseResult:
    entries = load_entries(path_jsons, data_root, prefixes, splits)
    # every split list is read (and an object-dtype .npy refused) before any caption is parsed
    names = {(id(e), j): load_name_list(nf, f"{e.field}.name_file[{e.index}]") for e in entries
             for j, nf in enumerate(e.name_files)}
    rejects: list[Reject] = []
    builders: dict[str, SplitBuilder] = {}
    captions_cache: dict[Path, tuple] = {}
    seen: dict[tuple[str, str], dict[str, str]] = {}  # (split, lang) -> key -> where it was first listed
    folded_langs: dict[str, set] = {}
    for e in sorted(entries, key=lambda e: SPLIT_ORDER.index(e.split) if e.split in SPLIT_ORDER else 9):
        lang = canonical_language(e.lang)
        if languages is not None and lang not in languages:
            continue
        builder = builders.setdefault(e.split, SplitBuilder(e.split))
        if e.anno not in captions_cache:
            data, dups, err = load_caption_json(e.anno)
            captions_cache[e.anno] = (data, err)
            for key, n in dups:
                rejects.append(Reject(str(e.anno), DUPLICATE_KEY, key=key, language=lang, captions=n,
                                      detail="key repeated in the caption JSON; the first value is kept"))
        data, err = captions_cache[e.anno]
        if e.folded:
            folded_langs.setdefault(e.split, set()).add(lang)
        first = seen.setdefault((e.split, lang), {})
        for fold, nf in enumerate(e.name_files):
            src = str(nf)
            for key in names[(id(e), fold)]:
                caps = data.get(key) if data is not None else None
                n = len(caps) if isinstance(caps, list) else 1
                reject = _Rejecter(rejects, src, key, e.split, lang, n)
                if key in first:
                    reject(DUPLICATE_KEY, f"already listed for {lang} in {first[key]}")
                    continue
                first[key] = src
                if data is None:
                    reject(MALFORMED_JSON, f"{e.anno}: {err}", source=str(e.anno))
                    continue
                if not is_known_language(lang):
                    reject(UNKNOWN_LANGUAGE, f"{e.field}.langs[{e.index}] = {e.lang!r} is not a known language",
                           source=str(e.anno))
                    continue
                if caps is None:
                    reject(MISSING_CAPTION, f"no entry in {e.anno}", source=str(e.anno))
                    continue
                if not isinstance(caps, list):
                    reject(MALFORMED_JSON, f"value is {type(caps).__name__}, expected a list of captions",
                           source=str(e.anno), raw=raw_of(caps))
                    continue
                fold_id = fold if e.folded else schema.NO_FOLD
                row = builder.image(key, str(e.feature / image_file_of(key)), src, fold_id)
                if row is None:
                    reject(FOLD_CONFLICT, f"fold {fold_id} here, fold {builder.rows[key].fold} from an earlier "
                                          "language of this split")
                    continue
                for caption in caps:
                    text, reason, detail = check_caption(caption)
                    if text is None:
                        reject(reason, detail, source=str(e.anno), n=1, raw=raw_of(caption))
                    else:
                        builder.caption(key, lang, text)
    records = finish(builders.values(), rejects)
    notes = []
    for split, langs in folded_langs.items():
        other = sorted({lang for r in builders[split].rows.values() for lang in r.captions} - langs)
        if other:
            notes.append(f"{split}: folds come from {', '.join(sorted(langs))}; {', '.join(other)} share them")
    return ParseResult(name="seeds: " + ", ".join(Path(p).stem for p in path_jsons),
                       source="ccr_ray.data.converters.seeds " + " ".join(map(str, path_jsons)),
                       records=records, rejects=rejects, notes=notes,
                       inputs={"path_json": [str(p) for p in path_jsons], "data_root": data_root,
                               "prefixes": list(prefixes)})


@dataclass
class _Rejecter:
    """Rejects for one (key, language) of an entry; the source file defaults to the name file."""

    rejects: list[Reject]
    source: str
    key: str
    split: str
    lang: str
    captions: int

    def __call__(self, reason: str, detail: str, source: str | None = None, n: int | None = None,
                 raw: bytes | None = None) -> None:
        self.rejects.append(Reject(source or self.source, reason, key=self.key, split=self.split,
                                   language=self.lang, captions=self.captions if n is None else n,
                                   detail=detail, raw=raw))


# --------------------------------------------------------------------------------------------- the CLI's view

HELP = "MLA/DASD path JSON + caption JSON + .npy splits"


def add_arguments(parser) -> None:
    parser.add_argument("--path-json", action="append", required=True)
    parser.add_argument("--data-root", default=None, help="local folder that replaces the authors' dataset/ prefix")
    parser.add_argument("--path-prefix", action="append", default=None,
                        help="absolute prefix to replace with --data-root (default: the released files' prefix)")
    parser.add_argument("--splits", default=None)


def from_args(args, languages: list[str] | None) -> ParseResult:
    prefixes = tuple(args.path_prefix) if args.path_prefix else AUTHOR_PREFIXES
    return parse(args.path_json, args.data_root, prefixes, languages, csv_list(args.splits))
