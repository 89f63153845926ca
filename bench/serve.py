"""Retrieval-service benchmark: the Ray Serve app over HTTP against the same searches in one process, request
batching on and off, and exact vs approximate image indexes on synthetic embeddings.

Usage:
    python bench/serve.py [--model DIR --index DIR] [--levels 1,8,32] [--requests 200] [--seconds 15] [--rounds 3]
                          [--index-sizes 10000,1000000] [--index-dim 256] [--index-queries 500]
                          [--index-data manifold,clustered]
                          [--skip-http] [--skip-index] [--work DIR] [--out bench/results/serve.json]

1. HTTP: a local Ray (2 CPUs), Serve's proxy on 127.0.0.1 and three applications side by side, one per
   batching mode, each one `Retrieval` replica (0.5 CPU, one onnxruntime and one faiss thread): batching on
   (max_batch_size 16, 5 ms wait), on without waiting (16, 0 s: a batch is whatever queued while the previous
   one ran) and off (max_batch_size 1). Closed-loop clients (aiohttp, in this process) send POST /search with
   captions in every model language, k=10, at each of --levels concurrent clients; the modes take turns
   (--rounds rounds, median reported) so load from elsewhere hits them alike: requests/s and p50/p95/p99
   latency. Each run stops after --requests requests or --seconds seconds, whichever first (after 20 warm-up
   requests).
   Beside it, the same searches through `RetrievalService` in this process (1 thread): one query per call,
   and 16 per call (what one full batch costs).
   The model: --model/--index, else the demo architecture (tiny-vit, M-BERT-width token table, MLA, five
   languages) with random weights, exported and indexed over 512 generated images (speed does not depend on
   the weights). Everything runs on this machine's cores, clients included: figures are a floor for a server.
2. Index: synthetic unit vectors (--index-dim) at each of --index-sizes, of two kinds: `manifold` (a 16-dim
   subspace plus noise: neighbour similarities fall off gradually, as in real embeddings; `index.manifold_vectors`)
   and `clustered` (a mixture of 1,000 directions with wide noise: at 1M, each query's top 10 are nearly tied
   among ~1,000 cluster mates, a hard case for graph search; `index.clustered_vectors`). For each: build time,
   recall@10 against exact search on
   --index-queries held-out queries of the same mixture (recall and search settings are chosen during the build
   on those queries), and search time per query at batch 1 and batch 32 (builds use every core),
   for exact, IVF-Flat (nprobe up to every list) and HNSW-Flat (search setting chosen by the build for
   recall >= 0.98; a refused build is recorded as such), one thread.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread, as a 1-CPU replica
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from _report import write_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP = "ccr-ray-bench"
K = 10
WARMUP = 20


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {}
    ms = np.asarray(latencies) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "mean_ms": round(float(ms.mean()), 2)}


# ------------------------------------------------------------------------------------------------ model


def bench_model(work: Path) -> tuple[str, str, str]:
    """The demo architecture with random weights, exported (fp32), its 512 generated images embedded and
    indexed exactly. Returns (model dir, index dir, data dir)."""
    import torch

    from ccr_ray.config import load_config_file
    from ccr_ray.data.synthetic import DemoDataConfig, write_demo_dataset
    from ccr_ray.export.onnx_export import export_checkpoint, resolve_plan
    from ccr_ray.inference.embeddings import embed_split_local
    from ccr_ray.inference.index import build_index, embeddings_source
    from ccr_ray.stages import resolve_config
    from ccr_ray.train.state import TrainState

    torch.set_num_threads(1)
    data = work / "data"
    write_demo_dataset(DemoDataConfig(out=str(data), sizes={"train": 64, "val": 64, "test": 512}, image_size=64,
                                      seed=1, shard_size=512, tokenizer_vocab=4000, workers=1))
    demo = load_config_file("demo")
    cfg = resolve_config("le", {"model": demo["model"], "data": {"pretrain": str(data), "downstream": str(data)},
                                "run": {"home": str(work / "home"), "experiment": "bench"}})
    ckpt = TrainState.create(cfg, str(data / "tokenizer"), None, "cpu").save(work / "checkpoint",
                                                                             with_optimizer=False)
    plan, model, meta = resolve_plan(str(ckpt), str(work / "onnx"), data=str(data))
    export_checkpoint(plan, model, meta)
    embed_split_local(str(work / "onnx"), str(data), work / "embeddings")
    source = embeddings_source(work / "embeddings")
    build_index(source.batches(), "exact", meta={"model": source.sidecar["model"]}).save(work / "index")
    return str(work / "onnx"), str(work / "index"), str(data)


def query_pool(model: str, data: str | None, n: int = 64) -> list[tuple[str, str]]:
    """Captions in every model language (the dataset's test captions when there is one, else fixed ones)."""
    from ccr_ray import runtime as rt

    languages = rt.load_manifest(model)["languages"]
    if data:
        from ccr_ray.data import schema

        table = schema.read_split_table(data, "test", languages, with_images=False)
        pool = [(caps[0], lang) for lang in languages if schema.captions_column(lang) in table.column_names
                for caps in table[schema.captions_column(lang)].to_pylist()[: max(1, n // len(languages))]]
        if pool:
            return pool
    return [(f"a red circle at the top left {i}", "en") for i in range(n)]


# ------------------------------------------------------------------------------------------------ HTTP


async def closed_loop(url: str, pool: list, clients: int, max_requests: int, max_seconds: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    issued = 0
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def one(i: int) -> None:
            nonlocal errors
            text, lang = pool[i % len(pool)]
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/search", json={"text": text, "lang": lang, "k": K}) as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

        for i in range(WARMUP):
            await one(i)
        latencies.clear()
        deadline = time.perf_counter() + max_seconds
        started = time.perf_counter()

        async def client() -> None:
            nonlocal issued
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                await one(issued)

        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {"clients": clients, "requests": len(latencies), "errors": errors, "seconds": round(elapsed, 2),
            "requests_per_s": round(len(latencies) / elapsed, 1), **percentiles(latencies)}


MODES = {"batching_on": {"max_batch_size": 16, "batch_wait_timeout_s": 0.005},
         "batching_on_no_wait": {"max_batch_size": 16, "batch_wait_timeout_s": 0.0},
         "batching_off": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}}


def http_bench(model: str, index: str, pool: list, levels: list[int], max_requests: int, max_seconds: float,
               rounds: int) -> dict:
    """One application per batching mode, resident side by side (one replica each, 0.5 CPU, one thread), and
    the modes measured round-robin at each level, so load from anything else on the machine hits them alike;
    per mode and level the median over rounds."""
    import ray
    from ray import serve

    from ccr_ray.serve.app import build_app

    temp = tempfile.mkdtemp(prefix="ccrbench-", dir="/tmp")
    ray.init(address="local", num_cpus=2, _temp_dir=temp, log_to_driver=False, include_dashboard=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    out = {mode: {"user_config": batch, "levels": {}} for mode, batch in MODES.items()}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for mode, batch in MODES.items():
            serve.run(build_app({"model": model, "index": index, "num_replicas": 1, "num_cpus": 0.5, "threads": 1,
                                 "max_ongoing_requests": 64, "user_config": batch}),
                      name=f"{APP}-{mode}", route_prefix=f"/{mode}")
        for clients in levels:
            runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
            for _ in range(rounds):
                for mode in MODES:
                    runs[mode].append(asyncio.run(closed_loop(f"{url}/{mode}", pool, clients,
                                                              max_requests, max_seconds)))
            for mode, results in runs.items():
                summary = {key: statistics.median(r[key] for r in results)
                           for key in ("requests_per_s", "p50_ms", "p95_ms", "p99_ms") if all(key in r for r in results)}
                summary.update(clients=clients, rounds=results, errors=sum(r["errors"] for r in results))
                out[mode]["levels"][str(clients)] = summary
                print(f"[http {mode}] {clients:3d} clients: {summary['requests_per_s']:7.1f} req/s, "
                      f"p50 {summary.get('p50_ms')} ms, p95 {summary.get('p95_ms')} ms, p99 {summary.get('p99_ms')} "
                      f"ms (median of {rounds}), {summary['errors']} errors", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    return out


def in_process_bench(model: str, index: str, pool: list, max_requests: int, max_seconds: float) -> dict:
    from ccr_ray.serve.service import RetrievalService

    service = RetrievalService(model, index, threads=1)
    out = {}
    for name, per_call in (("one_query_per_call", 1), ("16_queries_per_call", 16)):
        for i in range(3):
            service.search_texts([(*pool[i % len(pool)], K)] * per_call)
        latencies, queries = [], 0
        started = time.perf_counter()
        deadline = started + max_seconds
        i = 0
        while queries < max_requests and time.perf_counter() < deadline:
            items = [(*pool[(i + j) % len(pool)], K) for j in range(per_call)]
            start = time.perf_counter()
            service.search_texts(items)
            latencies.append(time.perf_counter() - start)
            queries += per_call
            i += per_call
        elapsed = time.perf_counter() - started
        out[name] = {"queries": queries, "seconds": round(elapsed, 2), "queries_per_s": round(queries / elapsed, 1),
                     **{f"call_{k}": v for k, v in percentiles(latencies).items()}}
        print(f"[in-process] {name}: {out[name]['queries_per_s']} queries/s, call p50 "
              f"{out[name].get('call_p50_ms')} ms", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ index


def time_search(index, queries: np.ndarray, batch: int, max_seconds: float = 20.0) -> float:
    """ms per query, searching `batch` queries per call over all of them (bounded in time)."""
    index.search(queries[:batch], K)
    done, started = 0, time.perf_counter()
    for start in range(0, len(queries), batch):
        index.search(queries[start:start + batch], K)
        done += len(queries[start:start + batch])
        if time.perf_counter() - started > max_seconds:
            break
    return 1000 * (time.perf_counter() - started) / done


def batches_of(ids: list[str], matrix: np.ndarray, step: int = 50_000):
    for start in range(0, len(ids), step):
        yield ids[start:start + step], matrix[start:start + step]


def index_bench(sizes: list[int], dim: int, n_queries: int, data: str) -> dict:
    from ccr_ray.inference import index as ix

    ix.Index.set_threads(1)
    out = {}
    for n in sizes:
        started = time.perf_counter()
        if data == "manifold":
            x = ix.manifold_vectors(n + n_queries, dim, intrinsic=16, noise=0.1, seed=n)
        else:
            x = ix.clustered_vectors(n + n_queries, dim, clusters=1000, spread=1.0, seed=n)
        db, queries = x[:n], x[n:]
        del x
        ids = [str(i) for i in range(n)]
        generate_s = time.perf_counter() - started
        truth = ix.exact_search(db, queries, K)[1]
        row = {"data": data, "dim": dim, "queries": n_queries, "generate_s": round(generate_s, 1)}

        for kind in ("exact", "ivf", "hnsw"):
            started = time.perf_counter()
            options = {"queries": queries} if kind != "exact" else {}
            if kind == "ivf":
                options["max_nprobe"] = ix.default_nlist(n)  # show what it takes, up to every list
            if kind == "hnsw" and n > 200_000:
                options.update(hnsw_m=16, ef_construction=40)  # a 1M build in minutes on 2 cores
            ix.Index.set_threads(os.cpu_count() or 1)  # builds use every core; searches are timed on one
            try:
                built = ix.build_index(batches_of(ids, db), kind, count=n, **options)
            except ix.RecallError as err:
                row[kind] = {"refused": str(err), "build_s": round(time.perf_counter() - started, 1)}
                print(f"[index {data} {n:,} x {dim}] {kind}: refused: {err}", flush=True)
                continue
            build_s = time.perf_counter() - started
            ix.Index.set_threads(1)
            found = built.search(queries, K)[1]
            entry = {"build_s": round(build_s, 1), "params": built.params,
                     "recall_at_10": round(ix.recall_at_k(found, truth), 4),
                     "ms_per_query_batch1": round(time_search(built, queries, 1), 3),
                     "ms_per_query_batch32": round(time_search(built, queries, 32), 3)}
            if kind == "hnsw":
                entry["m"], entry["ef_construction"] = options.get("hnsw_m", 32), options.get("ef_construction", 80)
            if kind == "ivf":
                entry["nlist"] = built.meta["build"]["nlist"]
            row[kind] = entry
            print(f"[index {data} {n:,} x {dim}] {kind}: build {entry['build_s']} s, recall@10 {entry['recall_at_10']}, "
                  f"{entry['ms_per_query_batch1']} ms/query (batch 1), {entry['ms_per_query_batch32']} ms/query "
                  f"(batch 32) {built.params}", flush=True)
            del built
        out[str(n)] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--index")
    parser.add_argument("--data", help="dataset whose test captions are the queries (default: the bench model's)")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--index-sizes", default="10000,1000000")
    parser.add_argument("--index-dim", type=int, default=256)
    parser.add_argument("--index-queries", type=int, default=500)
    parser.add_argument("--index-data", default="manifold,clustered")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-index", action="store_true")
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "serve.json"))
    args = parser.parse_args(argv)
    if bool(args.model) != bool(args.index):
        print("error: give --model and --index together", file=sys.stderr)
        return 2
    from ccr_ray.cli import quiet_ray_env

    quiet_ray_env()
    report: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "load_average_start": list(os.getloadavg())},
                    "settings": {"k": K, "levels": args.levels, "max_requests": args.requests,
                                 "max_seconds": args.seconds, "threads": 1}}
    work = Path(args.work or tempfile.mkdtemp(prefix="ccr-serve-bench-"))
    try:
        if not args.skip_http:
            model, index, data = (args.model, args.index, args.data) if args.model else bench_model(work)
            from ccr_ray import runtime as rt
            from ccr_ray.inference.index import Index

            manifest = rt.load_manifest(model)
            loaded = Index.load(index)
            report["model"] = {"dir": model, "languages": manifest["languages"], "embed_dim": manifest["embed_dim"],
                               "backbone": manifest["model"].get("backbone"), "random_weights": not args.model,
                               "index": {"kind": loaded.kind, "images": len(loaded)}}
            pool = query_pool(model, data)
            levels = [int(v) for v in args.levels.split(",")]
            report["in_process"] = in_process_bench(model, index, pool, args.requests, args.seconds)
            report["http"] = http_bench(model, index, pool, levels, args.requests, args.seconds, args.rounds)
        if not args.skip_index:
            sizes = [int(v) for v in args.index_sizes.split(",")]
            report["index"] = {data: index_bench(sizes, args.index_dim, args.index_queries, data)
                               for data in args.index_data.split(",")}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    write_report(report, args.out)
    print(json.dumps({k: report[k] for k in ("http", "in_process") if k in report}, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
