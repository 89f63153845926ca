"""Export a checkpoint to ONNX for torch-free serving, and check every graph against PyTorch.

Usage:
    python export/to_onnx.py CKPT [--out DIR] [--langs de,fr,...] [--int8] [--opset 18]
                                  [--data DIR] [--split test] [--threshold 0.9999] [--graphs image,text_en,text]

    CKPT         a checkpoint folder (e.g. ~/ccr_ray/runs/demo/le/checkpoint)
    --out        export folder (default: onnx/ beside the checkpoint folder); replaced atomically
    --langs      target languages in the multilingual graph (default: all of the checkpoint's); en is always
                 exported (plain CLIP text graph)
    --int8       also write dynamically quantised text graphs and report their cosine and retrieval agreement
    --opset      ONNX opset (>= 18, the dynamo exporter's)
    --data       dataset whose test images/captions feed the parity check (default: the checkpoint's own, when
                 present; otherwise rendered demo scenes and captions)
    --graphs     which graphs to write (default all three; e.g. text_en,text for a text-only service)

Writes image_encoder.onnx, text_en_encoder.onnx, text_encoder.onnx (one graph for every language, selected by
its lang_index input), tokenizer_en/, tokenizer/, preprocess.json and manifest.json. Exits 1 when a fp32 graph's
cosine to PyTorch is below the threshold, 2 on bad input. Read the folder with `ccr_ray.runtime.Encoder`.
"""

from __future__ import annotations

import argparse
import sys
import time

from ccr_ray.cli import fail, quiet_ray_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--out", default=None)
    parser.add_argument("--langs", default=None)
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--data", default=None)
    parser.add_argument("--split", default=None)
    parser.add_argument("--threshold", type=float, default=0.9999)
    parser.add_argument("--graphs", default="image,text_en,text")
    args = parser.parse_args(argv)
    if not 0 < args.threshold <= 1:
        return fail(f"--threshold: {args.threshold} must be a cosine in (0, 1]")
    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()] if args.langs is not None else None
    if args.langs is not None and not langs:
        return fail(f"--langs: {args.langs!r} names no language")
    quiet_ray_env()

    from ccr_ray.export.onnx_export import (
        ExportError,
        ParityError,
        export_checkpoint,
        format_report,
        resolve_plan,
    )

    started = time.perf_counter()
    try:
        plan, model, meta = resolve_plan(args.checkpoint, args.out, langs,
                                         int8=args.int8, opset=args.opset, data=args.data, split=args.split,
                                         graphs=tuple(g for g in args.graphs.split(",") if g))
    except ExportError as err:
        return fail(str(err))
    plan.threshold = args.threshold
    print(f"exporting {args.checkpoint} ({meta.experiment.model.adapter}; graphs {', '.join(plan.graphs)}; "
          f"target languages {', '.join(plan.languages) or 'none'}) to {plan.out}")
    try:
        manifest = export_checkpoint(plan, model, meta)
    except ParityError as err:
        return fail(str(err), code=1)
    print(format_report(manifest, plan.out))
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
