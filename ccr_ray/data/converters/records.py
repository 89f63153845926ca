"""What every source parser produces: image records, quarantined rejects, and the helpers they share.

No Ray, no torch: parsing runs in the driver before any Ray work, so a malformed config or a missing input path
fails in seconds with a message naming the field or path (`InputError`), and the unit tests need no cluster.

Text is read as bytes and decoded record by record, so one invalid-UTF-8 line costs that line only.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ccr_ray.config import KNOWN_LANGUAGES
from ccr_ray.data import schema

# Reject reasons: stable names (the report, the rejects Parquet and tests use them).
CORRUPT_IMAGE = "corrupt_image"  # undecodable or truncated image file
MISSING_IMAGE = "missing_image"  # the image file does not exist (or cannot be read)
EMPTY_CAPTION = "empty_caption"  # empty or whitespace-only caption
INVALID_UTF8 = "invalid_utf8"  # bytes that are not UTF-8 (or a JSON string with lone surrogates)
UNKNOWN_LANGUAGE = "unknown_language"  # a language code outside config.KNOWN_LANGUAGES (after aliases)
DUPLICATE_KEY = "duplicate_key"  # the same image key (or caption id) twice in one split and language
LENGTH_MISMATCH = "length_mismatch"  # a caption file parallel to an image list has a different number of lines
MALFORMED_LINE = "malformed_line"  # a TSV / text line without the expected fields
MALFORMED_JSON = "malformed_json"  # a JSON document or JSON line that does not parse or lacks fields
MISSING_CAPTION = "missing_caption"  # an image listed for a language has no entry in that language's captions
NO_CAPTION = "no_caption"  # an image left without any usable caption (its captions were rejected one by one)
FOLD_CONFLICT = "fold_conflict"  # an image put in different k-fold groups by two languages of one split
REASONS = (CORRUPT_IMAGE, MISSING_IMAGE, EMPTY_CAPTION, INVALID_UTF8, UNKNOWN_LANGUAGE, DUPLICATE_KEY,
           LENGTH_MISMATCH, MALFORMED_LINE, MALFORMED_JSON, MISSING_CAPTION, NO_CAPTION, FOLD_CONFLICT)
TRUNCATED = "truncated_caption"  # not a reject: longer than the tokenizer's context, kept (cut at training)

# Codes the seeds and the public files use for languages that have a standard ISO 639-1 code.
LANGUAGE_ALIASES = {"jp": "ja", "cn": "zh"}
RAW_CAP = 4096  # bytes of an offending record kept in the rejects file


class InputError(ValueError):
    """A malformed config or a missing input path; the message names the field or the path."""


@dataclass
class Record:
    """One image of the output: one row of the wide layout (schema.py)."""

    image_id: str  # key relative to the image folder, as the source names it
    split: str
    image_file: str  # where the image is read from (absolute or relative to the working directory)
    source: str  # the input file that listed the image (for rejects)
    captions: dict[str, list[str]] = field(default_factory=dict)
    fold: int = schema.NO_FOLD

    @property
    def n_captions(self) -> int:
        return sum(len(c) for c in self.captions.values())


@dataclass
class Reject:
    source_file: str
    reason: str
    key: str | None = None
    split: str | None = None
    language: str | None = None
    line: int = 0  # 1-based line number; 0 when the source is not line-based
    detail: str = ""
    captions: int = 1  # captions lost with this record (0 when they are counted by their own rejects)
    raw: bytes | None = None

    def row(self) -> dict:
        raw = self.raw[:RAW_CAP] if self.raw is not None else None
        return {"source_file": str(self.source_file), "key": self.key, "split": self.split,
                "language": self.language, "line": int(self.line), "reason": self.reason,
                "detail": self.detail, "captions": int(self.captions), "raw": raw}


@dataclass
class ParseResult:
    """A source parsed into records (in evaluation order per split) and rejects; `filtered` counts records left
    out by the source's own selection rule (CC300K: status 'fail', not in all languages, beyond the first N), which
    are not bad input and do not count against --max-bad-fraction."""

    name: str
    source: str
    records: list[Record]
    rejects: list[Reject]
    filtered: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)

    def languages(self) -> list[str]:
        present = {lang for r in self.records for lang, caps in r.captions.items() if caps}
        return [lang for lang in KNOWN_LANGUAGES if lang in present]

    def splits(self) -> list[str]:
        return list(dict.fromkeys(r.split for r in self.records))


# ----------------------------------------------------------------------------------------------- languages


def canonical_language(code: str) -> str:
    code = code.strip().lower()
    return LANGUAGE_ALIASES.get(code, code)


def is_known_language(code: str) -> bool:
    return code in KNOWN_LANGUAGES


def check_languages(languages: Iterable[str] | None, option: str = "--languages") -> list[str] | None:
    """Validate a user's language filter up front (a config error, not a reject)."""
    if languages is None:
        return None
    out = [canonical_language(lang) for lang in languages if lang.strip()]
    unknown = [lang for lang in out if not is_known_language(lang)]
    if unknown:
        raise InputError(f"{option}: unknown language code(s) {', '.join(unknown)} "
                         f"(known: {', '.join(KNOWN_LANGUAGES)})")
    if not out:
        raise InputError(f"{option}: empty")
    return out


