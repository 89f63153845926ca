"""Serve an exported model and an image index over HTTP: search by caption in any language the model knows.

Usage:
    python export/serve.py --model DIR --index DIR [--images DATASET] [--host 127.0.0.1] [--port 8000]
                           [--int8] [--replicas N] [--num-cpus 0.5] [--max-batch-size 16] [--batch-wait-ms 5]
                           [--name ccr-ray] [--route-prefix /] [--start-timeout 600] [--access-log]

    --model       an export folder (export/to_onnx.py)
    --index       an index folder (export/build_index.py), or an embeddings folder (export/embed.py), made
                  with the same model (checked by fingerprint before anything starts)
    --images      a dataset folder holding the indexed images: results then link to /images/{id} and the search
                  page shows thumbnails
    --host        the address HTTP binds (default loopback; 0.0.0.0 exposes the service to the network)
    --replicas    replicas of the Retrieval deployment, each --num-cpus CPUs (onnxruntime and faiss threads)
    --max-batch-size / --batch-wait-ms   request batching per replica (--max-batch-size 1: no batching)
    --start-timeout  seconds to wait for the service to answer before giving up (default 600)
    --access-log  Serve's per-request log line in the replicas' log files (off by default: it costs CPU)

Starts Ray Serve on the cluster in RAY_ADDRESS, else a live `ray start` cluster on this machine, else a new local
Ray (README, "Which Ray a job runs on"; a local Ray gets HAProxy as its ingress, in front of replicas that serve
HTTP themselves: ccr_ray/serve/ray_env.py, RAY_SERVE_ENABLE_HA_PROXY=0 for Serve's Python proxy), waits until the
service answers (--start-timeout, default 600 s: a busy machine starts slowly), prints the URL and serves until
Ctrl-C or SIGTERM; then it deletes its application from a shared cluster, or stops the local Ray it started (in
seconds, every Ray process with it). API: /docs.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

from ccr_ray.cli import fail, quiet_ray_env
from ccr_ray.serve.ray_env import apply_serve_env, local_ingress_env


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
    parser.add_argument("--access-log", action="store_true",
                        help="Serve's per-request log line in the replicas' log files (off by default: CPU per request)")
    parser.add_argument("--start-timeout", type=float, default=600.0,
                        help="seconds start-up may take before the job gives up (a busy machine needs more)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        return fail(f"--port: {args.port} is not a TCP port")
    if args.replicas < 1 or args.num_cpus <= 0 or args.max_batch_size < 1 or args.batch_wait_ms < 0:
        return fail("--replicas and --max-batch-size must be >= 1, --num-cpus > 0, --batch-wait-ms >= 0")
    if args.start_timeout <= 0:
        return fail(f"--start-timeout: {args.start_timeout} must be > 0")
    if args.route_prefix != "/":
        args.route_prefix = args.route_prefix.rstrip("/")  # /api/ means /api (Serve refuses the trailing /)
    if not args.route_prefix.startswith("/") or any(c in args.route_prefix for c in "{} \t\n?#"):
        return fail(f"--route-prefix: {args.route_prefix!r} must start with / and hold no spaces, braces, ? or #")
    if not args.name.strip():
        return fail("--name: empty")

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

    apply_serve_env()  # before Ray starts: its processes inherit them
    quiet_ray_env()
    from ccr_ray.ray_utils import RayUnavailable, cluster_address, ensure_ray, owns_local_ray

    try:
        address = cluster_address()
    except RayUnavailable as err:
        return fail(str(err))
    if address == "local":  # a new Ray on this machine: what it cannot do fails now, not in a retry loop
        problem = cannot_listen(args.host, args.port)
        if problem:
            return fail(f"--host/--port: cannot listen on {args.host}:{args.port} ({problem})")
        from ray._private.utils import get_num_cpus

        cpus = get_num_cpus()  # what the local Ray will have; Serve would wait for ever for more
        if args.replicas * args.num_cpus > cpus:
            return fail(f"--replicas {args.replicas} x --num-cpus {args.num_cpus} need "
                        f"{args.replicas * args.num_cpus:g} CPUs; a local Ray here has {cpus:g}")
        # HAProxy's side listeners on free ports and on the service's address (ccr_ray/serve/ray_env.py)
        scratch = tempfile.mkdtemp(prefix="ccr-serve-")
        atexit.register(shutil.rmtree, scratch, True)
        local_ingress_env(scratch)
    import ray
    from ray import serve

    from ccr_ray.serve.app import build_app

    try:
        ensure_ray(log_to_driver=False, address=address)
    except RayUnavailable as err:
        return fail(str(err))
    except KeyboardInterrupt:
        return 130
    owned = owns_local_ray()  # a local Ray this process started (else an attached cluster, shared)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
        signal.signal(sig, lambda *_: stop.set())
    try:
        app = build_app({"model": args.model, "index": args.index, "images": args.images,
                         "precision": "int8" if args.int8 else "fp32", "num_replicas": args.replicas,
                         "num_cpus": args.num_cpus, "access_log": args.access_log, "user_config": {
                             "max_batch_size": args.max_batch_size,
                             "batch_wait_timeout_s": args.batch_wait_ms / 1000}})
        started = time.monotonic()
        deadline = started + args.start_timeout
        start_serve(serve, args.host, args.port, deadline, stop)
        serve.run(app, name=args.name, route_prefix=args.route_prefix)
        prefix = args.route_prefix.rstrip("/")
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        if not wait_until_serving(f"http://{shown}:{args.port}{prefix}/healthz", deadline, stop):
            if not stop.is_set():
                print(f"error: the service did not start: no answer on http://{shown}:{args.port}{prefix}/healthz "
                      f"within --start-timeout {args.start_timeout:g} s", file=sys.stderr)
                return 1
        else:
            print(f"serving {args.name} on http://{shown}:{args.port}{prefix}/  (API: http://{shown}:{args.port}"
                  f"{prefix}/docs){'  bound to ' + args.host if shown != args.host else ''}"
                  f"  [started in {time.monotonic() - started:.0f} s]", flush=True)
        stop.wait()
    except Exception as err:  # noqa: BLE001 - a replica that cannot start raises from serve.run
        print(f"error: the service did not start: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    finally:
        try:
            if owned:
                # The whole local Ray is ours: stopping it stops Serve, its proxy and replicas with it, in seconds.
                # serve.shutdown() first would ask Serve's controller to take every application and proxy down
                # and wait for that up to 30 s ("Controller failed to shut down within 30.0s").
                ray.shutdown()
            else:  # a shared cluster: take only our application away
                serve.delete(args.name)
        except Exception as err:  # noqa: BLE001 - shutting down anyway
            print(f"warning: shutdown: {type(err).__name__}: {err}", file=sys.stderr)
    print("stopped", flush=True)
    return 0


def cannot_listen(host: str, port: int) -> str | None:
    """Why an HTTP server could not listen on host:port here (taken, not an address of this machine), or None.
    SO_REUSEADDR as uvicorn sets it: a port in TIME_WAIT is free, one another server listens on is not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        return err.strerror or str(err)
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as err:
        return err.strerror or str(err)
    return None


def start_serve(serve, host: str, port: int, deadline: float, stop: threading.Event) -> None:
    """serve.start, waiting out a proxy that is slow to start (a busy machine): Serve's controller keeps
    replacing a proxy that failed its readiness checks, and serve.start's own wait (60 s, or the proxy's death)
    is retried until the deadline. The readiness timeouts themselves come from ccr_ray.serve.ray_env."""
    import ray

    while True:
        try:
            serve.start(http_options={"host": host, "port": port})
            return
        except (TimeoutError, ray.exceptions.RayActorError) as err:
            if time.monotonic() > deadline or stop.is_set():
                raise
            print(f"warning: Serve's HTTP proxy is not up yet ({type(err).__name__}); waiting", file=sys.stderr,
                  flush=True)


def wait_until_serving(url: str, deadline: float, stop: threading.Event) -> bool:
    """Poll the service's /healthz until it answers 200 (True), the deadline passes or a stop is asked (False)."""
    import urllib.request

    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        stop.wait(0.5)
    return False


if __name__ == "__main__":
    sys.exit(main())
