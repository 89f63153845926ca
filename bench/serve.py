"""Retrieval-service benchmark: the Ray Serve app over HTTP against a plain uvicorn app serving the same searches
(the anchor), in one run; the same searches in one process; exact vs approximate image indexes on synthetic
embeddings.

Usage:
    python bench/serve.py [--model DIR --index DIR [--data DATASET]] [--levels 1,8,32] [--seconds 10] [--rounds 1]
                          [--before CHECKOUT] [--variants JSON] [--index-sizes 10000,1000000] [--index-dim 256]
                          [--index-queries 500] [--index-data manifold,clustered] [--skip-http] [--skip-index]
                          [--work DIR] [--out bench/results/serve.json]

1. HTTP: three kinds of server, each started as a process of its own and all resident at once: the anchor
   (bench/serve_anchor.py: FastAPI on uvicorn, one process, `RetrievalService.search_texts` per request, no
   batching), the service as users start it (`export/serve.py` with its defaults: its own local Ray, one replica),
   and optionally the same CLI of an earlier commit (--before, a `git worktree` of it: the "before" column) and
   variants of the service (--variants '{"name": {"env": {"VAR": "1"}, "args": ["--batch-wait-ms", "0"]}}': an
   environment and CLI arguments on top of the defaults, optionally of another checkout: "checkout": DIR). Closed-loop clients (bench/_httpload.py: aiohttp in this
   process, one keep-alive HTTP/1.1 connection per client) send POST /search with captions in every model
   language, k=10, for --seconds at each of --levels concurrent clients, the servers in turns (--rounds rounds,
   median reported) so load from elsewhere hits them alike. Per server and level: requests/s, p50/p95/p99
   latency, errors, the CPU time all its processes spent per request (/proc), and Serve's throughput over the
   anchor's in the same round (`ratio_to_anchor`, median over rounds). The 1-minute load average is recorded
   with every run: the machine is shared.
   Beside it, the same searches through `RetrievalService` in this process (1 thread): one query per call,
   and 16 per call (what one full batch costs).
   The model: --model/--index, else the demo architecture (tiny-vit, M-BERT-width token table, MLA, five
   languages) with random weights, exported and indexed (HNSW) over 512 generated images (speed does not depend
   on the weights). Everything runs on this machine's cores, clients included: figures are a floor for a server.
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
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from _httpload import percentiles, run_closed_loop, search_requests  # noqa: E402
from _report import write_report  # noqa: E402
from _servers import bench_model, query_pool, start_anchor, start_serve  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
K = 10


# ------------------------------------------------------------------------------------------------ HTTP


def measure(server, pool: list, clients: int, seconds: float) -> dict:
    """One closed-loop run against a server, with the CPU its processes spent during it, per request and per
    component (replica, HAProxy, Serve's proxy, controller, the rest of Ray, the CLI)."""
    before = server.cpu_by_component()
    result = run_closed_loop(server.url, search_requests(pool, K), clients, seconds)
    after = server.cpu_by_component()
    spent = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    cpu = sum(spent.values())
    n = max(1, result["requests"])
    result["cpu_s"] = round(cpu, 2)
    result["cpu_ms_per_request"] = round(1000 * cpu / n, 3) if result["requests"] else None
    result["cpu_ms_per_request_by_component"] = {k: round(1000 * v / n, 3) for k, v in sorted(spent.items())}
    result["load_average_1m"] = round(os.getloadavg()[0], 2)
    result.pop("kinds", None)
    result.pop("bad_requests_answered_4xx", None)
    return result


def http_bench(model: str, index: str, pool: list, levels: list[int], seconds: float, rounds: int, work: Path,
               variants: dict, before: str | None) -> dict:
    """The anchor, export/serve.py with its defaults and every variant, all resident at once, measured in turns at
    each level (round-robin, --rounds rounds) so load from elsewhere on the machine hits them alike; per server and
    level the median over rounds, and Serve's throughput over the anchor's in the same rounds."""
    specs = {"serve": {}}
    if before:
        specs["before"] = {"checkout": before}
    specs.update(variants)
    servers = {}
    try:
        servers["anchor"] = start_anchor(model, index, work)
        for name, spec in specs.items():
            started = time.perf_counter()
            servers[name] = start_serve(name, model, index, work, env=spec.get("env"), args=spec.get("args"),
                                        checkout=spec.get("checkout"))
            print(f"[http] {name} up in {time.perf_counter() - started:.0f} s: {servers[name].url} "
                  f"({servers[name].info['command']}; env {spec.get('env') or {}})", flush=True)
        out = {name: {"info": server.info, "levels": {}} for name, server in servers.items()}
        for clients in levels:
            runs: dict[str, list[dict]] = {name: [] for name in servers}
            for _ in range(rounds):
                for name, server in servers.items():
                    runs[name].append(measure(server, pool, clients, seconds))
            for name, results in runs.items():
                summary = {key: round(statistics.median(r[key] for r in results), 3)
                           for key in ("requests_per_s", "p50_ms", "p95_ms", "p99_ms", "cpu_ms_per_request")
                           if all(r.get(key) is not None for r in results)}
                summary.update(clients=clients, errors=sum(r["errors"] for r in results), rounds=results)
                parts = {k for r in results for k in r["cpu_ms_per_request_by_component"]}
                summary["cpu_ms_per_request_by_component"] = {
                    k: round(statistics.median(r["cpu_ms_per_request_by_component"].get(k, 0.0) for r in results), 3)
                    for k in sorted(parts)}
                if name != "anchor":
                    ratios = [r["requests_per_s"] / a["requests_per_s"] for r, a in zip(results, runs["anchor"])
                              if a["requests_per_s"]]
                    summary["ratio_to_anchor"] = round(statistics.median(ratios), 3) if ratios else None
                out[name]["levels"][str(clients)] = summary
                print(f"[http {name}] {clients:3d} clients: {summary.get('requests_per_s', 0):7.1f} req/s, p50 "
                      f"{summary.get('p50_ms')} / p99 {summary.get('p99_ms')} ms, "
                      f"{summary.get('cpu_ms_per_request')} CPU ms/request"
                      + (f", {summary['ratio_to_anchor']}x the anchor" if summary.get("ratio_to_anchor") else "")
                      + f" (median of {rounds}), {summary['errors']} errors; CPU ms/request by component "
                      + str(summary["cpu_ms_per_request_by_component"]), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return out


def in_process_bench(model: str, index: str, pool: list, max_seconds: float) -> dict:
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
        while time.perf_counter() < deadline:
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
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--before", help="a checkout (git worktree) of an earlier commit: its export/serve.py too")
    parser.add_argument("--variants", default="{}", help="JSON {name: {env: {...}, args: [...], checkout: DIR}}")
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
    try:
        variants = json.loads(args.variants)
        if not isinstance(variants, dict) or not all(isinstance(v, dict) and set(v) <= {"env", "args", "checkout"}
                                                     for v in variants.values()):
            raise ValueError("not {name: {env: {...}, args: [...], checkout: DIR}}")
    except ValueError as err:
        print(f"error: --variants: {err}", file=sys.stderr)
        return 2
    if args.before and not (Path(args.before) / "export" / "serve.py").is_file():
        print(f"error: --before: {args.before} has no export/serve.py", file=sys.stderr)
        return 2
    levels = [int(v) for v in args.levels.split(",")]
    if not levels or min(levels) < 1 or args.seconds <= 0 or args.rounds < 1:
        print("error: --levels must be positive integers, --seconds > 0, --rounds >= 1", file=sys.stderr)
        return 2
    from ccr_ray.cli import quiet_ray_env

    quiet_ray_env()
    report: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "load_average_start": list(os.getloadavg())},
                    "settings": {"k": K, "levels": levels, "seconds": args.seconds, "rounds": args.rounds,
                                 "before": args.before, "variants": variants},
                    "command": " ".join(["python bench/serve.py", *(argv if argv is not None else sys.argv[1:])])}
    report["settings"]["commit"] = git_commit(REPO)
    if args.before:
        report["settings"]["before_commit"] = git_commit(args.before)
    work = Path(args.work or tempfile.mkdtemp(prefix="ccr-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_http:
            model, index, data = (args.model, args.index, args.data) if args.model else bench_model(work)
            from ccr_ray import runtime as rt
            from ccr_ray.inference.index import Index

            manifest = rt.load_manifest(model)
            loaded = Index.load(index)
            report["model"] = {"dir": model, "languages": manifest["languages"], "embed_dim": manifest["embed_dim"],
                               "backbone": manifest["model"].get("backbone"), "random_weights": not args.model,
                               "index": {"kind": loaded.kind, "images": len(loaded), "params": loaded.params}}
            pool = query_pool(model, data)
            report["in_process"] = in_process_bench(model, index, pool, args.seconds)
            report["http"] = http_bench(model, index, pool, levels, args.seconds, args.rounds, work, variants,
                                        args.before)
            report["table"] = ratio_table(report["http"], levels)
            print(report["table"])
        if not args.skip_index:
            sizes = [int(v) for v in args.index_sizes.split(",")]
            report["index"] = {data: index_bench(sizes, args.index_dim, args.index_queries, data)
                               for data in args.index_data.split(",")}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    write_report(report, args.out)
    return 0


def git_commit(checkout) -> str:
    import subprocess

    return subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def ratio_table(http: dict, levels: list[int]) -> str:
    """The README's serving table: per level, every server's req/s, p50/p99 and ratio to the anchor."""
    names = list(http)
    lines = ["| clients | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for clients in levels:
        cells = []
        for name in names:
            row = http[name]["levels"].get(str(clients), {})
            ratio = f", **{row['ratio_to_anchor']:.2f}x**" if row.get("ratio_to_anchor") is not None else ""
            cells.append(f"{row.get('requests_per_s', 0):,.0f} req/s, p50 {row.get('p50_ms')} / p99 "
                         f"{row.get('p99_ms')} ms{ratio}")
        lines.append(f"| {clients} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
