"""The frozen towers' weights as the cache sees them: loaded from the stage's parent checkpoint or a CLIP weights
file (local or on shared storage), and fingerprinted per tower."""

from __future__ import annotations

from ccr_ray.features import CacheError
from ccr_ray.stages import INPUT_TOWERS
from ccr_ray.storage import Location, localize


def _is_checkpoint_folder(weights: str) -> bool:
    from ccr_ray.checkpoint import MODEL_FILE

    return (Location.of(weights) / MODEL_FILE).is_file()


def load_frozen_clip(weights: str, clip_cfg: dict, quick_gelu: bool):
    """The stage's CLIP with its starting weights, fp32, eval mode, no gradients (exactly what training freezes):
    built as `build_model` builds it, loaded from the parent checkpoint's clip.* tensors or the pretrained file."""
    from ccr_ray.models import backbone

    clip = backbone.build_clip(clip_cfg, quick_gelu=quick_gelu)
    if _is_checkpoint_folder(weights):
        clip.load_state_dict(load_clip_state(weights, clip_cfg, quick_gelu), strict=True)
    else:
        backbone.load_backbone_weights(clip, localize(_weights_file(weights)))
    clip.float().eval().requires_grad_(False)
    return clip


def _weights_file(weights: str) -> Location:
    from ccr_ray.checkpoint import MODEL_FILE

    loc = Location.of(weights)
    if (loc / MODEL_FILE).is_file():
        loc = loc / MODEL_FILE
    if not loc.is_file():
        raise CacheError(f"{weights}: no weights to encode with (neither a ccr-ray checkpoint folder nor a file)")
    return loc


def load_clip_state(weights: str, clip_cfg: dict, quick_gelu: bool) -> dict:
    """The CLIP weights the stage starts from, named as in open_clip's state dict."""
    if _is_checkpoint_folder(weights):  # a ccr-ray checkpoint folder: the CCRModel's clip.* tensors
        from safetensors import safe_open

        file = _weights_file(weights)
        try:
            with safe_open(localize(file), framework="pt") as f:
                return {k[len("clip."):]: f.get_tensor(k) for k in f.keys() if k.startswith("clip.")}
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
            raise CacheError(f"{file}: not a readable safetensors file (truncated or corrupt? {err})") from None
    return load_frozen_clip(weights, clip_cfg, quick_gelu).state_dict()


def tower_digests(state: dict, features: tuple[str, ...]) -> dict[str, str]:
    """sha256 of each cached tower's weights (open_clip names; `backbone.tower_of` says which are whose)."""
    from ccr_ray.checkpoint import tensor_fingerprint
    from ccr_ray.models import backbone

    out = {}
    for name in features:
        tower = INPUT_TOWERS[name]
        tensors = {k: v for k, v in state.items() if backbone.tower_of(k) == tower}
        if not tensors:
            raise CacheError(f"the backbone weights hold no {tower} tensors")
        out[tower] = tensor_fingerprint(tensors)
    return out
