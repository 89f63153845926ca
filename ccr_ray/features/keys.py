"""What a frozen-feature cache holds and its fingerprint. Plain data and hashing; torch only inside the functions
that read weights.

What a stage may take from the cache follows from the stage table alone (`cacheable_inputs`): the image embedding
when the stage needs images and does not train the image tower; the English teacher embedding when it needs
`text_en` and does not train the text tower. With the packaged table: le, finetune-all -> image; nlt, cla ->
text_en; cma -> both; clip and finetune-en train the towers, so the cache does not apply to them.

Fingerprint (sha256 over named components, each a sha256): format version, cached inputs, CLIP architecture
(open_clip config + QuickGELU), the weights of each cached tower (`tensor_fingerprint`), image preprocessing (for
image features), the English tokenizer (BPE vocabulary file hash + context length, for teacher features) and the
dataset split's identity (each shard's relative path, size and mtime).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ccr_ray.data import schema
from ccr_ray.data.transforms import ImageTransform
from ccr_ray.features import CacheError
from ccr_ray.features.weights import _weights_file, load_clip_state, tower_digests
from ccr_ray.stages import INPUT_TOWERS
from ccr_ray.storage import Location
from ccr_ray.tokenization import english_tokenizer_folder

FORMAT_VERSION = 1  # bump when the encoding or the layout changes: every older cache then reads as stale
KEY_CHARS = 16  # fingerprint characters in the folder name (cache.json holds the full one)


def cacheable_inputs(stage) -> tuple[str, ...]:
    """Stage inputs computed by towers the stage does not train: exactly what a cache may replace."""
    return stage.frozen_inputs


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class CacheRequest:
    """Everything that determines a cache's content. Plain data: it pickles into Ray actors cheaply."""

    dataset_root: str
    split: str
    features: tuple[str, ...]  # cached stage inputs, in INPUT_TOWERS order: "image", "text_en"
    clip_cfg: dict  # open_clip model config (as the checkpoint stores it)
    quick_gelu: bool  # model.backbone.quick_gelu of the stage (build_clip ORs it with the config's)
    weights: str  # the stage's parent checkpoint folder, or a local CLIP weights file (model.backbone.pretrained)
    preprocess: dict  # image preprocessing of the model (ImageTransform config)
    context_length: int  # English token ids per caption
    cache_dir: str  # where caches live: {cache_dir}/{fingerprint[:16]}

    @property
    def effective_quick_gelu(self) -> bool:
        return bool(self.clip_cfg.get("quick_gelu", False) or self.quick_gelu)

    @property
    def embed_dim(self) -> int:
        return int(self.clip_cfg["embed_dim"])

    def describe(self) -> dict:
        return {"dataset_root": self.dataset_root, "split": self.split, "features": list(self.features),
                "weights": self.weights, "preprocess": self.preprocess, "context_length": self.context_length,
                "quick_gelu": self.effective_quick_gelu}


@dataclass(frozen=True)
class CacheKey:
    fingerprint: str  # sha256 over the components
    components: dict[str, str]  # name -> sha256 of that input

    @property
    def short(self) -> str:
        return self.fingerprint[:KEY_CHARS]


def _stat(loc: Location) -> tuple[int, int]:
    info = loc.info()
    return int(info.size), int(info.mtime_ns or 0)


@functools.lru_cache(maxsize=16)
def _weights_digests(weights: str, stat: tuple[int, int], clip_cfg_json: str, quick_gelu: bool,
                     features: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    # memoised per weights file (path + size + mtime): planning a stage twice fingerprints its weights once
    state = load_clip_state(weights, json.loads(clip_cfg_json), quick_gelu)
    return tuple(sorted(tower_digests(state, features).items()))


@functools.lru_cache(maxsize=8)
def _english_tokenizer_digest(context_length: int, folder: str | None = None) -> str:
    from ccr_ray.tokenization import clip_bpe_vocab_file, ensure_tokenizer_json

    if folder:  # an HF text tower's own tokenizer
        vocab = hashlib.sha256(ensure_tokenizer_json(folder).read_bytes()).hexdigest()
        return _digest({"tokenizer_json_sha256": vocab, "context_length": context_length})
    vocab = hashlib.sha256(clip_bpe_vocab_file().read_bytes()).hexdigest()
    return _digest({"bpe_vocab_sha256": vocab, "context_length": context_length})


def dataset_identity(root: str, split: str) -> list[dict]:
    """Each shard of the split: path relative to the root, size, mtime (moving the dataset keeps the cache;
    rewriting a shard invalidates it)."""
    out = []
    for file in schema.split_files(root, split):
        loc = Location.of(file)
        size, mtime = _stat(loc)
        out.append({"file": loc.relative_to(root), "bytes": size, "mtime_ns": mtime})
    return out


def cache_key(request: CacheRequest) -> CacheKey:
    """Compute the fingerprint of what the cache would hold (reads the weights; memoised per file)."""
    unknown = set(request.features) - set(INPUT_TOWERS)
    if unknown or not request.features:
        raise CacheError(f"features: {sorted(unknown) or 'none'}; a cache holds some of {', '.join(INPUT_TOWERS)}")
    components = {
        "format": f"v{FORMAT_VERSION}",
        "features": ",".join(request.features),
        "architecture": _digest({"clip_cfg": request.clip_cfg, "quick_gelu": request.effective_quick_gelu}),
        "data": _digest(dataset_identity(request.dataset_root, request.split)),
    }
    components.update(dict(_weights_digests(request.weights, _stat(_weights_file(request.weights)),
                                            json.dumps(request.clip_cfg, sort_keys=True), request.quick_gelu,
                                            request.features)))
    if "image" in request.features:
        components["preprocess"] = _digest(ImageTransform.from_config(request.preprocess).to_config())
    if "text_en" in request.features:
        components["tokenizer"] = _english_tokenizer_digest(request.context_length,
                                                            english_tokenizer_folder(request.clip_cfg))
    return CacheKey(fingerprint=_digest(components), components=components)
