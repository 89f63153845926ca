"""Soak: the retrieval service as users start it (export/serve.py, its defaults) under mixed traffic for minutes:
throughput and p99 per window, every error, and the resident memory of the replica and the ingress per window.

Usage:
    python bench/soak.py [--model DIR --index DIR --images DATASET] [--clients 8] [--minutes 10] [--window 60]
                         [--quick] [--max-growth 0.05] [--work DIR] [--out bench/results/soak.json]
                         [--plot bench/results/soak.png]

    --quick       60 s in 10-s windows (what CI runs: tests/serve/test_soak.py)
    --max-growth  the largest resident-memory growth allowed after the first window (0.05: 5%)

Traffic (closed loop, --clients clients, one keep-alive HTTP/1.1 connection each; bench/_httpload.py), drawn
per request from a fixed seed: POST /search with captions in every model language (55%), POST /search/image with
an uploaded image (10%; raw body and multipart in turn), POST /encode/text (10%), POST /encode/image (5%), the
search page with a query (15%), a thumbnail GET /images/{id}?max_side=64 (5%); and every 100th request a
deliberately bad one (1%: empty text, unknown language, k out of range, malformed JSON, a non-image upload, an
oversized body, an unknown path, a wrong method, ...), which must be answered with a 4xx.
Per window: requests/s, p50/p99 of the answered requests, unexpected answers (errors; a bad request not answered
4xx counts as one), and the resident memory (RSS, /proc) of every Serve process: the replica, HAProxy and its
manager actor, Serve's fallback proxy and the controller. Checks, reported in the JSON (`checks`) and by the exit
status (1 when one fails): no unexpected answer, every bad request answered 4xx, and the replica's and the
ingress processes' RSS at the end within --max-growth of their RSS after the first window. The model: --model,
--index, --images, else the demo architecture with random weights over 512 generated images (bench/_servers.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _httpload import run_closed_loop
from _report import write_report
from _servers import bench_model, query_pool, rss_mb, start_serve

REPO = Path(__file__).resolve().parents[1]
TRACKED = {  # report name -> how the process is named (Ray's actor name, else the executable)
    "replica": "ray::ServeReplica",
    "haproxy": "haproxy",
    "haproxy_manager": "ray::HAProxyManager",
    "proxy_actor": "ray::ProxyActor",
    "controller": "ray::ServeController",
}
INGRESS = ("haproxy", "haproxy_manager", "proxy_actor")
MIX = (("search", 55), ("search_image", 10), ("encode_text", 10), ("encode_image", 5), ("page", 15),
       ("thumbnail", 5))


def bad_requests() -> list[tuple[str, str, dict]]:
    """(method, path, aiohttp kwargs) of requests the service must refuse with a 4xx."""
    json_header = {"content-type": "application/json"}
    return [
        ("POST", "/search", {"json": {"text": "", "lang": "en"}}),
        ("POST", "/search", {"json": {"text": "a red circle", "lang": "xx"}}),
        ("POST", "/search", {"json": {"text": "a red circle", "lang": "en", "k": 0}}),
        ("POST", "/search", {"data": b'{"text": "a red', "headers": json_header}),
        ("POST", "/search", {"json": {"text": "a red circle", "langs": "en"}}),
        ("POST", "/search/image", {"data": b"not an image at all"}),
        ("POST", "/encode/text", {"json": {"texts": [], "lang": "en"}}),
        ("POST", "/encode/image", {"data": b"\x89PNG\r\n\x1a\n broken"}),
        ("POST", "/search", {"data": b'{"text": "' + b"x" * 70_000 + b'"}', "headers": json_header}),
        ("GET", "/no-such-endpoint", {}),
        ("PUT", "/search", {"json": {"text": "a red circle"}}),
        ("GET", "/", {"params": {"q": "\u200b", "lang": "en"}}),
    ]


def mixed_requests(pool: list[tuple[str, str]], images: list[bytes], image_ids: list[str], seed: int = 0):
    kinds = [kind for kind, _ in MIX]
    weights = [weight for _, weight in MIX]
    bad = bad_requests()

    def make(i: int):
        if i % 100 == 50:
            method, path, kwargs = bad[(i // 100) % len(bad)]
            return "bad", method, path, kwargs, "4xx"
        rng = random.Random(seed * 1_000_003 + i)
        kind = rng.choices(kinds, weights)[0]
        text, lang = pool[rng.randrange(len(pool))]
        image = images[rng.randrange(len(images))] if images else b""
        if kind == "search":
            return kind, "POST", "/search", {"json": {"text": text, "lang": lang, "k": 10}}, "ok"
        if kind == "search_image":
            if i % 2:
                return kind, "POST", "/search/image?k=10", {"data": image,
                                                            "headers": {"content-type": "image/png"}}, "ok"
            return kind, "POST", "/search/image?k=10", {"data": multipart(image)}, "ok"
        if kind == "encode_text":
            texts = [pool[rng.randrange(len(pool))] for _ in range(3)]
            same = [t for t, lang_ in texts if lang_ == lang] or [text]
            return kind, "POST", "/encode/text", {"json": {"texts": same, "lang": lang}}, "ok"
        if kind == "encode_image":
            return kind, "POST", "/encode/image", {"data": image, "headers": {"content-type": "image/png"}}, "ok"
        if kind == "page":
            return kind, "GET", "/", {"params": {"q": text, "lang": lang, "k": "12"}}, "ok"
        image_id = image_ids[rng.randrange(len(image_ids))]
        return kind, "GET", f"/images/{image_id}", {"params": {"max_side": "64"}}, "ok"

    return make


def multipart(image: bytes):
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("image", image, filename="query.png", content_type="image/png")
    return form


def test_images(data: str, n: int = 64) -> tuple[list[bytes], list[str]]:
    from ccr_ray.data import schema

    table = schema.read_split_table(data, "test", [], with_images=True)
    return table["image"].to_pylist()[:n], table["image_id"].to_pylist()


def memory(processes: dict[int, str]) -> dict[str, float]:
    """RSS (MB) per tracked component: the sum over its processes (one each, except HAProxy during a reload)."""
    out: dict[str, float] = {}
    for pid, name in processes.items():
        for label, prefix in TRACKED.items():
            if name.startswith(prefix):
                out[label] = round(out.get(label, 0.0) + rss_mb(pid), 1)
    return out


def growth(windows: list[dict]) -> dict[str, float]:
    """Per component: RSS after the last window over RSS after the first, minus 1."""
    if len(windows) < 2:
        return {}
    first, last = windows[0]["rss_mb"], windows[-1]["rss_mb"]
    return {k: round(last[k] / first[k] - 1, 4) for k in first if k in last and first[k] > 0}


def plot(windows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [(w["start_s"] + w["seconds"]) / 60 for w in windows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    top.plot(minutes, [w["requests_per_s"] for w in windows], "o-", color="tab:blue", label="requests/s")
    top.set_ylabel("requests/s")
    twin = top.twinx()
    twin.plot(minutes, [w.get("p99_ms") for w in windows], "s--", color="tab:red", label="p99 ms")
    twin.set_ylabel("p99 latency (ms)")
    top.set_ylim(bottom=0)
    twin.set_ylim(bottom=0)
    top.legend(loc="lower left")
    twin.legend(loc="lower right")
    top.set_title(title)
    for label in TRACKED:
        values = [w["rss_mb"].get(label) for w in windows]
        if any(v is not None for v in values):
            bottom.plot(minutes, values, "o-", label=label)
    bottom.set_ylabel("resident memory (MB)")
    bottom.set_xlabel("minutes into the soak (end of window)")
    bottom.set_ylim(bottom=0)
    bottom.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--index")
    parser.add_argument("--images", help="the dataset holding the indexed images (uploads and thumbnails)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=60.0, help="seconds per reported window")
    parser.add_argument("--quick", action="store_true", help="60 s in 10-s windows (CI)")
    parser.add_argument("--max-growth", type=float, default=0.05)
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "soak.json"))
    parser.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.window = 1.0, 10.0
    given = [args.model, args.index, args.images]
    if any(given) and not all(given):
        print("error: give --model, --index and --images together", file=sys.stderr)
        return 2
    if args.clients < 1 or args.minutes <= 0 or args.window <= 0 or args.window > args.minutes * 60:
        print("error: --clients >= 1, --minutes > 0, 0 < --window <= the run", file=sys.stderr)
        return 2
    from ccr_ray.cli import quiet_ray_env

    quiet_ray_env()
    work = Path(args.work or tempfile.mkdtemp(prefix="ccr-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    seconds = args.minutes * 60
    report: dict = {"command": " ".join(["python bench/soak.py", *(argv if argv is not None else sys.argv[1:])]),
                    "settings": {"clients": args.clients, "seconds": seconds, "window_s": args.window,
                                 "mix": dict(MIX), "bad_every": 100, "max_growth": args.max_growth},
                    "machine": {"cpus": os.cpu_count(), "load_average_start": list(os.getloadavg())}}
    server = None
    try:
        model, index, data = (args.model, args.index, args.images) if args.model else bench_model(work)
        pool = query_pool(model, data)
        images, image_ids = test_images(data)
        server = start_serve("soak", model, index, work, images=data)
        report["server"] = server.info
        windows: list[dict] = []

        def on_window(window: dict) -> None:
            window["rss_mb"] = memory(server.processes())
            window["load_average_1m"] = round(os.getloadavg()[0], 2)
            windows.append(window)
            print(f"[soak] {window['start_s']:6.0f} s: {window['requests_per_s']:6.1f} req/s, p50 "
                  f"{window.get('p50_ms')} / p99 {window.get('p99_ms')} ms, {window['unexpected']} unexpected, "
                  f"RSS {window['rss_mb']} MB, load {window['load_average_1m']}", flush=True)

        started = time.perf_counter()
        result = run_closed_loop(server.url, mixed_requests(pool, images, image_ids), args.clients, seconds,
                                 window_s=args.window, on_window=on_window)
        report["wall_s"] = round(time.perf_counter() - started, 1)
        report["totals"] = result
        report["windows"] = windows
        report["memory_growth"] = growth(windows)
        bad_sent = result["kinds"].get("bad", 0)
        tracked = ("replica", *INGRESS)
        report["checks"] = {
            "no_unexpected_answers": result["errors"] == 0,
            "every_bad_request_4xx": bad_sent > 0 and result["bad_requests_answered_4xx"] == bad_sent,
            "memory_growth_within_bound": all(report["memory_growth"].get(k, 0.0) <= args.max_growth
                                              for k in tracked),
        }
    finally:
        if server is not None:
            server.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    write_report(report, args.out)
    plot_path = args.plot or str(Path(args.out).with_suffix(".png"))
    plot(report["windows"], plot_path, f"soak: {args.clients} clients, mixed traffic, export/serve.py defaults")
    print(f"wrote {plot_path}")
    print(json.dumps({"totals": {k: v for k, v in result.items() if k != "unexpected"},
                      "memory_growth": report["memory_growth"], "checks": report["checks"]}, indent=1))
    failed = [name for name, ok in report["checks"].items() if not ok]
    if failed:
        print(f"soak: failed {', '.join(failed)}; unexpected answers: {result['unexpected'][:5]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