# ------------------------------------------------------------------------------------------------ paths


def require_path(path: str | os.PathLike, what: str, kind: str = "any") -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what}: {path} does not exist")
    if kind == "dir" and not path.is_dir():
        raise InputError(f"{what}: {path} is not a folder")
    if kind == "file" and not path.is_file():
        raise InputError(f"{what}: {path} is not a file")
    return path


def image_file_of(key: str) -> str:
    """Multi30K's test_2017_mscoco keys carry a '#<caption id>' suffix that is not part of the file name."""
    return key.split("#", 1)[0]


class ImageResolver:
    """Image key -> file: the first folder that has it; COCO names are also looked up in their
    train2014/val2014/test2014 subfolder. A key found nowhere maps into the first folder, so the image stage
    reports it as missing_image with that path."""

    def __init__(self, folders: Iterable[str | os.PathLike]):
        self.folders = [Path(f) for f in folders]
        if not self.folders:
            raise InputError("--images: at least one image folder is needed")

    def __call__(self, key: str) -> str:
        name = image_file_of(key)
        candidates = []
        for folder in self.folders:
            candidates.append(folder / name)
            if name.startswith("COCO_"):
                parts = name.split("_")
                if len(parts) >= 3:
                    candidates.append(folder / parts[1] / name)
        for path in candidates:
            if path.is_file():
                return str(path)
        return str(self.folders[0] / name)


# ------------------------------------------------------------------------------------------------- text

_BOM = b"\xef\xbb\xbf"


def read_bytes(path: str | os.PathLike) -> bytes:
    path = Path(path)
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    return data[len(_BOM):] if data.startswith(_BOM) else data


def read_lines(path: str | os.PathLike) -> list[bytes]:
    """Lines as bytes: CRLF and a missing final newline are fine (bytes.splitlines splits on \\n, \\r, \\r\\n
    only, never inside a caption on Unicode separators the way str.splitlines would)."""
    return read_bytes(path).splitlines()


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes without the line end), streamed: for multi-GB TSVs."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if i == 1 and line.startswith(_BOM):
                line = line[len(_BOM):]
            yield i, line.rstrip(b"\r\n")


