"""The torchvision workaround: needed exactly when torchvision's ops library cannot load, a no-op otherwise."""

import subprocess
import sys

from ccr_ray import _compat

PROBE = "import importlib.util, sys; {setup}\nimport open_clip; print('ok')"


def run(setup: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True, text=True,
                          timeout=120)


def test_open_clip_imports_with_the_patch():
    result = run("from ccr_ray._compat import ensure_torchvision_importable; ensure_torchvision_importable()")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_patch_is_applied_only_when_the_ops_library_fails():
    result = subprocess.run([sys.executable, "-c", (
        "from ccr_ray import _compat; loads = _compat.torchvision_ops_load(); "
        "applied = _compat.ensure_torchvision_importable(); print(loads, applied)")],
        capture_output=True, text=True, timeout=120)
    loads, applied = result.stdout.split()
    assert applied == str(loads == "False")  # patched iff the library did not load
    if loads == "False":
        # and then it is really needed: without it open_clip does not import here
        bare = run("")
        assert bare.returncode != 0 and "torchvision::nms does not exist" in bare.stderr


def test_idempotent_and_no_op_once_torchvision_is_imported():
    _compat.ensure_torchvision_importable()
    import torchvision  # noqa: F401

    assert _compat.torchvision_ops_load() is True
    first = _compat.ensure_torchvision_importable()
    assert _compat.ensure_torchvision_importable() == first
