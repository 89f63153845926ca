"""The frozen CLIP backbone, built by open_clip from a named model, a packaged preset or a JSON file.

Nothing downloads: weights come from a local file (`pretrained`), else the model starts from random init
(the embedded default trains its tiny backbone in the `clip` stage).
"""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from ccr_ray._compat import ensure_torchvision_importable

ensure_torchvision_importable()
import open_clip  # noqa: E402  (must follow the torchvision patch)

PRESETS_DIR = Path(__file__).parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def backbone_model_config(name: str) -> dict[str, Any]:
    """open_clip model config dict for a packaged preset, a JSON file or an open_clip model name."""
    preset = PRESETS_DIR / f"{name}.json"
    if preset.exists():
        return json.loads(preset.read_text())
    path = Path(name).expanduser()
    if path.suffix == ".json":
        if not path.exists():
            raise FileNotFoundError(f"model.backbone.name: no model config file {path}")
        return json.loads(path.read_text())
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(
            f"model.backbone.name: {name!r} is neither a packaged preset ({', '.join(list_presets())}), "
            f"a JSON file nor an open_clip model (e.g. ViT-B-32, ViT-B-16)"
        )
    return copy.deepcopy(cfg)


def build_clip(model_cfg: dict[str, Any], quick_gelu: bool = True) -> open_clip.CLIP:
    """A randomly initialised open_clip CLIP from a config dict (weights are loaded separately)."""
    cfg = copy.deepcopy(model_cfg)
    cfg.pop("custom_text", None)
    cfg["quick_gelu"] = bool(cfg.get("quick_gelu", False) or quick_gelu)
    model = open_clip.model.CLIP(**cfg)
    open_clip.model.set_model_preprocess_cfg(model, preprocess_from_model_config(model_cfg))
    return model


def preprocess_from_model_config(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """CLIP's eval preprocessing for a model config, without building the model (the driver needs it)."""
    size = model_cfg["vision_cfg"].get("image_size", 224)
    pp = model_cfg.get("preprocess_cfg", {})
    return {
        "size": int(size if isinstance(size, int) else size[0]),
        "mode": "RGB",
        "mean": [float(v) for v in pp.get("mean", open_clip.constants.OPENAI_DATASET_MEAN)],
        "std": [float(v) for v in pp.get("std", open_clip.constants.OPENAI_DATASET_STD)],
        "interpolation": pp.get("interpolation", "bicubic"),
        "resize_mode": pp.get("resize_mode", "shortest"),
        "fill_color": 0,
    }


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def load_backbone_weights(model: open_clip.CLIP, path: str) -> None:
    """Load a local CLIP checkpoint: open_clip format (.pt/.bin/.safetensors) or an OpenAI TorchScript archive.

    Plain checkpoints load with `weights_only=True` (never an arbitrary unpickle). OpenAI's archives are
    TorchScript, read with `torch.jit.load`, which runs TorchScript, not pickled Python objects.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model.backbone.pretrained: no such file {file}")
    if file.suffix != ".safetensors" and _is_torchscript_archive(file):
        state = torch.jit.load(str(file), map_location="cpu").state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            state.pop(key, None)
        # tracing makes non-persistent buffers (open_clip's attn_mask) part of the archive's state
        persistent = model.state_dict().keys()
        for name, _ in model.named_buffers():
            if name not in persistent:
                state.pop(name, None)
        import tempfile

        from safetensors.torch import save_file

        # through a temporary safetensors file (not beside the user's weights, whose folder may be read-only) so
        # open_clip's own loader applies its key fix-ups and position-embedding resize
        with tempfile.TemporaryDirectory(prefix="ccr-clip-") as tmp:
            converted = Path(tmp) / "converted.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, str(converted))
            open_clip.load_checkpoint(model, str(converted), strict=True)
        return
    open_clip.load_checkpoint(model, str(file), strict=True, weights_only=True)


def preprocess_config(model: open_clip.CLIP) -> dict[str, Any]:
    """Image preprocessing parameters of the model (open_clip's PreprocessCfg as a plain dict)."""
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    size = cfg.get("size", model.visual.image_size)
    cfg["size"] = int(size if isinstance(size, int) else size[0])
    cfg["mean"] = [float(v) for v in cfg.get("mean", open_clip.constants.OPENAI_DATASET_MEAN)]
    cfg["std"] = [float(v) for v in cfg.get("std", open_clip.constants.OPENAI_DATASET_STD)]
    cfg.setdefault("interpolation", "bicubic")
    cfg.setdefault("resize_mode", "shortest")
    return cfg


def causal_mask(model: open_clip.CLIP, length: int) -> torch.Tensor:
    """CLIP's additive causal mask cropped to `length` tokens."""
    return model.attn_mask[:length, :length]
