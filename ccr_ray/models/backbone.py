r"""The frozen CLIP backbone, built by open_clip from a named model, a packaged preset or a JSON file, and the one
seam the rest of the library uses to run it.

Nothing downloads: weights come from a local file (`pretrained`), else the model starts from random init
(the embedded default trains its tiny backbone in the `clip` stage).

    tower_of(name)           which parameter group (image_tower / text_tower / logit_scale) a backbone weight is in
    encode_image(clip, px)   the image tower's embedding        \  plain functions: the model, the frozen-feature
    encode_text_en(clip, x)  the English text tower's embedding /  cache and the exporter all run these
    text_tower(clip, sep)    the text tower as a `TextTower`: what adapters are inserted into (models/ccr.py)
Nothing outside this module knows how the text tower is built (blocks, masks, pooling, projection).
"""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from ccr_ray._compat import ensure_torchvision_importable
from ccr_ray.stages import IMAGE_TOWER, LOGIT_SCALE, TEXT_TOWER

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


# ---------------------------------------------------------------------------------------------- the seam

def tower_of(name: str) -> str:
    """The parameter group of a backbone weight (open_clip state-dict name): CCRModel.param_groups and the
    frozen-feature cache's fingerprints both ask this, so they can never disagree."""
    if name.startswith("visual."):
        return IMAGE_TOWER
    if name in ("logit_scale", "logit_bias"):
        return LOGIT_SCALE
    return TEXT_TOWER


def first_position_of(ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Index of the first `token_id` in each row of ids [B, T] -> [B].

    Export-safe: a float comparison + argmax (ONNX ArgMax returns the first maximum by default); no `nonzero`,
    no argmax over integer token ids (open_clip's EOT trick, which assumes EOT has the largest id).
    """
    return (ids == token_id).to(torch.float32).argmax(dim=-1)


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, T, D], positions [B] -> x[b, positions[b]] as [B, D]."""
    index = positions.view(-1, 1, 1).expand(-1, 1, x.shape[-1])
    return torch.gather(x, 1, index).squeeze(1)


def _project(clip, pooled: torch.Tensor) -> torch.Tensor:
    proj = clip.text_projection
    return proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj


def encode_image(clip, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] normalised pixels -> [B, D], unnormalised."""
    return clip.encode_image(pixels)


def encode_text_en(clip, ids: torch.Tensor) -> torch.Tensor:
    """CLIP's own text path (as open_clip's `encode_text`) for any sequence length <= the context, so trimmed
    batches and dynamic-length ONNX graphs work: pooled at EOT, the largest id in each row. [B, T] -> [B, D]."""
    x = clip.token_embedding(ids) + clip.positional_embedding[: ids.shape[1]]
    x = run_text_blocks(clip, x, 0, len(clip.transformer.resblocks))
    eot = ids.to(torch.float32).argmax(dim=-1)  # float argmax: first maximum, export-safe
    return _project(clip, gather_positions(clip.ln_final(x), eot))


def run_text_blocks(clip, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    mask = causal_mask(clip, x.shape[1])
    for block in clip.transformer.resblocks[start:stop]:
        x = block(x, attn_mask=mask)
    return x


class TextTower:
    """The frozen text tower as adapters see it: embed token vectors, run block i, pool, project.

    A view over the backbone's own modules (it owns no parameters, so the model's state dict is unchanged):
    `CCRModel` inserts adapters between the blocks; DASD's semantic disentangling runs the first blocks alone.
    This implementation is open_clip's CLIP text transformer (causal mask, learned positions, ln_final, the
    sentence pooled at the first [SEP] of the multilingual tokenizer, text_projection)."""

    def __init__(self, clip, sep_id: int):
        if not getattr(clip.transformer, "batch_first", True):
            raise ValueError("the text tower needs an open_clip text transformer with batch_first=True")
        self.clip = clip
        self.sep_id = sep_id

    @property
    def width(self) -> int:
        return self.clip.transformer.width

    @property
    def num_layers(self) -> int:
        return len(self.clip.transformer.resblocks)

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    @property
    def embed_dim(self) -> int:
        proj = self.clip.text_projection
        return proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1]

    @property
    def positional_embedding(self) -> torch.Tensor:
        return self.clip.positional_embedding

    def embed(self, vectors: torch.Tensor) -> torch.Tensor:
        """Token vectors [B, T, width] (the multilingual table's, projected) + the tower's positions."""
        return vectors + self.clip.positional_embedding[: vectors.shape[1]]

    def attention(self, ids: torch.Tensor, mask: torch.Tensor | None):
        """What every block takes besides its input: CLIP's causal mask (padding after [SEP] never reaches it)."""
        return causal_mask(self.clip, ids.shape[1])

    def run_block(self, layer: int, x: torch.Tensor, attention) -> torch.Tensor:
        return self.clip.transformer.resblocks[layer](x, attn_mask=attention)

    def run_blocks(self, x: torch.Tensor, start: int, stop: int, attention) -> torch.Tensor:
        for layer in range(start, stop):
            x = self.run_block(layer, x, attention)
        return x

    def pool(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The sentence's token: the first [SEP]. [B, T, width] -> [B, width]."""
        return gather_positions(x, first_position_of(ids, self.sep_id))

    def finish(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """After the last block: ln_final, pool, text_projection -> [B, D]."""
        return _project(self.clip, self.pool(self.clip.ln_final(x), ids, mask))

    def after_load(self) -> dict[str, torch.Tensor]:
        """Tensors adapters may initialise from once the backbone weights are in place."""
        return {"text_projection": self.clip.text_projection.detach()}
