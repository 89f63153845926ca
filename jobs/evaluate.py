"""Evaluate a checkpoint on a retrieval split: per-language text->image / image->text R@1/5/10 and mR
(spec section 5: group-max image->text, mR = mean of six, k-fold averaging where the split has folds).

Usage:
    python jobs/evaluate.py CKPT [--data DIR] [--split test] [--langs en,de,...] [--baseline]
                                 [--out results.json] [--batch-size 256] [--device cpu|cuda]

    CKPT        a checkpoint folder (e.g. ~/ccr_ray/runs/demo/le/checkpoint)
    --data      dataset folder (default: the dataset the checkpoint's config names for its stage)
    --baseline  encode non-English captions with the English CLIP through its own BPE tokenizer
                (the English-only baseline) instead of the adapters
No Ray: this runs anywhere the checkpoint and the data are.
"""

from __future__ import annotations

import argparse
import sys
import time

from ccr_ray.cli import fail, print_retrieval_report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default=None)
    parser.add_argument("--split", default=None)
    parser.add_argument("--langs", default=None)
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-images", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from ccr_ray.eval.evaluate import EvalError, evaluate_checkpoint
    from ccr_ray.eval.retrieval import CLIP_BPE

    start = time.perf_counter()
    try:
        report = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split,
                                     languages=args.langs.split(",") if args.langs else None,
                                     mode=CLIP_BPE if args.baseline else "adapted", device=args.device,
                                     batch_size=args.batch_size, max_images=args.max_images)
    except EvalError as err:
        return fail(str(err))
    title = f"{report['checkpoint']} on {report['data']} [{report['split']}]" + (" (baseline)" if args.baseline else "")
    print_retrieval_report(report, title, time.perf_counter() - start, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
