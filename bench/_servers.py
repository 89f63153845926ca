"""Servers the serving benchmarks start and measure: the Serve application through its own CLI (export/serve.py,
each in a new session with a private Ray temp dir, so it starts its own local Ray and never attaches to another
cluster), the plain-uvicorn anchor (bench/serve_anchor.py), and what their processes cost: CPU seconds and resident
memory, read from /proc (Linux), of every process in the server's session (the CLI, Ray's daemons, Serve's
controller, proxy, HAProxy and replicas all share it); and the model they serve when none is given (the demo
architecture with random weights, `bench_model`) with captions in every language (`query_pool`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ccr_ray.net import free_port

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen
    log: Path
    scratch: Path | None = None
    info: dict = field(default_factory=dict)

    def processes(self) -> dict[int, str]:
        """pid -> name (Ray's actor name where it has one) of every live process in this server's session."""
        return session_processes(self.process.pid)

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.processes())

    def cpu_by_component(self) -> dict[str, float]:
        """CPU seconds so far of every live process of the session, summed per component (COMPONENTS)."""
        out: dict[str, float] = {}
        for pid, name in self.processes().items():
            label = component(name, self.process.pid == pid)
            out[label] = out.get(label, 0.0) + cpu_seconds(pid)
        return out

    def stop(self, timeout: float = 90.0) -> None:
        """SIGINT (export/serve.py stops its local Ray with it; uvicorn stops), then SIGKILL to what is left of the
        session, by pid."""
        members = self.processes()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_alive(p) for p in members):
            time.sleep(0.5)
        for pid in members:
            if pid_alive(pid) and session_of(pid) == self.process.pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self.scratch:
            subprocess.run(["rm", "-rf", str(self.scratch)], check=False)


COMPONENTS = {  # process name prefix -> component: what a request passes through, and the rest
    "ray::ServeReplica": "replica", "haproxy": "haproxy", "ray::HAProxyManager": "haproxy_manager",
    "ray::ProxyActor": "serve_proxy", "ray::ServeController": "serve_controller",
}


def component(name: str, leader: bool = False) -> str:
    if leader:
        return "server"  # the CLI itself (export/serve.py, or the anchor's uvicorn process)
    return next((label for prefix, label in COMPONENTS.items() if name.startswith(prefix)), "ray_other")


def read_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    head, _, rest = raw.rpartition(")")
    return [head.split("(", 1)[-1], *rest.split()]  # [comm, state, ppid, pgrp, session, ...]


def session_of(pid: int) -> int | None:
    stat = read_stat(pid)
    return int(stat[4]) if stat else None


def pid_alive(pid: int) -> bool:
    stat = read_stat(pid)
    return stat is not None and stat[1] != "Z"


def process_name(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = cmdline[0].decode(errors="replace") if cmdline else ""
    if first.startswith("ray::"):
        return first.split(" ")[0]
    stat = read_stat(pid)
    return stat[0] if stat else "?"


def session_processes(session: int) -> dict[int, str]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and session_of(int(entry)) == session and pid_alive(int(entry)):
            out[int(entry)] = process_name(int(entry))
    return out


def cpu_seconds(pid: int) -> float:
    stat = read_stat(pid)
    return (int(stat[12]) + int(stat[13])) / TICK if stat else 0.0  # utime + stime


def rss_mb(pid: int) -> float:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * PAGE / 2**20


def wait_ready(server: Server, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited ({server.process.returncode}); log {server.log}:\n"
                               + server.log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(server.url + path, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{server.name} did not answer {path} within {timeout:.0f} s; log {server.log}")


def start_serve(name: str, model: str, index: str, work: Path, *, images: str | None = None, env: dict | None = None,
                args: list[str] | None = None, checkout: str | None = None, timeout: float = 600) -> Server:
    """export/serve.py (of this checkout, or of `checkout`: an earlier commit's worktree) with its defaults, plus
    `args`, on a free loopback port; returns once /healthz answers."""
    port = free_port()
    root = Path(checkout).resolve() if checkout else REPO
    scratch = Path(tempfile.mkdtemp(prefix=f"ccrb-{name[:8]}-", dir="/tmp"))  # short: Ray's socket paths
    log = work / f"{name}.log"
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environ.update(RAY_TMPDIR=str(scratch), HF_HUB_OFFLINE="1", **(env or {}))
    if checkout:
        environ["PYTHONPATH"] = str(root) + os.pathsep + environ.get("PYTHONPATH", "")
    command = [sys.executable, str(root / "export" / "serve.py"), "--model", model, "--index", index,
               "--port", str(port), *(["--images", images] if images else []), *(args or [])]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=root, env=environ, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = Server(name, f"http://127.0.0.1:{port}", process, log, scratch,
                    {"command": " ".join(command[1:]), "env": env or {}, "checkout": str(root)})
    return ready_or_stopped(server, timeout)


def ready_or_stopped(server: Server, timeout: float) -> Server:
    """The server once its /healthz answers; stopped (and the error raised) when it never does."""
    try:
        wait_ready(server, "/healthz", timeout)
    except Exception:
        server.stop()
        raise
    return server


def start_anchor(model: str, index: str, work: Path, timeout: float = 300) -> Server:
    port = free_port()
    log = work / "anchor.log"
    command = [sys.executable, str(REPO / "bench" / "serve_anchor.py"), "--model", model, "--index", index,
               "--port", str(port)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = Server("anchor", f"http://127.0.0.1:{port}", process, log, None, {"command": " ".join(command[1:])})
    return ready_or_stopped(server, timeout)


def bench_model(work: Path) -> tuple[str, str, str]:
    """The demo architecture with random weights, exported (fp32), its 512 generated images embedded and
    indexed (HNSW, the search setting chosen on 200 of their captions). Returns (model dir, index dir, data dir)."""
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
    build_index(source.batches(), "hnsw", count=source.count, meta={"model": source.sidecar["model"]},
                queries=source.caption_queries(200)).save(work / "index")
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
