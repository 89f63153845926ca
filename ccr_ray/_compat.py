"""Make `import open_clip` work with the CPU torch wheel and the CUDA-linked torchvision wheel.

`torchvision==0.28.0` is the only release that pins `torch==2.13.0`, and its wheel is linked against CUDA.
With the CPU torch wheel its compiled ops library (`torchvision/_C.so`) fails to load, and then
`import torchvision` dies with `RuntimeError: operator torchvision::nms does not exist` while registering
fake kernels. open_clip, timm and parts of transformers import torchvision, so they die with it
(see ../shared/notes/platform.md).

The fix: declare the two operator schemas torchvision registers fake kernels for, before torchvision is
imported. Only torchvision's compiled ops (nms, roi_align, video/image decoding) stay unavailable; we decode
with PIL and use none of them. Where `_C.so` loads (a matching CUDA torch on a GPU machine) this is a no-op.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_LIBRARY = None  # keep the torch.library.Library alive: dropping it unregisters the schemas
_STATE: dict[str, bool] = {"patched": False}


def torchvision_ops_load() -> bool:
    """True when torchvision's compiled ops library loads (or torchvision is absent or already imported)."""
    if "torchvision" in sys.modules:
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True
    import torch

    folder = os.path.dirname(spec.origin)
    candidates = [f for f in os.listdir(folder) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
    if not candidates:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, candidates[0]))
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> bool:
    """Patch the missing torchvision op schemas if (and only if) its ops library cannot load.

    Returns True when the patch was applied in this process. Safe to call many times.
    """
    global _LIBRARY
    if _STATE["patched"] or torchvision_ops_load():
        return _STATE["patched"]
    import torch

    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _STATE["patched"] = True
    return True