def decode_caption(raw: bytes) -> tuple[str | None, str, str]:
    """(caption, reason, detail): caption is None when the bytes are not usable."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, INVALID_UTF8, f"{err.reason} at byte {err.start}"
    return check_caption(text)


def raw_of(value) -> bytes:
    """The bytes of a caption value for the rejects file: the original bytes where a surrogateescape decode
    kept them, else an escaped form."""
    if not isinstance(value, str):
        return repr(value).encode("utf-8", errors="backslashreplace")
    try:
        return value.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", errors="backslashreplace")


def check_caption(text) -> tuple[str | None, str, str]:
    """A caption string from any source: must be text that UTF-8 can encode, and not blank."""
    if not isinstance(text, str):
        return None, MALFORMED_JSON, f"caption is {type(text).__name__}, not a string"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates (JSON "\udc80" escapes): Parquet cannot store them
        return None, INVALID_UTF8, f"{err.reason} at character {err.start}"
    text = text.strip()
    if not text:
        return None, EMPTY_CAPTION, "empty or whitespace-only"
    return text, "", ""


def load_caption_json(path: str | os.PathLike) -> tuple[dict | None, list[tuple[str, int]], str]:
    """A caption file `{key: [caption, ...]}` -> (dict or None when it does not parse, [(repeated key, captions
    it carried)], error). A repeated key keeps its first value (json.load would keep the last one silently)."""
    dups: list[tuple[str, int]] = []

    def pairs(items):
        out = {}
        for k, v in items:
            if k in out:
                dups.append((k, len(v) if isinstance(v, list) else 1))
                continue
            out[k] = v
        return out

    try:
        text = read_bytes(path).decode("utf-8", errors="surrogateescape")
        data = json.loads(text, object_pairs_hook=pairs)
    except (ValueError, OSError, EOFError) as err:
        return None, dups, f"{type(err).__name__}: {err}"
    if not isinstance(data, dict):
        return None, dups, f"top level is {type(data).__name__}, expected an object {{key: [captions]}}"
    return data, dups, ""


def load_name_list(path: str | os.PathLike, what: str) -> list[str]:
    """A split list: 1-D .npy of image keys (never unpickled: allow_pickle=False), or a text file, one key a line."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            if "allow_pickle" in str(err):
                raise InputError(f"{what}: {path} holds a pickled object array; ccr-ray never unpickles input "
                                 "files (re-save it as a numpy string array)") from None
            raise InputError(f"{what}: {path} is not a readable .npy file ({err})") from None
        except OSError as err:
            raise InputError(f"{what}: {path} is not a readable .npy file ({err})") from None
        if array.ndim != 1 or array.dtype.kind not in "US":
            raise InputError(f"{what}: {path} must be a 1-D array of strings, got shape {array.shape} "
                             f"dtype {array.dtype}")
        if array.dtype.kind == "S":
            return [b.decode("utf-8", errors="replace") for b in array.tolist()]
        return [str(s) for s in array.tolist()]
    return [line.decode("utf-8", errors="replace").strip() for line in read_lines(path) if line.strip()]


# ---------------------------------------------------------------------------------------------- building


class SplitBuilder:
    """Rows of one split in first-seen order; languages add their captions by image key."""

    def __init__(self, split: str):
        self.split = split
        self.rows: dict[str, Record] = {}

    def image(self, key: str, image_file: str, source: str, fold: int = schema.NO_FOLD) -> Record | None:
        """The row for `key` (created on first sight); None when `fold` conflicts with the row's fold."""
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = Record(image_id=key, split=self.split, image_file=image_file, source=source,
                                          fold=fold)
        elif fold != schema.NO_FOLD:
            if row.fold == schema.NO_FOLD:
                row.fold = fold
            elif row.fold != fold:
                return None
        return row

    def caption(self, key: str, lang: str, text: str) -> None:
        self.rows[key].captions.setdefault(lang, []).append(text)


def finish(builders: Iterable[SplitBuilder], rejects: list[Reject]) -> list[Record]:
    """Records with at least one usable caption; the others are rejected as no_caption (their captions were
    already counted by their own rejects, so this row loses none)."""
    out = []
    for builder in builders:
        for row in builder.rows.values():
            row.captions = {lang: caps for lang, caps in row.captions.items() if caps}
            if row.captions:
                out.append(row)
            else:
                rejects.append(Reject(row.source, NO_CAPTION, key=row.image_id, split=row.split, captions=0,
                                      detail="no usable caption in any language"))
    return out


@dataclass
class LineKey:
    """An image-list line: its key, or why it is unusable (its caption lines are then rejected for that reason)."""

    key: str | None
    reason: str = ""
    detail: str = ""


