"""Retrieval metrics from stored embeddings (export/embed.py output): per-language text->image / image->text
R@1/5/10 and mR, scored by the same code as jobs/evaluate.py (group-max image->text, k-fold averaging).

Usage:
    python export/evaluate_embeddings.py EMBEDDINGS [--langs en,de,...] [--out results.json]

    EMBEDDINGS   a folder written by export/embed.py
The figures equal `jobs/evaluate.py CKPT --data D --split S` for the checkpoint the embeddings' model was
exported from, up to the ONNX/PyTorch rounding of the embeddings.
"""

from __future__ import annotations

import argparse
import sys
import time

from ccr_ray.cli import fail, print_retrieval_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("embeddings")
    parser.add_argument("--langs", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from ccr_ray.inference.embeddings import EmbedError
    from ccr_ray.inference.evaluate import evaluate_embeddings

    start = time.perf_counter()
    try:
        report = evaluate_embeddings(args.embeddings, args.langs.split(",") if args.langs else None)
    except EmbedError as err:
        return fail(str(err))
    title = f"{args.embeddings} ({report['data']} [{report['split']}], {report['precision']})"
    print_retrieval_report(report, title, time.perf_counter() - start, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
