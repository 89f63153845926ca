"""Architecture rules, stated as data: which layer of the library may import which, no import cycles (lazy
imports inside functions count), Ray kept out of models, losses, metrics, transforms and the training loop, and
stage ids only in stages.py."""

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
    "ccr_ray.data.grammar", "ccr_ray.data.synthetic", "ccr_ray.data.local", "ccr_ray.tokenization",
    # the training loop and everything it runs: Ray lives only in train/worker.py and train/driver.py
    "ccr_ray.train.loop", "ccr_ray.train.state", "ccr_ray.train.plan", "ccr_ray.train.adversarial",
    "ccr_ray.checkpoint", "ccr_ray.tune.space", "ccr_ray.tune.report", "ccr_ray.config", "ccr_ray.stages", "ccr_ray.plots",
    # export: only export/embeddings.py (the batch-embedding job) touches Ray
    "ccr_ray.runtime", "ccr_ray.export.onnx_export", "ccr_ray.export.probes", "ccr_ray.export.quantize",
    "ccr_ray.inference.search", "ccr_ray.inference.evaluate", "ccr_ray.inference.index",
    # the retrieval service's core: Ray lives only in ccr_ray/serve/app.py (the Serve deployment)
    "ccr_ray.serve", "ccr_ray.serve.service", "ccr_ray.serve.images", "ccr_ray.serve.page", "ccr_ray.serve.batching",
    "ccr_ray.serve.haproxy_bind",
    # converters: parsing, image checks and shard writing; only ccr_ray.data.ingest runs them on Ray
    "ccr_ray.data.converters", "ccr_ray.data.converters.records", "ccr_ray.data.converters.shards",
    "ccr_ray.data.converters.report", "ccr_ray.data.converters.seeds", "ccr_ray.data.converters.cc300k",
    "ccr_ray.data.converters.multi30k", "ccr_ray.data.converters.xtd10", "ccr_ray.data.converters.xflickrco",
    "ccr_ray.data.converters.coco_cn",
]
RAY_FREE_DIRS = ["models", "features", "importers"]  # every module in these folders, including ones added later
RAY_FREE_EXCEPT = {"ccr_ray.features.build"}  # the cache's Ray Data build

# The layers, lowest first. A module may import modules of its own layer or of lower ones, never of a higher one.
# A module belongs to the layer of the longest entry it equals or lies under.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["ccr_ray", "ccr_ray._compat", "ccr_ray.config", "ccr_ray.storage", "ccr_ray.ray_utils"]),
    ("stage table", ["ccr_ray.stages"]),
    ("text, images, data layout", ["ccr_ray.tokenization", "ccr_ray.plots", "ccr_ray.data", "ccr_ray.data.schema",
                                   "ccr_ray.data.transforms", "ccr_ray.data.grammar", "ccr_ray.data.scenes",
                                   "ccr_ray.data.synthetic",
                                   # packaged encoders -> Hugging Face folders (numpy, tokenizers, safetensors)
                                   "ccr_ray.importers"]),
    ("torch-free inference", ["ccr_ray.runtime"]),
    ("models", ["ccr_ray.models", "ccr_ray.losses", "ccr_ray.optim", "ccr_ray.eval", "ccr_ray.eval.metrics"]),
    ("checkpoints", ["ccr_ray.checkpoint"]),
    ("data pipelines, cache, evaluation, inference", [
        "ccr_ray.features", "ccr_ray.data.preprocess", "ccr_ray.data.local", "ccr_ray.data.pipeline",
        "ccr_ray.data.converters", "ccr_ray.data.ingest", "ccr_ray.eval.retrieval", "ccr_ray.eval.evaluate",
        "ccr_ray.inference"]),
    ("training", ["ccr_ray.train"]),
    ("applications", ["ccr_ray.tune", "ccr_ray.export", "ccr_ray.serve", "ccr_ray.recipes", "ccr_ray.cli"]),
]


def ray_free_modules():
    mods = set(RAY_FREE)
    for folder in RAY_FREE_DIRS:
        for path in (PACKAGE / folder).glob("*.py"):
            mods.add(f"ccr_ray.{folder}.{path.stem}".replace(".__init__", ""))
    return sorted(mods - RAY_FREE_EXCEPT)


def all_modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def internal_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules `path` imports anywhere in its source (`from a import b` names a.b when b is a
    module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("ccr_ray"):
                out.add(name)
    return out


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > best:
                best, index = len(entry), i
    assert index is not None, f"{module} is in no layer: add it to LAYERS"
    return index


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
            for a, deps in sorted(graph.items()) for b in sorted(deps) if layer_of(b) > layer_of(a)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), and self-imports."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: internal_imports(path, modules) - {name} for name, path in modules.items()}


def test_every_module_is_in_a_layer_and_imports_only_its_own_or_lower_layers():
    graph = import_graph()
    for module in graph:
        layer_of(module)
    assert not layering_violations(graph), "\n".join(layering_violations(graph))


def test_the_package_has_no_import_cycles():
    found = cycles(import_graph())
    assert not found, found


def test_the_layer_and_cycle_checks_can_fail():
    graph = {"ccr_ray.models.ccr": {"ccr_ray.train.loop"}, "ccr_ray.train.loop": set()}
    assert layering_violations(graph) == ["ccr_ray.models.ccr (models) imports ccr_ray.train.loop (training)"]
    assert cycles({"ccr_ray.config": {"ccr_ray.stages"}, "ccr_ray.stages": {"ccr_ray.config"}}) == [
        ["ccr_ray.config", "ccr_ray.stages"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


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


# A serving install has no torch, open_clip or transformers: the service and the index must not import them.
TORCH_FREE = ["ccr_ray.serve.app", "ccr_ray.serve.service", "ccr_ray.inference.index", "ccr_ray.inference.search"]
TORCH_BLOCKER = """
import sys
BLOCKED = ("torch", "open_clip", "transformers", "torchvision", "timm", "safetensors")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this process")
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("module", TORCH_FREE)
def test_serving_modules_import_without_torch(module):
    code = TORCH_BLOCKER + f"import {module}\n" + \
        "print(sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_the_torch_blocker_blocks():
    result = subprocess.run([sys.executable, "-c", TORCH_BLOCKER + "import ccr_ray.export.onnx_export"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode != 0 and "blocked" in result.stderr


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
