"""Architecture rules: models, losses, metrics and transforms never import Ray; stage ids live in stages.py."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ccr_ray"
RAY_FREE = [
    "ccr_ray.models.backbone", "ccr_ray.models.ccr", "ccr_ray.models.mla", "ccr_ray.models.multilingual",
    "ccr_ray.losses", "ccr_ray.optim", "ccr_ray.eval.metrics", "ccr_ray.eval.retrieval", "ccr_ray.eval.evaluate",
    "ccr_ray.data.transforms", "ccr_ray.data.preprocess", "ccr_ray.data.schema", "ccr_ray.data.scenes",
    "ccr_ray.data.feature_cache",
    "ccr_ray.data.grammar", "ccr_ray.data.synthetic", "ccr_ray.data.local", "ccr_ray.tokenization",
    # the training loop and everything it runs: Ray lives only in train/worker.py and train/driver.py
    "ccr_ray.train.loop", "ccr_ray.train.state", "ccr_ray.train.plan", "ccr_ray.train.adversarial",
    "ccr_ray.train.checkpoint", "ccr_ray.tune.space", "ccr_ray.tune.report", "ccr_ray.config", "ccr_ray.stages", "ccr_ray.plots",
    # export: only export/embeddings.py (the batch-embedding job) touches Ray
    "ccr_ray.runtime", "ccr_ray.export.onnx_export", "ccr_ray.export.probes", "ccr_ray.export.quantize",
    "ccr_ray.export.search", "ccr_ray.export.evaluate",
    # converters: parsing, image checks and shard writing; only ccr_ray.data.ingest runs them on Ray
    "ccr_ray.data.converters", "ccr_ray.data.converters.records", "ccr_ray.data.converters.shards",
    "ccr_ray.data.converters.report", "ccr_ray.data.converters.seeds", "ccr_ray.data.converters.cc300k",
    "ccr_ray.data.converters.multi30k", "ccr_ray.data.converters.xtd10", "ccr_ray.data.converters.xflickrco",
    "ccr_ray.data.converters.coco_cn",
]
RAY_FREE_DIRS = ["models"]  # every module in these folders, including ones added later


def ray_free_modules():
    mods = set(RAY_FREE)
    for folder in RAY_FREE_DIRS:
        for path in (PACKAGE / folder).glob("*.py"):
            mods.add(f"ccr_ray.{folder}.{path.stem}".replace(".__init__", ""))
    return sorted(mods)


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", ray_free_modules())
def test_module_source_does_not_import_ray(module):
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    bad = {n for n in imports_of(path) if n == "ray" or n.startswith("ray.")}
    assert not bad, f"{module} imports {bad}"


def test_importing_them_loads_no_ray():
    code = "import sys\n" + "\n".join(f"import {m}" for m in ray_free_modules()) + \
        "\nprint(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))[:5])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout


def test_no_stage_branches_outside_the_stage_table():
    from ccr_ray.stages import STAGES

    names = "|".join(re.escape(s) for s in STAGES)
    pattern = re.compile(rf"""(stage|\.name)\s*(==|!=|in)\s*\(?\s*["']({names})["']""")
    offenders = []
    for path in list(PACKAGE.rglob("*.py")) + list((PACKAGE.parent / "jobs").glob("*.py")):
        if path.name == "stages.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert not offenders, offenders


def test_the_layering_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import ray.train\nfrom ray import data\n")
    assert {"ray.train", "ray"} <= imports_of(bad)
