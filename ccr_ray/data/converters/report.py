"""Collect what the parsers and the shard tasks found into the rejects Parquet, the run report and the manifest.

The bad fraction counts captions: a reject row loses `captions` of them (an image rejected for a corrupt file
loses every caption it carried; an empty caption, one). bad = lost / (kept + lost). CC300K's selection rules
(`filtered`) are not bad input and are not counted.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict

import pyarrow as pa

from ccr_ray.data import schema
from ccr_ray.data.converters.records import TRUNCATED, ParseResult, Reject
from ccr_ray.data.converters.shards import WriteSpec
from ccr_ray.storage import Location, write_table


def bad_fraction(kept_captions: int, rejects: list[Reject]) -> float:
    lost = sum(r.captions for r in rejects)
    return lost / (kept_captions + lost) if kept_captions + lost else 0.0


def worst_reasons(rejects: list[Reject], n: int = 3) -> str:
    lost: Counter = Counter()
    rows: Counter = Counter()
    for r in rejects:
        lost[r.reason] += r.captions
        rows[r.reason] += 1
    return ", ".join(f"{reason} ({rows[reason]} records, {lost[reason]} captions)"
                     for reason, _ in sorted(lost.items(), key=lambda kv: (-kv[1], -rows[kv[0]]))[:n])


def image_rejects(summary: pa.Table) -> list[Reject]:
    out = []
    for row in summary.filter(pa.compute.equal(summary["kind"], "record")).to_pylist():
        if row["reason"]:
            out.append(Reject(row["source"] or "", row["reason"], key=row["image_id"], split=row["split"],
                              detail=row["detail"], captions=row["captions"]))
    # shard tasks finish in any order: sort, so a rerun writes the same rejects file
    return sorted(out, key=lambda r: (r.split or "", r.key or "", r.reason))


def write_rejects(out: str | os.PathLike, rejects: list[Reject]) -> str | None:
    if not rejects:
        return None
    rel = f"{schema.REJECTS_DIR}/part-00000.parquet"
    table = pa.Table.from_pylist([r.row() for r in rejects], schema=schema.reject_schema())
    write_table(table, Location.of(out) / rel)
    return rel


def build_report(parse: ParseResult, source_name: str, spec: WriteSpec, rejects: list[Reject],
                 summary: pa.Table | None, max_bad: float, seconds: dict) -> dict:
    langs = list(spec.languages)
    splits: dict[str, dict] = {}
    truncated: dict[str, dict[str, int]] = {}
    formats: Counter = Counter()
    if summary is not None:
        for row in summary.to_pylist():
            info = splits.setdefault(row["split"], {"images": 0, "captions": dict.fromkeys(langs, 0),
                                                    "folds": 0, "files": []})
            if row["kind"] == "shard":
                if row["file"]:
                    info["files"].append((row["shard"], row["file"]))
                t = truncated.setdefault(row["split"], dict.fromkeys(langs, 0))
                for lang, n in zip(langs, row["truncated"]):
                    t[lang] += n
            elif not row["reason"]:
                info["images"] += 1
                formats[row["image_format"]] += 1
                for lang, n in zip(langs, row["kept"]):
                    info["captions"][lang] += n
    folds: dict[str, set] = defaultdict(set)
    for r in parse.records:
        if r.fold != schema.NO_FOLD:
            folds[r.split].add(r.fold)
    for split, info in splits.items():
        info["folds"] = len(folds.get(split, ()))
        info["files"] = [f for _, f in sorted(info["files"])]
    kept = sum(sum(i["captions"].values()) for i in splits.values())
    if summary is None:  # before the image stage: every parsed caption counts as kept so far
        kept = sum(r.n_captions for r in parse.records)
    by_reason: dict[str, dict] = {}
    by_reason_language: dict[str, Counter] = defaultdict(Counter)
    for r in rejects:
        entry = by_reason.setdefault(r.reason, {"records": 0, "captions": 0})
        entry["records"] += 1
        entry["captions"] += r.captions
        by_reason_language[r.reason][r.language or "-"] += 1
    fraction = bad_fraction(kept, rejects)
    checked = {lang: ("CLIP BPE" if lang == "en" else f"tokenizer {spec.tokenizer}") for lang in langs
               if lang == "en" or spec.tokenizer}
    return {
        "status": "ok" if fraction <= max_bad else "failed",
        "source": source_name,
        "name": parse.name,
        "out": spec.out,
        "inputs": parse.inputs,
        "image_storage": spec.image_storage,
        "image_formats": dict(formats),
        "languages": langs,
        "splits": splits,
        "parsed": _parsed(parse),
        "kept": {"images": sum(i["images"] for i in splits.values()), "captions": kept},
        "rejected": {"records": len(rejects), "captions": sum(r.captions for r in rejects),
                     "by_reason": dict(sorted(by_reason.items())),
                     "by_reason_language": {k: dict(v) for k, v in sorted(by_reason_language.items())}},
        TRUNCATED: {"context_length": spec.context_length, "checked": checked,
                    "not_checked": [lang for lang in langs if lang not in checked],
                    "counts": truncated},
        "filtered": parse.filtered,
        "bad_fraction": round(fraction, 6),
        "max_bad_fraction": max_bad,
        "notes": parse.notes,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


def _parsed(parse: ParseResult) -> dict:
    """Counts after parsing, before the image stage (what the stage received)."""
    out: dict[str, dict] = {}
    for r in parse.records:
        info = out.setdefault(r.split, {"images": 0, "captions": {}})
        info["images"] += 1
        for lang, caps in r.captions.items():
            info["captions"][lang] = info["captions"].get(lang, 0) + len(caps)
    return out


def write_report(out: str | os.PathLike, report: dict) -> Location:
    path = Location.of(out) / schema.PREPARE_REPORT
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return path


def write_manifest(out: str | os.PathLike, parse: ParseResult, report: dict, tokenizer: str | None = None
                   ) -> schema.Manifest:
    """Written last and only on success: a failed run leaves its rejects and report but no dataset.json, so no
    stage can train on it by mistake. `tokenizer`: a tokenizer folder shipped with the data (relative to it)."""
    formats = report["image_formats"]
    splits = {name: schema.SplitInfo(images=info["images"], captions=info["captions"], folds=info["folds"],
                                     files=info["files"])
              for name, info in report["splits"].items() if info["images"]}
    manifest = schema.Manifest(
        name=parse.name, languages=report["languages"], splits=splits, image_storage=report["image_storage"],
        image_format=next(iter(formats)) if len(formats) == 1 else "mixed", tokenizer=tokenizer,
        source=parse.source,
        extra={"report": schema.PREPARE_REPORT, "rejected_records": report["rejected"]["records"],
               "bad_fraction": report["bad_fraction"]})
    schema.write_manifest(out, manifest)
    return manifest


def summary_text(report: dict) -> str:
    lines = [f"{report['name']} ({report['source']}): {report['status']}, bad fraction {report['bad_fraction']:.4%} "
             f"(max {report['max_bad_fraction']:.4%})"]
    for split, info in report["splits"].items():
        caps = ", ".join(f"{k} {v}" for k, v in info["captions"].items() if v)
        folds = f", {info['folds']} folds" if info["folds"] else ""
        lines.append(f"  {split}: {info['images']} images{folds}; captions {caps}")
    rej = report["rejected"]
    if rej["records"]:
        lines.append(f"  rejected: {rej['records']} records ({rej['captions']} captions): "
                     + ", ".join(f"{k} {v['records']}" for k, v in rej["by_reason"].items()))
    trunc = report[TRUNCATED]
    total = Counter()
    for counts in trunc["counts"].values():
        total.update(counts)
    if +total:
        lines.append("  truncated (kept): " + ", ".join(f"{k} {v}" for k, v in total.items() if v))
    if trunc["not_checked"]:
        lines.append(f"  truncation not checked for {', '.join(trunc['not_checked'])} (no --tokenizer)")
    if report["filtered"]:
        lines.append("  filtered by the source's selection rule: "
                     + ", ".join(f"{k} {v}" for k, v in report["filtered"].items()))
    return "\n".join(lines)
