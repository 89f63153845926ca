"""Ray-agnostic checkpoints: a folder of safetensors + JSON, loadable without a cluster, never unpickled.

    model.safetensors       CCRModel state dict (everything needed for inference)
    aux.safetensors         training-only modules (DASD's discriminator); absent for MLA
    optimizer.safetensors   optimizer moving averages, for resuming (absent in exported stage outputs)
    config.json             the resolved ExperimentConfig + the open_clip model config (an HF text tower's config
                            embedded) + tokenizer ids + image preprocessing, so the model rebuilds from this
                            folder alone
    state.json              stage, step, validation metrics, best score so far, training log
    tokenizer/              copy of the non-English tokenizer folder
    tokenizer_en/           copy of the English tokenizer, when it is an HF text tower's (CLIP's BPE ships with
                            open_clip); the model config names it when the checkpoint is read

`save_checkpoint` writes into a temporary sibling folder and swaps it in with renames (storage.staged_folder), so
a reader never sees a half-written checkpoint; `copy_checkpoint` publishes one to any storage the same way (on an
object store state.json is written last, and `read_meta` requires it). Checkpoints on shared storage are read
where they are (`read_meta`) or through a local copy (`load_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ccr_ray.config import ExperimentConfig
from ccr_ray.models.ccr import CCRModel, build_model
from ccr_ray.storage import Location, localize, publish_folder, staged_folder
from ccr_ray.tokenization import TokenizerInfo, copy_tokenizer_files, english_tokenizer_folder

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
AUX_FILE = "aux.safetensors"
OPTIM_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
TOKENIZER_DIR = "tokenizer"
EN_TOKENIZER_DIR = "tokenizer_en"

log = logging.getLogger(__name__)


class CheckpointError(FileNotFoundError):
    """A checkpoint folder is missing or incomplete; the message names the path."""


@dataclass
class CheckpointMeta:
    config: dict[str, Any]  # ExperimentConfig.to_dict()
    clip_cfg: dict[str, Any]
    tokens: dict[str, int]
    preprocess: dict[str, Any]
    stage: str
    step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    best_score: float | None = None
    best_step: int | None = None
    log: list[dict] = field(default_factory=list)

    @property
    def experiment(self) -> ExperimentConfig:
        return ExperimentConfig.from_dict(self.config)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_checkpoint(path: str | os.PathLike, model: CCRModel, meta: CheckpointMeta, tokenizer_dir: str | None = None,
                    aux: dict[str, torch.Tensor] | None = None, optimizer: dict[str, torch.Tensor] | None = None,
                    optimizer_scalars: dict | None = None) -> Path:
    with staged_folder(path) as tmp:
        save_file(_contiguous(model.state_dict()), str(tmp / MODEL_FILE), metadata={"format": "ccr_ray"})
        if aux:
            save_file(_contiguous(aux), str(tmp / AUX_FILE))
        if optimizer is not None:
            save_file(_contiguous(optimizer), str(tmp / OPTIM_FILE))
        config = {"format_version": FORMAT_VERSION, "experiment": meta.config, "clip_cfg": meta.clip_cfg,
                  "tokens": meta.tokens, "preprocess": meta.preprocess,
                  # what each language reads alone, and what all share: a changed language shows as a changed
                  # fingerprint (jobs/languages.py compares two checkpoints)
                  "fingerprints": language_fingerprints(model)}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        state = {"stage": meta.stage, "step": meta.step, "metrics": meta.metrics, "best_score": meta.best_score,
                 "best_step": meta.best_step, "log": meta.log, "optimizer_scalars": optimizer_scalars or {}}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if tokenizer_dir and Path(tokenizer_dir).is_dir():  # its tokenizer files: an M-BERT folder also holds weights
            copy_tokenizer_files(tokenizer_dir, tmp / TOKENIZER_DIR)
        english = english_tokenizer_folder(meta.clip_cfg)
        if english:  # only the tokenizer files: an HF model folder also holds the weights
            copy_tokenizer_files(english, tmp / EN_TOKENIZER_DIR)
    return Path(path)


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike | Location, drop_optimizer: bool = True
                    ) -> Location:
    """Publish a local checkpoint folder at `dst` (a local path or shared storage) so that no reader sees it
    half-written: renames on local disk; on an object store state.json goes last (read_meta needs it)."""
    return publish_folder(src, dst, marker=STATE_FILE, ignore=(OPTIM_FILE,) if drop_optimizer else ())


def read_meta(path: str | os.PathLike | Location) -> CheckpointMeta:
    """The checkpoint's config and state (a local folder or one on shared storage)."""
    folder = Location.of(path)
    for name in (MODEL_FILE, CONFIG_FILE, STATE_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: not a ccr-ray checkpoint (missing {name})")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        state = json.loads((folder / STATE_FILE).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{folder}: malformed {CONFIG_FILE} or {STATE_FILE} ({err})") from None
    if english_tokenizer_folder(config["clip_cfg"]) and (folder / EN_TOKENIZER_DIR).is_dir():
        # the checkpoint's own copy, not the folder it was trained from (which need not exist here)
        # (on an object store, its URI: load_checkpoint reads through a local copy, whose read_meta rewrites it)
        english = folder / EN_TOKENIZER_DIR
        config["clip_cfg"]["text_cfg"]["hf_tokenizer_name"] = str(english.local_path().resolve()) \
            if english.is_local else english.uri
    return CheckpointMeta(config=config["experiment"], clip_cfg=config["clip_cfg"], tokens=config["tokens"],
                          preprocess=config["preprocess"], stage=state["stage"], step=state["step"],
                          metrics=state.get("metrics", {}), best_score=state.get("best_score"),
                          best_step=state.get("best_step"), log=state.get("log", []))


