"""Serve an exported model and an image index over HTTP: search by caption in any language the model knows.

Usage:
    python export/serve.py --model DIR --index DIR [--images DATASET] [--host 127.0.0.1] [--port 8000]
                           [--int8] [--replicas N] [--num-cpus 0.5] [--max-batch-size 16] [--batch-wait-ms 5]
                           [--name ccr-ray] [--route-prefix /]

    --model       an export folder (export/to_onnx.py)
    --index       an index folder (export/build_index.py), or an embeddings folder (export/embed.py), made
                  with the same model (checked by fingerprint before anything starts)
    --images      a dataset folder holding the indexed images: results then link to /images/{id} and the search
                  page shows thumbnails
    --host        the address HTTP binds (default loopback; 0.0.0.0 exposes the service to the network)
    --replicas    replicas of the Retrieval deployment, each --num-cpus CPUs (onnxruntime and faiss threads)
    --max-batch-size / --batch-wait-ms   request batching per replica (--max-batch-size 1: no batching)

Starts Ray Serve on the cluster in RAY_ADDRESS, else on a new local Ray, prints the URL and serves until
interrupted (Ctrl-C); then it deletes its application (and stops the local Ray it started). API: /docs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ccr_ray.cli import fail, quiet_ray_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--images", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--num-cpus", type=float, default=0.5)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--name", default="ccr-ray")
    parser.add_argument("--route-prefix", default="/")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        return fail(f"--port: {args.port} is not a TCP port")
    if args.replicas < 1 or args.num_cpus <= 0 or args.max_batch_size < 1 or args.batch_wait_ms < 0:
        return fail("--replicas and --max-batch-size must be >= 1, --num-cpus > 0, --batch-wait-ms >= 0")
    if not args.route_prefix.startswith("/"):
        return fail(f"--route-prefix: {args.route_prefix!r} must start with /")

    from ccr_ray import runtime as rt
    from ccr_ray.data import schema
    from ccr_ray.inference.index import SearchIndexError, check_pair, read_index_meta

    # Fail here, in a second, rather than in every replica after the cluster started.
    try:
        manifest = rt.load_manifest(args.model)
        check_pair(manifest, read_index_meta(args.index))
        if args.int8 and not any(r.endswith(rt.INT8_SUFFIX) for r in manifest["graphs"]):
            return fail(f"--int8: {args.model} has no int8 graphs (export with --int8)")
        if args.images:
            schema.load_manifest(args.images)
    except (rt.ModelFolderError, SearchIndexError, schema.DatasetError) as err:
        return fail(str(err))

    quiet_ray_env()
    import ray
    from ray import serve

    from ccr_ray.serve.app import build_app

    started_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=False)
    app = build_app({"model": args.model, "index": args.index, "images": args.images,
                     "precision": "int8" if args.int8 else "fp32", "num_replicas": args.replicas,
                     "num_cpus": args.num_cpus, "user_config": {
                         "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_ms / 1000}})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=args.name, route_prefix=args.route_prefix)
        prefix = args.route_prefix.rstrip("/")
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        print(f"serving {args.name} on http://{shown}:{args.port}{prefix}/  (API: http://{shown}:{args.port}"
              f"{prefix}/docs){'  bound to ' + args.host if shown != args.host else ''}", flush=True)
        stop.wait()
    except Exception as err:  # noqa: BLE001 - a replica that cannot start raises from serve.run
        print(f"error: the service did not start: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    finally:
        try:
            if started_ray:  # the whole local Ray is ours
                serve.shutdown()
                ray.shutdown()
            else:  # a shared cluster: take only our application away
                serve.delete(args.name)
        except Exception as err:  # noqa: BLE001 - shutting down anyway
            print(f"warning: shutdown: {type(err).__name__}: {err}", file=sys.stderr)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