def read_image_list(path: Path, split: str, rejects: list[Reject]) -> list[LineKey]:
    """An image list, one key a line: undecodable or blank lines and repeated keys become unusable (rejected
    here with captions=0; their caption lines are rejected with the same reason by `add_parallel_captions`)."""
    keys: list[LineKey] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(read_lines(path), 1):
        try:
            key = raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            keys.append(LineKey(None, INVALID_UTF8, f"image list line {i}: {err.reason}"))
            rejects.append(Reject(str(path), INVALID_UTF8, split=split, line=i, captions=0, raw=raw,
                                  detail=keys[-1].detail))
            continue
        if not key:
            keys.append(LineKey(None, MALFORMED_LINE, f"image list line {i} is blank"))
            rejects.append(Reject(str(path), MALFORMED_LINE, split=split, line=i, captions=0, raw=raw,
                                  detail=keys[-1].detail))
            continue
        if key in seen:
            keys.append(LineKey(None, DUPLICATE_KEY, f"{key} already on line {seen[key]} of the image list"))
            rejects.append(Reject(str(path), DUPLICATE_KEY, key=key, split=split, line=i, captions=0,
                                  detail=keys[-1].detail))
            continue
        seen[key] = i
        keys.append(LineKey(key))
    return keys


def add_parallel_captions(builder: SplitBuilder, keys: list[LineKey], path: Path, lang: str,
                          rejects: list[Reject]) -> int:
    """Caption file whose line i describes image-list line i. Returns the number of captions kept.

    Length mismatch policy: when the file's line count differs from the image list's (ignoring trailing blank
    lines), every line of the file is rejected as length_mismatch. A missing or extra line anywhere shifts every
    caption after it onto the wrong image, and nothing in the file says where; keeping "the aligned prefix" would
    keep pairs that cannot be verified. The images and their captions in every other file are unaffected.
    """
    lines = read_lines(path)
    while len(lines) > len(keys) and not lines[-1].strip():
        lines.pop()
    split = builder.split
    if len(lines) != len(keys):
        detail = f"{len(lines)} lines, the image list has {len(keys)}"
        for i, raw in enumerate(lines, 1):
            key = keys[i - 1].key if i <= len(keys) else None
            rejects.append(Reject(str(path), LENGTH_MISMATCH, key=key, split=split, language=lang, line=i,
                                  detail=detail, raw=raw))
        return 0
    kept = 0
    for i, (raw, lk) in enumerate(zip(lines, keys), 1):
        if lk.key is None:
            rejects.append(Reject(str(path), lk.reason, split=split, language=lang, line=i, detail=lk.detail,
                                  raw=raw))
            continue
        text, reason, detail = decode_caption(raw)
        if text is None:
            rejects.append(Reject(str(path), reason, key=lk.key, split=split, language=lang, line=i,
                                  detail=detail, raw=raw))
            continue
        builder.caption(lk.key, lang, text)
        kept += 1
    return kept


def reject_unknown_language_lines(path: Path, code: str, split: str, rejects: list[Reject],
                                  keys: list[LineKey] | None = None) -> None:
    for i, raw in enumerate(read_lines(path), 1):
        key = keys[i - 1].key if keys is not None and i <= len(keys) else None
        rejects.append(Reject(str(path), UNKNOWN_LANGUAGE, key=key, split=split, language=code, line=i,
                              detail=f"language code {code!r} is not one of {', '.join(KNOWN_LANGUAGES)}",
                              raw=raw))


def csv_list(value: str | None) -> list[str] | None:
    """"a,b" -> ["a", "b"] (a command-line list); None stays None."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def name_pairs(values: list[str], option: str) -> dict[str, str]:
    """["NAME=FILE", ...] -> {NAME: FILE}; the message names the option."""
    out = {}
    for item in values:
        if "=" not in item:
            raise InputError(f"{option}: expected NAME=FILE, got {item!r}")
        name, path = item.split("=", 1)
        out[name.strip()] = path
    return out
