"""Convert a real dataset into ccr-ray's layout (sharded Parquet + dataset.json), quarantining bad records.

Usage:
    python jobs/prepare_data.py SOURCE --out DIR [common options] [source options]

SOURCE and its inputs:
    seeds      --path-json FILE [--path-json FILE ...] [--data-root DIR] [--path-prefix PREFIX ...]
    cc300k     --images DIR (--tsv-dir DIR | --tsv LANG=FILE ...) [--top 300000] [--seed 42] [--existing-ids JSON]
    multi30k   --multi30k DIR (--images DIR [--images DIR ...] | --images-as none) [--no-task2]
    xtd10      --xtd10 DIR --images DIR [--images DIR ...]
    xflickrco  --xflickrco DIR --images DIR [--images DIR ...]
    coco-cn    --captions FILE [FILE ...] --images DIR [--split test | --split-list NAME=FILE ...]

Common options:
    --out DIR                  output dataset folder; must not exist (or be empty) unless --force
    --force                    replace an earlier output of this job (a folder holding dataset.json or
                               prepare_report.json; any other non-empty folder is refused)
    --images-as bytes|path|none  embed the encoded image files (default), store their absolute paths, or store
                               no image at all (a captions-only dataset for text stages and text-to-text
                               evaluation, e.g. Multi30K without Flickr30K; multi30k only)
    --languages en,de,...      keep only these languages
    --splits train,val,...     keep only these splits (seeds, multi30k, xflickrco)
    --tokenizer DIR            tokenizer folder (M-BERT) to count truncated non-English captions; English is
                               always checked with CLIP's BPE
    --context-length 77        tokens per caption for the truncation count
    --wordpiece N              train a cased WordPiece tokenizer of N tokens (M-BERT's recipe) on the training
                               split's non-English captions and ship it with the data (DIR/tokenizer, which
                               model.text.tokenizer=auto uses): for runs without M-BERT
    --verbose                  Ray's own logs on the console too (else in {CCR_RAY_HOME}/logs/prepare_data-ray.log)
    --max-bad-fraction 0.01    fail (exit 3) when more than this fraction of captions is rejected
    --shard-size 1000          images per Parquet shard (one Ray Data task each)
    --task-cpus 0.5            CPUs per Ray Data task

Writes DIR/<split>/part-*.parquet, DIR/rejects/part-00000.parquet (every unusable record with its source file,
key, reason), DIR/prepare_report.json (counts per split and language, rejects by reason, truncation) and, only
when the run succeeds, DIR/dataset.json. Inputs and config are checked before any Ray work. The job joins the
cluster in RAY_ADDRESS, else a live `ray start` cluster here, else starts a local Ray. Exit codes: 0 ok, 2 bad arguments or inputs, 3 too many bad
records (rejects and report are still written, the manifest is not).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ccr_ray.cli import fail, quiet_ray_env
from ccr_ray.config import resolve_home
from ccr_ray.data import converters, schema
from ccr_ray.data.converters import SOURCES
from ccr_ray.data.converters.records import InputError, ParseResult, check_languages, csv_list
from ccr_ray.storage import Location
from ccr_ray.tokenization import SPECIAL_TOKENS

EXIT_TOO_MANY_BAD = 3


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True)
    common.add_argument("--force", action="store_true")
    common.add_argument("--verbose", action="store_true")
    common.add_argument("--images-as", choices=["bytes", "path", "none"], default="bytes")
    common.add_argument("--wordpiece", type=int, default=0)
    common.add_argument("--languages", default=None)
    common.add_argument("--tokenizer", default=None)
    common.add_argument("--context-length", type=int, default=77)
    common.add_argument("--max-bad-fraction", type=float, default=0.01)
    common.add_argument("--shard-size", type=int, default=1000)
    common.add_argument("--task-cpus", type=float, default=0.5)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name in SOURCES:
        module = converters.source(name)
        module.add_arguments(sub.add_parser(name, parents=[common], help=module.HELP))
    return parser


def parse_source(args: argparse.Namespace, languages: list[str] | None) -> ParseResult:
    """Ray-free: every input path and config field is checked here, before any Ray work."""
    return converters.source(args.source).from_args(args, languages)


def prepare_out(out: str, force: bool) -> Location:
    """The output folder (local or shared storage): new or empty, or one this job wrote when --force."""
    path = Location.of(out)
    if path.is_file():
        raise InputError(f"--out: {path} exists and is not a folder")
    if path.children():
        ours = (path / schema.MANIFEST).is_file() or (path / schema.PREPARE_REPORT).is_file()
        if not force:
            raise InputError(f"--out: {path} already exists and is not empty; --force replaces it")
        if not ours:
            raise InputError(f"--out: {path} is not a folder this job wrote (no {schema.MANIFEST} or "
                             f"{schema.PREPARE_REPORT}); refusing to delete it, remove it yourself")
    return path


def train_data_tokenizer(out: Location, report: dict, vocab_size: int) -> str:
    """Train the WordPiece tokenizer on the written train split's non-English captions; its folder (relative)."""
    import tempfile

    from ccr_ray.storage import read_table
    from ccr_ray.tokenization import train_wordpiece

    info = report["splits"].get("train")
    if not info or not info["files"]:
        raise InputError("--wordpiece: the dataset has no train split to train the tokenizer on")
    columns = [schema.captions_column(lang) for lang in report["languages"] if lang != "en"]
    texts = [caption for file in info["files"] for column in read_table(out / file, columns=columns).columns
             for captions in column.to_pylist() for caption in captions]
    with tempfile.TemporaryDirectory(prefix="ccr-wordpiece-") as tmp:  # trained here, then copied to --out
        train_wordpiece(texts, Path(tmp) / schema.TOKENIZER_DIR, vocab_size=vocab_size)
        (out / schema.TOKENIZER_DIR).upload_from(Path(tmp) / schema.TOKENIZER_DIR)
    return schema.TOKENIZER_DIR


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse exits on bad arguments and --help; jobs return their code
        return int(exit_.code or 0)
    quiet_ray_env()
    start = time.perf_counter()
    try:
        if not 0.0 <= args.max_bad_fraction <= 1.0:
            raise InputError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")
        if args.shard_size <= 0 or args.task_cpus <= 0 or args.context_length <= 2:
            raise InputError("--shard-size and --task-cpus must be > 0, --context-length > 2")
        if args.wordpiece < 0 or 0 < args.wordpiece < len(SPECIAL_TOKENS) + 100:
            raise InputError("--wordpiece: a vocabulary of at least a few hundred tokens (0 = none)")
        if args.images_as == "none" and args.source != "multi30k":
            raise InputError("--images-as none: only the multi30k source can be prepared without images")
        if getattr(args, "splits", None) is not None and not csv_list(args.splits):
            raise InputError("--splits: empty")
        languages = check_languages(csv_list(args.languages)) if args.languages else None
        tokenizer = None
        if args.tokenizer:
            folder = Path(args.tokenizer)
            if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
                raise InputError(f"--tokenizer: {folder} is not a tokenizer folder (no tokenizer.json or vocab.txt)")
            tokenizer = str(folder.resolve())
        out = prepare_out(args.out, args.force)
        parsed = parse_source(args, languages)
    except InputError as err:
        return fail(str(err))
    parse_s = time.perf_counter() - start

    from ccr_ray.data.converters import report as rep
    from ccr_ray.data.converters.shards import WriteSpec, plan_shards

    if args.force:
        out.delete()
    out.makedirs()
    spec = WriteSpec(out=out.uri, languages=tuple(parsed.languages()), image_storage=args.images_as,
                     context_length=args.context_length, tokenizer=tokenizer)
    rejects = list(parsed.rejects)
    pre = rep.bad_fraction(sum(r.n_captions for r in parsed.records), rejects)
    if not parsed.records or pre > args.max_bad_fraction:
        # fail before the (long) image stage: the rejects and report are written for inspection
        report = rep.build_report(parsed, args.source, spec, rejects, None, args.max_bad_fraction,
                                  {"parse": parse_s, "total": time.perf_counter() - start})
        report["status"] = "failed"
        rep.write_rejects(out, rejects)
        rep.write_report(out, report)
        print(rep.summary_text(report))
        if not parsed.records:
            return fail(f"no usable record in the input; see {out / schema.REJECTS_DIR} and "
                        f"{out / schema.PREPARE_REPORT}", EXIT_TOO_MANY_BAD)
        return fail(f"{pre:.2%} of the captions were rejected while parsing (max --max-bad-fraction "
                    f"{args.max_bad_fraction:.2%}); worst reasons: {rep.worst_reasons(rejects)}; see "
                    f"{out / schema.REJECTS_DIR}", EXIT_TOO_MANY_BAD)

    from ccr_ray import ray_utils

    # before Ray Data is imported: it sets up its console logging from the environment at import
    ray_utils.quiet_logs(resolve_home() / "logs" / "prepare_data-ray.log", verbose=args.verbose)
    from ccr_ray.data import ingest

    shards = plan_shards(parsed.records, list(spec.languages), args.shard_size)
    try:
        started = ray_utils.ensure_ray()
    except ray_utils.RayUnavailable as err:
        return fail(str(err))
    try:
        t0 = time.perf_counter()
        summary = ingest.run_shards(shards, spec, args.task_cpus)
        images_s = time.perf_counter() - t0
    finally:
        if started:
            import ray

            ray.shutdown()
    rejects += rep.image_rejects(summary)
    report = rep.build_report(parsed, args.source, spec, rejects, summary, args.max_bad_fraction,
                              {"parse": parse_s, "images": images_s, "total": time.perf_counter() - start})
    report["images_per_s"] = round(len(parsed.records) / max(images_s, 1e-9), 1)
    rep.write_rejects(out, rejects)
    rep.write_report(out, report)
    print(rep.summary_text(report))
    if report["status"] != "ok":
        return fail(f"{report['bad_fraction']:.2%} of the captions were rejected (max --max-bad-fraction "
                    f"{args.max_bad_fraction:.2%}); worst reasons: {rep.worst_reasons(rejects)}; see "
                    f"{out / schema.REJECTS_DIR}; no {schema.MANIFEST} written", EXIT_TOO_MANY_BAD)
    if not any(info["images"] for info in report["splits"].values()):
        return fail("every image was rejected; no dataset written", EXIT_TOO_MANY_BAD)
    tokenizer = None
    if args.wordpiece:
        try:
            tokenizer = train_data_tokenizer(out, report, args.wordpiece)
        except InputError as err:
            return fail(str(err))
        print(f"trained a {args.wordpiece}-token WordPiece tokenizer on the train split: {out / tokenizer}")
    rep.write_manifest(out, parsed, report, tokenizer=tokenizer)
    print(f"wrote {out} in {report['seconds']['total']:.1f}s ({report['images_per_s']} images/s in the image "
          f"stage); report: {out / schema.PREPARE_REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
