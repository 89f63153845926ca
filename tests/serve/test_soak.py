"""The service under a minute of mixed traffic (bench/soak.py --quick, what CI runs of the 10-minute soak): text search
in every language, image search with uploads, /encode/*, the page, thumbnails and 1% deliberately bad requests,
8 clients, against export/serve.py with its defaults (HAProxy ingress, one replica). Nothing about speed is asserted:
no unexpected answer, every bad request answered with a 4xx, every kind of request answered, and the replica's and
the ingress processes' resident memory within 5% of what it was after the first 10-s window."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.ray


def test_a_minute_of_mixed_traffic_has_no_errors_and_no_memory_growth(demo_model, tmp_path):
    out = tmp_path / "soak.json"
    command = [sys.executable, str(REPO / "bench" / "soak.py"), "--quick", "--model", demo_model["model"],
               "--index", demo_model["hnsw"], "--images", demo_model["data"], "--out", str(out),
               "--work", str(tmp_path / "work")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.exists(), f"no report (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads(out.read_text())
    totals = report["totals"]
    print(f"soak: {totals['requests']} answered, kinds {totals['kinds']}, growth {report['memory_growth']}, "
          f"windows {[(w['requests_per_s'], w.get('p99_ms'), w['rss_mb']) for w in report['windows']]}")
    assert totals["errors"] == 0, totals["unexpected"]
    assert totals["kinds"].get("bad", 0) > 0 and totals["bad_requests_answered_4xx"] == totals["kinds"]["bad"]
    assert set(totals["kinds"]) == {"search", "search_image", "encode_text", "encode_image", "page", "thumbnail",
                                    "bad"}, totals["kinds"]
    assert len(report["windows"]) >= 2 and all(w["rss_mb"].get("replica") for w in report["windows"])
    assert report["checks"]["memory_growth_within_bound"], report["memory_growth"]
    assert all(report["checks"].values()) and done.returncode == 0, (report["checks"], done.stderr[-2000:])
    assert (tmp_path / "soak.png").stat().st_size > 0