def is_checkpoint(path: str | os.PathLike | Location) -> bool:
    return (Location.of(path) / STATE_FILE).is_file() and (Location.of(path) / MODEL_FILE).is_file()


def tokenizer_of(path: str | os.PathLike | Location) -> str | None:
    folder = Location.of(path) / TOKENIZER_DIR
    return folder.uri if folder.is_dir() else None


def read_tensors(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file; a truncated or corrupt one is a CheckpointError naming the file, not a traceback."""
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: no such file") from None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt? {err})") from None


def load_checkpoint(path: str | os.PathLike | Location, device: str | torch.device = "cpu"
                    ) -> tuple[CCRModel, CheckpointMeta]:
    """Rebuild the model from the folder alone and load its weights (strict); a checkpoint on shared storage is
    read through a local copy (storage.localize)."""
    path = localize(path)
    meta = read_meta(path)
    cfg = meta.experiment
    model = build_model(cfg.model, TokenizerInfo(**meta.tokens), clip_cfg=meta.clip_cfg)
    model.load_state_dict(read_tensors(Path(path) / MODEL_FILE), strict=True)
    return model.to(device), meta


def load_tensors(path: str | os.PathLike, name: str) -> dict[str, torch.Tensor] | None:
    """A local checkpoint's tensor file, or None when it has none."""
    file = Path(path) / name
    return read_tensors(file) if file.exists() else None


def load_optimizer_scalars(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text()).get("optimizer_scalars", {})


def load_weights_into(model: CCRModel, path: str | os.PathLike, inherit: str = "all") -> dict[str, list[str]]:
    """Initialise `model` from a parent checkpoint.

    inherit="backbone": only the CLIP weights (`clip.*`); the multilingual path keeps its fresh init.
    inherit="all": every weight the parent has; adapters (and token-table offsets) for languages the parent lacks
    stay freshly initialised (reported), parent weights the child has no place for are ignored (reported).
    """
    state = read_tensors(Path(path) / MODEL_FILE)
    if inherit == "backbone":
        state = {k: v for k, v in state.items() if k.startswith("clip.")}
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    state = {k: v for k, v in state.items() if k in own}
    missing = sorted(k for k in own if k not in state)
    allowed_missing = ("adapters.", "embedding.token_offsets.") if inherit == "all" else ("adapters.", "embedding.")
    bad = [k for k in missing if not k.startswith(allowed_missing)]
    if bad:
        raise CheckpointError(f"{path}: parent checkpoint lacks {len(bad)} weights, e.g. {bad[:3]}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, the model expects "
                                  f"{tuple(own[key].shape)} (different backbone, tokenizer or adapter size?)")
    model.load_state_dict(state, strict=False)
    if missing and inherit == "all":
        log.info("initialised fresh (not in parent): %d tensors, e.g. %s", len(missing), missing[:3])
    if unexpected:
        log.info("ignored parent tensors: %d, e.g. %s", len(unexpected), unexpected[:3])
    return {"missing": missing, "unexpected": unexpected}


def language_fingerprints(model: CCRModel) -> dict[str, str]:
    """{"shared": ..., lang: ...}: `tensor_fingerprint` of every part `CCRModel.language_parameters` names."""
    return {part: tensor_fingerprint(tensors) for part, tensors in model.language_parameters().items()}


def read_fingerprints(path: str | os.PathLike | Location) -> dict[str, str]:
    """The fingerprints a checkpoint records (older checkpoints: computed from its weights)."""
    folder = Location.of(path)
    recorded = json.loads((folder / CONFIG_FILE).read_text()).get("fingerprints")
    if recorded:
        return recorded
    model, _ = load_checkpoint(folder)
    return language_fingerprints(model)


def tensor_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes, dtypes and bytes (sorted): identifies weights independently of file layout."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        # reshape first: a 0-d tensor (logit_scale) cannot be viewed as bytes
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
