"""Images/s of the Ray Data decode + preprocess stage (the training stream of `ccr_ray/data/pipeline.py`:
read_parquet -> map_batches(TrainPreprocessor)) versus a torch DataLoader doing the same work with the same CPUs:
worker processes that read the same Parquet row groups and run the same `TrainPreprocessor` on the same 64-row
batches (decode, resize/crop/normalise, tokenize English + five target languages).

Usage:
    python bench/data_pipeline.py [--images 4000] [--sizes 64,224] [--cpus 2] [--repeats 3] [--passes 5]
                                  [--out bench/results/data_pipeline.json]

Ray runs on a private local cluster with --cpus CPUs (tasks at data.task_cpus = 0.5, so up to 2x --cpus tasks);
the DataLoader is measured with --cpus workers and with 2x --cpus workers, and Ray is compared with the faster of
the two. Runs alternate (DataLoader, Ray, ...) so machine noise hits both; the median of --repeats is reported.

Two rates per pipeline:
  * end_to_end: one pass over the images, from creating the iterator (Ray's planning and task start-up
    included) to the last batch; the time to the first batch is reported beside it.
  * steady: the marginal rate (images(P passes) - images(1 pass)) / (time(P) - time(1)), from the median
    times over the repeats, which cancels fixed start-up costs and, unlike a rate measured from the first
    batch, is not flattered by batches a pipeline buffered before it. Training reads one stream per stage (iteration mode, pipeline.py), so this is
    the rate a training run sees after its start-up.
Both are also measured in CPU seconds (this process and every descendant: DataLoader workers; Ray's GCS,
raylet and workers, read from /proc), because on a shared machine wall-clock rates swing with other users' load;
images per CPU-second is what the same CPUs deliver when the pipeline has them to itself.
Target: Ray / DataLoader >= 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
from _report import write_report

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (open_clip.constants)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BATCH = 64  # rows per preprocessing call, as preprocess.PREPROCESS_BATCH


def make_spec(root: str, size: int):
    from ccr_ray.data.preprocess import PreprocessSpec
    from ccr_ray.data.transforms import ImageTransform

    image = ImageTransform(size=size, mean=CLIP_MEAN, std=CLIP_STD).to_config()
    return PreprocessSpec(languages=("de", "fr", "cs", "zh", "ja"), inputs=("image", "text_en", "text_target"),
                          image=image, context_length=77, tokenizer=str(Path(root) / "tokenizer"), dataset_root=root)


class RowGroups:
    """torch IterableDataset: worker w reads row groups w, w+W, ... and preprocesses 64-row batches."""

    def __init__(self, files: list[str], spec, passes: int = 1):
        self.units = [(f, g) for f in files for g in range(pq.ParquetFile(f).num_row_groups)] * passes
        self.spec = spec

    def __iter__(self):
        import torch.utils.data

        from ccr_ray.data.preprocess import TrainPreprocessor

        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        pre = TrainPreprocessor(self.spec)
        for f, g in self.units[wid::n]:
            table = pq.ParquetFile(f).read_row_group(g, columns=self.spec.columns)
            for rb in table.to_batches(max_chunksize=BATCH):
                yield pre({c: rb.column(c).to_numpy(zero_copy_only=False) for c in rb.schema.names})


def cpu_snapshot() -> dict[tuple[int, str], float]:
    """{(pid, start time): CPU seconds incl. reaped children} for this process and all its descendants (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        # after the command: state ppid ... utime(11) stime(12) cutime(13) cstime(14) ... starttime(19)
        stats[int(entry)] = (int(fields[1]), fields[19], sum(int(x) for x in fields[11:15]) / tick)
    keep, frontier = {}, {os.getpid()}
    while frontier:
        keep.update({(pid, stats[pid][1]): stats[pid][2] for pid in frontier if pid in stats})
        frontier = {pid for pid, (ppid, _, _) in stats.items() if ppid in frontier and (pid, stats[pid][1]) not in keep}
    return keep


def cpu_seconds_since(before: dict) -> float:
    """CPU used since `before` by the processes alive now (new ones in full); exited children count through
    their parent's reaped-children time."""
    return sum(v - before.get(k, 0.0) for k, v in cpu_snapshot().items())


def _drain(iterator, key: str = "pixels") -> tuple[int, float, float]:
    start = time.perf_counter()
    first = None
    images = 0
    for batch in iterator:
        if first is None:
            first = time.perf_counter()
        images += len(batch[key])
    end = time.perf_counter()
    return images, end - start, end - (first or end)


def run_dataloader(files: list[str], spec, workers: int, passes: int = 1) -> dict:
    import warnings

    import torch.utils.data

    warnings.filterwarnings("ignore", message=".*worker processes in total.*")  # 2x --cpus workers on purpose
    # as IterableDataset subclasses are required by DataLoader's type checks
    class DS(RowGroups, torch.utils.data.IterableDataset):
        pass

    before = cpu_snapshot()
    loader = torch.utils.data.DataLoader(DS(files, spec, passes), batch_size=None, num_workers=workers)
    images, wall, after_first = _drain(iter(loader))  # exhausting it joins (reaps) the workers
    cpu = cpu_seconds_since(before)
    return {"images": images, "end_to_end_s": wall, "images_per_s": images / wall, "first_batch_s": wall - after_first,
            "cpu_s": cpu}


def run_ray(root: str, files: list[str], spec, task_cpus: float, passes: int = 1) -> dict:
    from ccr_ray.data.pipeline import StreamPlan, training_stream

    before = cpu_snapshot()
    ds = training_stream(StreamPlan(root, "train", files, spec, passes=passes), task_cpus)
    images, wall, after_first = _drain(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
    cpu = cpu_seconds_since(before)
    return {"images": images, "end_to_end_s": wall, "images_per_s": images / wall, "first_batch_s": wall - after_first,
            "cpu_s": cpu}


def _measure(run, passes: int) -> dict:
    """One pass and `passes` passes back to back: end-to-end figures of the first, steady rate of the pair."""
    one = run(1)
    many = run(passes)
    extra = many["images"] - one["images"]
    steady = extra / max(many["end_to_end_s"] - one["end_to_end_s"], 1e-9)
    steady_cpu = extra / max(many["cpu_s"] - one["cpu_s"], 1e-9)
    return {**one, "images_per_cpu_s": one["images"] / one["cpu_s"], "steady_images_per_s": steady,
            "steady_images_per_cpu_s": steady_cpu, "images_long": many["images"], "long_s": many["end_to_end_s"],
            "long_cpu_s": many["cpu_s"]}


def _median(runs: list[dict]) -> dict:
    """Medians over the repeats. The headline steady rate is taken from the median one-pass and long-run times,
    not as the median of per-repeat marginal rates: Ray's start-up jitters by a second or more, and one slow
    start-up makes a single repeat's (long - one) difference, and so its rate, arbitrarily large."""
    keys = ("end_to_end_s", "images_per_s", "first_batch_s", "cpu_s", "images_per_cpu_s", "long_s", "long_cpu_s")
    out = {k: round(statistics.median(r[k] for r in runs), 2) for k in keys}
    extra = runs[0]["images_long"] - runs[0]["images"]
    med = {k: statistics.median(r[k] for r in runs) for k in ("end_to_end_s", "long_s", "cpu_s", "long_cpu_s")}
    out["steady_images_per_s"] = round(extra / max(med["long_s"] - med["end_to_end_s"], 1e-9), 2)
    out["steady_images_per_cpu_s"] = round(extra / max(med["long_cpu_s"] - med["cpu_s"], 1e-9), 2)
    out["runs_images_per_s"] = [round(r["images_per_s"], 1) for r in runs]
    out["runs_steady_images_per_s"] = [round(r["steady_images_per_s"], 1) for r in runs]
    out["images"], out["images_long"] = runs[0]["images"], runs[0]["images_long"]
    return out


def _ratio(res: dict, key: str, base: str) -> float:
    return round(res["ray"][key] / res[base][key], 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--sizes", default="64,224", help="image sizes to generate and preprocess to")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--task-cpus", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passes", type=int, default=5, help="passes of the long run (steady rate)")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--out", default="bench/results/data_pipeline.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")
    import ray

    from ccr_ray.data import schema
    from ccr_ray.data.synthetic import DemoDataConfig, write_demo_dataset

    work = Path(tempfile.mkdtemp(prefix="ccr-databench-"))
    report = {"benchmark": "data_pipeline", "cpus": args.cpus, "machine_cpus": os.cpu_count(),
              "platform": platform.platform(), "images": args.images, "batch": BATCH, "task_cpus": args.task_cpus,
              "repeats": args.repeats, "passes": args.passes, "work": ("decode PNG + resize/crop/normalise + CLIP BPE (en) + WordPiece "
                                                "(de fr cs zh ja), TrainPreprocessor"), "sizes": {}, "target": 1.0}
    temp = tempfile.mkdtemp(prefix="ccrb-", dir="/tmp")  # private Ray session folder, short socket paths
    ray.init(address="local", num_cpus=args.cpus, _temp_dir=temp, log_to_driver=False, include_dashboard=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            root = work / f"demo{size}"
            t0 = time.perf_counter()
            write_demo_dataset(DemoDataConfig(out=str(root), sizes={"train": args.images}, image_size=size,
                                              shard_size=args.shard_size, tokenizer_vocab=4000,
                                              workers=args.cpus))
            gen_s = time.perf_counter() - t0
            files = schema.split_files(root, "train")
            spec = make_spec(str(root), size)
            runs: dict[str, list] = {"ray": [], f"dataloader_{args.cpus}w": [], f"dataloader_{2 * args.cpus}w": []}
            run_ray(str(root), files[:1], spec, args.task_cpus)  # warm Ray's worker pool and imports once
            for _ in range(args.repeats):
                for workers in (args.cpus, 2 * args.cpus):
                    name = f"dataloader_{workers}w"
                    runs[name].append(_measure(partial(run_dataloader, files, spec, workers), args.passes))
                    print(size, name, {k: round(v, 1) for k, v in runs[name][-1].items()}, flush=True)
                runs["ray"].append(_measure(partial(run_ray, str(root), files, spec, args.task_cpus),
                                            args.passes))
                print(size, "ray", {k: round(v, 1) for k, v in runs["ray"][-1].items()}, flush=True)
            res = {k: _median(v) for k, v in runs.items()}
            loaders = [k for k in res if k.startswith("dataloader")]
            best = max(loaders, key=lambda k: res[k]["images_per_s"])
            best_steady = max(loaders, key=lambda k: res[k]["steady_images_per_s"])
            res["generate_s"] = round(gen_s, 1)
            res["baseline"] = {"end_to_end": best, "steady": best_steady}
            best_cpu = max(loaders, key=lambda k: res[k]["images_per_cpu_s"])
            best_steady_cpu = max(loaders, key=lambda k: res[k]["steady_images_per_cpu_s"])
            res["baseline"].update(end_to_end_cpu=best_cpu, steady_cpu=best_steady_cpu)

            res["ratio_ray_over_dataloader"] = {
                "end_to_end": _ratio(res, "images_per_s", best), "steady": _ratio(res, "steady_images_per_s", best_steady),
                "end_to_end_per_cpu_s": _ratio(res, "images_per_cpu_s", best_cpu),
                "steady_per_cpu_s": _ratio(res, "steady_images_per_cpu_s", best_steady_cpu)}
            report["sizes"][str(size)] = res
            print(size, json.dumps({k: res[k] for k in ("baseline", "ratio_ray_over_dataloader")}),
                  flush=True)
    finally:
        ray.shutdown()
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
