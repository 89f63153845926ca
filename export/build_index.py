"""Build an image index from an embeddings folder (export/embed.py output), for export/search.py and the service.

Usage:
    python export/build_index.py EMBEDDINGS --out INDEX [--kind exact|ivf|hnsw] [--min-recall 0.98]
                                 [--nlist N] [--nprobe N] [--max-nprobe N] [--hnsw-m 32] [--ef-construction 80]
                                 [--ef-search N] [--queries 1000] [--engine auto|local|ray] [--threads N]
    python export/build_index.py --model DIR --data DATASET [--split test] --out INDEX [...]

    EMBEDDINGS      an embeddings folder (export/embed.py)
    --model/--data  embed the dataset split first, as export/embed.py does (Ray Data; the cluster in RAY_ADDRESS,
                    else a local Ray), into --embeddings-out (default: INDEX-embeddings), then index it

    --kind          exact: the image matrix, searched by one matrix product (small sets, up to ~1M);
                    ivf: faiss IVF-Flat (k-means lists; --nlist, default ~sqrt(images));
                    hnsw: faiss HNSW-Flat (graph; --hnsw-m, --ef-construction)
    --min-recall    approximate kinds: recall@10 against exact search, measured on build with --queries caption
                    embeddings (or sampled images when the folder has no captions); the cheapest --nprobe /
                    --ef-search reaching it is kept, and the build fails (exit 3, nothing written) when
                    none does. Give --nprobe / --ef-search to test one setting only.
    --engine        local: read the Parquet files in this process; ray: read and filter them on Ray Data (the
                    cluster in RAY_ADDRESS, else a local Ray) and stream the image rows here once;
                    auto (default): ray above 200,000 images
INDEX gets index.json (kind, image count, model fingerprint, search setting, recall@10 and what was tried,
build time), ids.parquet (image ids in index order) and vectors.f32 or index.faiss; it is written beside INDEX
and swapped in at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ccr_ray.cli import fail, quiet_ray_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("embeddings", nargs="?")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--embeddings-out")
    parser.add_argument("--kind", default="exact", choices=("exact", "ivf", "hnsw"))
    parser.add_argument("--min-recall", type=float, default=None)
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--nprobe", type=int, default=None)
    parser.add_argument("--max-nprobe", type=int, default=None)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=int, default=None)
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--engine", default="auto", choices=("auto", "local", "ray"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from ccr_ray.inference import index as ix
    from ccr_ray.inference.embeddings import EmbedError

    for name in ("nlist", "nprobe", "max_nprobe", "ef_search", "queries", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return fail(f"--{name.replace('_', '-')} must be >= 1")
    if args.hnsw_m < 2 or args.ef_construction < 1:
        return fail("--hnsw-m must be >= 2 and --ef-construction >= 1")
    min_recall = ix.DEFAULT_MIN_RECALL if args.min_recall is None else args.min_recall
    if not 0 < min_recall <= 1:
        return fail(f"--min-recall: {min_recall} is not in (0, 1]")
    if bool(args.embeddings) == bool(args.model or args.data) or bool(args.model) != bool(args.data):
        return fail("give EMBEDDINGS, or --model and --data (to embed a dataset split first)")
    try:
        ix.Index.check_out_folder(args.out)  # before embedding and building, which can take hours
    except ix.SearchIndexError as err:
        return fail(str(err))
    if args.model:
        from ccr_ray.inference.embeddings import embed_dataset

        quiet_ray_env()
        args.embeddings = args.embeddings_out or f"{args.out.rstrip('/')}-embeddings"
        try:
            summary = embed_dataset(args.model, args.data, args.embeddings, split=args.split, progress=False)
        except EmbedError as err:
            return fail(str(err))
        print(f"embedded {summary['images']:,} images and {sum(summary['captions'].values()):,} captions into "
              f"{args.embeddings}")
    try:
        source = ix.embeddings_source(args.embeddings)
    except EmbedError as err:
        return fail(str(err))
    if source.count == 0:
        return fail(f"{args.embeddings}: no image embeddings to index")
    engine = args.engine if args.engine != "auto" else ("ray" if source.count > ix.LARGE else "local")
    if args.threads:
        ix.Index.set_threads(args.threads)
    if engine == "ray":
        quiet_ray_env()
    started = time.perf_counter()
    n_queries = args.queries or ix.DEFAULT_QUERIES
    queries = source.caption_queries(n_queries, args.seed) if args.kind != "exact" else None
    meta = {"model": source.sidecar.get("model", {}), "source": {
        "embeddings": str(source.path.resolve()), "data": source.sidecar.get("data"),
        "split": source.sidecar.get("split"), "precision": source.sidecar.get("precision")}}
    batches = source.ray_batches() if engine == "ray" else source.batches()
    print(f"indexing {source.count:,} images from {args.embeddings} ({args.kind}, engine {engine})")
    try:
        index = ix.build_index(batches, args.kind, count=source.count, meta=meta, nlist=args.nlist,
                               nprobe=args.nprobe, max_nprobe=args.max_nprobe, hnsw_m=args.hnsw_m,
                               ef_construction=args.ef_construction, ef_search=args.ef_search,
                               min_recall=min_recall, queries=queries, n_queries=n_queries, seed=args.seed,
                               log=print)
    except ix.RecallError as err:
        print(f"error: refused: {err}", file=sys.stderr)
        return 3
    except (ix.SearchIndexError, EmbedError) as err:
        return fail(str(err))
    index.meta["build"]["engine"] = engine
    index.meta["build"]["seconds_total"] = round(time.perf_counter() - started, 2)
    try:
        index.save(args.out)
    except ix.SearchIndexError as err:
        return fail(str(err))
    recall = index.meta["recall"]
    print(f"wrote {args.out}: {len(index):,} images, {args.kind} {json.dumps(index.params)}, recall@10 "
          f"{recall['recall_at_10']:.4f}" + (f" on {recall['queries']} {recall['query_source']}"
                                             if "queries" in recall else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
