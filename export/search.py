"""Search images by text in any language the model knows: the query goes through the torch-free runtime,
images are ranked by cosine against an image index (export/build_index.py) or stored embeddings (export/embed.py).

Usage:
    python export/search.py --model DIR (--index DIR | --embeddings OUT) --lang de [--k 5] [--int8] [--json]
                            QUERY [QUERY ...]

    --model        an export folder (export/to_onnx.py)
    --index        an index folder (exact, ivf or hnsw) built from embeddings of the same model
    --embeddings   an embeddings folder made with the same model, searched exactly
                   (either is checked by model fingerprint)
    --lang         the queries' language (en, or one of the model's target languages)
Prints, for each query, the top-k image ids with their cosine scores (--json: one JSON object per query).
"""

from __future__ import annotations

import argparse
import json
import sys

from ccr_ray.cli import fail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("queries", nargs="+", metavar="QUERY")
    parser.add_argument("--model", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--index")
    source.add_argument("--embeddings")
    parser.add_argument("--lang", required=True)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.k < 1:
        return fail("--k must be >= 1")
    blank = [n for n, query in enumerate(args.queries, 1) if not query.strip()]
    if blank:  # before anything loads; the model's tokenizer has the last word below
        return fail(f"QUERY {blank[0]}: empty or whitespace-only query")

    from ccr_ray.inference.embeddings import EmbedError
    from ccr_ray.inference.index import SearchIndexError
    from ccr_ray.inference.search import ImageIndex, search
    from ccr_ray.runtime import Encoder, ModelFolderError

    try:
        encoder = Encoder(args.model, precision="int8" if args.int8 else "fp32")
        if args.lang not in encoder.languages:
            return fail(f"--lang: the model has no {args.lang!r} (it has {', '.join(encoder.languages)})")
        for n, query in enumerate(args.queries, 1):
            # a caption with nothing to read encodes to a meaningless vector: refuse it rather than answer it
            problem = encoder.caption_problem(query, args.lang)
            if problem:
                return fail(f"QUERY {n}: {problem}")
        index = ImageIndex.load(args.index or args.embeddings)
        results = search(encoder, index, list(args.queries), args.lang, args.k)
    except (EmbedError, ModelFolderError, SearchIndexError) as err:
        return fail(str(err))
    for query, hits in zip(args.queries, results):
        if args.json:
            print(json.dumps({"query": query, "lang": args.lang,
                              "hits": [{"id": i, "score": round(s, 6)} for i, s in hits]}, ensure_ascii=False))
            continue
        print(f"[{args.lang}] {query}")
        for rank, (image_id, score) in enumerate(hits, 1):
            print(f"  {rank:2d}. {image_id}  {score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
