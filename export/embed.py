"""Embed every image and caption of a dataset split with an exported model, on a Ray Data actor pool.

Usage:
    python export/embed.py --model DIR --data SHARDS --out OUT [--split test] [--langs en,de,...] [--int8]
                           [--concurrency 2] [--cpus-per-actor 0.5] [--batch-size 64] [--no-progress]

    --model          an export folder (export/to_onnx.py)
    --data           a dataset folder in the ccr-ray layout (dataset.json + <split>/part-*.parquet)
    --out            output folder: Parquet rows (id, kind, lang, caption_index, text, fold, embedding) and
                     embeddings.json (model fingerprint, data, split, counts); replaced atomically
    --langs          caption languages (default: every model language the data has)
    --int8           use the quantised text graphs (export with --int8)
    --concurrency    actors; each loads the ONNX sessions once and runs onnxruntime with
                     max(1, cpus-per-actor) threads

The job connects to the cluster in RAY_ADDRESS (ray job submit sets it), else to a live `ray start` cluster on this
machine, else starts a local Ray (README, "Which Ray a job runs on").
Evaluate the output with export/evaluate_embeddings.py, query it with export/search.py.
"""

from __future__ import annotations

import argparse
import json
import sys

from ccr_ray.cli import fail, quiet_ray_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--langs", default=None)
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    quiet_ray_env()

    from ccr_ray.inference.embeddings import EmbedError, embed_dataset

    try:
        summary = embed_dataset(args.model, args.data, args.out, split=args.split,
                                languages=args.langs.split(",") if args.langs else None,
                                precision="int8" if args.int8 else "fp32", concurrency=args.concurrency,
                                cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
                                progress=not args.no_progress)
    except EmbedError as err:
        return fail(str(err))
    captions = sum(summary["captions"].values())
    print(f"wrote {args.out}: {summary['images']} images, {captions} captions "
          f"({json.dumps(summary['captions'])}) in {summary['seconds']:.1f}s with {summary['actors']} actors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
