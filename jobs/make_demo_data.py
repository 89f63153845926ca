"""Write the embedded default dataset (procedural scenes, captions in en/de/fr/cs/zh/ja) and its tokenizer.

Usage:
    python jobs/make_demo_data.py [--out DIR] [--train N] [--val N] [--test N] [--image-size PX] [--seed S]
                                  [--extra-text DIR] [--workers N] [--force]

Defaults: --out {CCR_RAY_HOME or ~/ccr_ray}/data/demo, 20,000 / 1,000 / 1,000 images, 64 px, seed 0,
--extra-text ../shared/data (real caption text for the tokenizer, used when present).
"""

from __future__ import annotations

import argparse
import sys
import time

from ccr_ray.cli import SHARED_DATA, fail
from ccr_ray.config import resolve_home
from ccr_ray.data import schema


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--train", type=int, default=20_000)
    parser.add_argument("--val", type=int, default=1_000)
    parser.add_argument("--test", type=int, default=1_000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=2_500)
    parser.add_argument("--vocab", type=int, default=8_000)
    parser.add_argument("--extra-text", default=str(SHARED_DATA))
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rewrite even if a dataset is already there")
    args = parser.parse_args(argv)
    if min(args.train, args.val, args.test) <= 0 or args.image_size < 16:
        return fail("--train/--val/--test must be > 0 and --image-size >= 16")
    out = args.out or str(resolve_home() / "data" / "demo")
    if not args.force:
        try:
            manifest = schema.load_manifest(out)
            print(f"demo dataset already at {out} ({manifest.splits['train'].images} train images); --force rewrites")
            return 0
        except schema.DatasetError:
            pass
    from tqdm import tqdm

    from ccr_ray.data.synthetic import DemoDataConfig, write_demo_dataset

    cfg = DemoDataConfig(out=out, sizes={"train": args.train, "val": args.val, "test": args.test},
                         image_size=args.image_size, seed=args.seed, shard_size=args.shard_size,
                         tokenizer_vocab=args.vocab, extra_text=args.extra_text, workers=args.workers)
    start = time.perf_counter()
    with tqdm(total=args.train + args.val + args.test, unit="img", desc="rendering scenes") as bar:
        manifest = write_demo_dataset(cfg, progress=bar.update)
    extra = manifest.extra.get("tokenizer_extra_text")
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s: "
          + ", ".join(f"{s} {i.images}" for s, i in manifest.splits.items())
          + f"; tokenizer trained on {manifest.extra['tokenizer_texts']} captions"
          + (f" (incl. real text from {extra})" if extra else " (no real text folder found)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
