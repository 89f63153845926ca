"""Every fault drill, run again and again on an idle machine and beside CPU hogs: do they pass at any speed?

Usage:
    python bench/drills.py [--rounds 5] [--hogs 2] [--conditions idle,loaded] [--only NAME[,NAME]]
                           [--append] [--out bench/results/drills.json]

Each round runs each drill test in its own pytest process (the suite's own tests; `slow` ones included), first
with the machine as it is ("idle": nothing else of ours running), then with --hogs processes of `yes > /dev/null`
beside it ("loaded": a busy host, or one half as fast), killed afterwards by pid. Records pass/fail, the test's
wall time and the figures the drills append (CCR_RAY_DRILL_REPORT: steps redone, records lost, recovery time), and
writes the table. The drills fire their faults at a step or an event (tests/ray/drills.py), so a pass here does not
depend on the machine's speed: this run is the evidence.

The report is rewritten after every drill (a run cut short keeps what it did). --append adds this run's rounds to
those already in --out (each run records its commit, CPU and start time), so rounds run in several sittings add up
to one table; a round alternates idle and loaded, so a cut-short run still has both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import write_report

REPO = Path(__file__).resolve().parents[1]
DRILLS = {
    "worker node removed": "tests/ray/test_multinode.py::test_drill_worker_node_removed_then_replaced",
    "driver killed": "tests/ray/test_multinode.py::test_drill_driver_killed_then_the_same_command_again",
    "storage down 30 s": "tests/ray/test_multinode.py::test_drill_storage_unreachable_for_30_seconds",
    "worker crash": "tests/ray/test_stages_on_ray.py::test_a_worker_that_crashes_once_resumes_from_its_checkpoint",
    "prepare_data worker killed": "tests/ray/test_prepare_data.py::test_drill_a_preprocessing_worker_killed_mid_job",
    "sweep driver killed": "tests/ray/test_tune.py::test_sweep_stops_weak_trials_survives_a_killed_driver_and_reports",
    "serve replica killed": "tests/serve/test_app.py::"
                            "test_a_replica_killed_under_load_is_replaced_and_every_request_after_recovery_succeeds",
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hogs", type=int, default=2)
    parser.add_argument("--conditions", default="idle,loaded")
    parser.add_argument("--only", default=None)
    parser.add_argument("--append", action="store_true", help="keep the runs already in --out")
    parser.add_argument("--out", default=str(REPO / "bench/results/drills.json"))
    return parser.parse_args(argv)


def run_drill(test: str, report: Path) -> dict:
    start = time.perf_counter()
    env = {**os.environ, "CCR_RAY_DRILL_REPORT": str(report), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    tail = (done.stdout + done.stderr).strip().splitlines()
    return {"passed": done.returncode == 0, "seconds": round(time.perf_counter() - start, 1),
            "summary": tail[-1] if tail else "", "failure": "" if done.returncode == 0 else "\n".join(tail[-40:])}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {"cpus": os.cpu_count(), "cpu": cpu, "commit": commit.stdout.strip(), "platform": platform.platform()}


def summarise(runs: list[dict], names, conditions) -> dict:
    table = {}
    for name in names:
        for condition in conditions:
            mine = [r for r in runs if r["drill"] == name and r["condition"] == condition]
            table.setdefault(name, {})[condition] = {"runs": len(mine), "failures": sum(not r["passed"] for r in mine),
                                                     "seconds": [r["seconds"] for r in mine]}
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    drills = {k: v for k, v in DRILLS.items() if not args.only or k in args.only.split(",")}
    conditions = [c for c in args.conditions.split(",") if c]
    out = Path(args.out)
    runs: list[dict] = json.loads(out.read_text()).get("runs", []) if args.append and out.exists() else []
    earlier = len(runs)
    here = machine()

    def write() -> dict:
        names = list(dict.fromkeys([*drills, *(r["drill"] for r in runs)]))
        kinds = list(dict.fromkeys([*conditions, *(r["condition"] for r in runs)]))
        table = summarise(runs, names, kinds)
        write_report({"benchmark": "drills", "command": "python bench/drills.py", "hogs": args.hogs, "table": table,
                      "runs": runs, "machine": here}, out)
        return table

    for round_ in range(1, args.rounds + 1):
        for condition in conditions:  # idle and loaded alternate: a run cut short still has both
            for name, test in drills.items():
                hogs = [subprocess.Popen("yes > /dev/null", shell=True, start_new_session=True)
                        for _ in range(args.hogs if condition == "loaded" else 0)]
                with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
                    report = Path(f.name)
                started = time.strftime("%Y-%m-%dT%H:%M:%S")
                try:
                    result = run_drill(test, report)
                finally:
                    for hog in hogs:  # by process group: the shell and its `yes`
                        os.killpg(hog.pid, 9)
                        hog.wait()
                figures = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
                report.unlink()
                runs.append({"drill": name, "condition": condition, "round": round_, "started": started,
                             "commit": here["commit"], "cpu": here["cpu"], **result, "figures": figures})
                print(f"[drills] {condition} round {round_} {name}: {'pass' if result['passed'] else 'FAIL'} "
                      f"({result['seconds']:.0f}s) {figures[-1] if figures else ''}", flush=True)
                table = write()
    table = write()
    kinds = list(dict.fromkeys([*conditions, *(r["condition"] for r in runs)]))
    print(f"all runs in {out} ({earlier} earlier, {len(runs) - earlier} now):")
    print("| drill | " + " | ".join(f"{c} (failures / runs)" for c in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for name, per in table.items():
        print(f"| {name} | " + " | ".join(f"{per[c]['failures']} / {per[c]['runs']}" for c in kinds) + " |")
    return 1 if any(not r["passed"] for r in runs[earlier:]) else 0


if __name__ == "__main__":
    sys.exit(main())
