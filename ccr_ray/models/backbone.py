r"""The frozen backbone, built by open_clip from a named model, a packaged preset, a JSON file or a local Hugging
Face encoder folder, and the one seam the rest of the library uses to run it.

Two kinds of English text tower sit behind the seam:
  * open_clip's CLIP text transformer (causal, learned positions, ln_final, pooled at EOT / [SEP], projected);
  * a Hugging Face encoder (open_clip's `text_cfg.hf_model_name` towers, e.g. roberta-ViT-B-32, or a bare HF
    folder such as all-MiniLM-L6-v2: a text-only backbone with no image tower). Its config dict is stored in the
    model config (`text_cfg.hf_config`), so a checkpoint rebuilds it without the folder; the folder's tokenizer is
    the English tokenizer (`tokenization.english_tokenizer_folder`).

Nothing downloads: weights come from a local file (`pretrained`), else the model starts from random init
(the embedded default trains its tiny backbone in the `clip` stage).

    tower_of(name)           which parameter group (image_tower / text_tower / logit_scale) a backbone weight is in
    encode_image(clip, px)   the image tower's embedding        \  plain functions: the model, the frozen-feature
    encode_text_en(clip, x)  the English text tower's embedding /  cache and the exporter all run these
    text_tower(clip, sep)    the text tower as a `TextTower`: what adapters are inserted into (models/ccr.py)
Nothing outside this module knows how the text tower is built (blocks, masks, pooling, projection) or which kind
it is.
"""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ccr_ray._compat import ensure_torchvision_importable
from ccr_ray.config import resolve_package_path
from ccr_ray.models.multilingual import masked_mean
from ccr_ray.stages import IMAGE_TOWER, LOGIT_SCALE, TEXT_TOWER

ensure_torchvision_importable()
import open_clip  # noqa: E402  (must follow the torchvision patch)

PRESETS_DIR = Path(__file__).parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


HF_CONFIG = "hf_config"  # text_cfg key (ours): the HF model config dict, so the tower rebuilds without its folder
HF_CONTEXT = 77  # an HF tower's token context unless the model config says otherwise (open_clip's default)
HF_ENCODERS = ("bert", "roberta", "xlm-roberta")  # BERT-style encoders: embeddings + encoder.layer, open_clip's poolers


def backbone_model_config(name: str, hf_model: str = "") -> dict[str, Any]:
    """open_clip model config dict for a packaged preset, a local Hugging Face encoder folder (text-only), a JSON
    file or an open_clip model name. An HF text tower is resolved against a local folder (`hf_model`, else the
    config's own `hf_model_name`): its config.json is embedded and its tokenizer named; nothing downloads."""
    name = resolve_package_path(name)
    preset = PRESETS_DIR / f"{name}.json"
    path = Path(name).expanduser()
    if preset.exists():
        cfg = json.loads(preset.read_text())
    elif path.is_dir():
        cfg = _text_only_config(path)
    elif path.suffix == ".json":
        if not path.exists():
            raise FileNotFoundError(f"model.backbone.name: no model config file {path}")
        cfg = json.loads(path.read_text())
    else:
        cfg = copy.deepcopy(open_clip.get_model_config(name))
        if cfg is None:
            raise ValueError(
                f"model.backbone.name: {name!r} is neither a packaged preset ({', '.join(list_presets())}), a local "
                f"Hugging Face model folder, a JSON file nor an open_clip model (e.g. ViT-B-32, roberta-ViT-B-32)"
            )
    if is_hf_config(cfg):
        cfg = _resolve_hf_text(cfg, resolve_package_path(hf_model) if hf_model else "")
    return cfg


def is_hf_config(model_cfg: dict[str, Any]) -> bool:
    """Whether the model config's text tower is a Hugging Face encoder (open_clip's `text_cfg.hf_model_name`)."""
    return bool(model_cfg.get("text_cfg", {}).get("hf_model_name"))


def text_width(model_cfg: dict[str, Any]) -> int:
    """The text tower's width (its token vectors' size) from a resolved model config."""
    text = model_cfg.get("text_cfg", {})
    if HF_CONFIG in text:
        return int(text[HF_CONFIG]["hidden_size"])
    return int(text.get("width", 512))


def has_image_config(model_cfg: dict[str, Any]) -> bool:
    """Whether the model config builds an image tower (a text-only backbone has none)."""
    return bool(model_cfg.get("vision_cfg"))


def _sentence_pooling(folder: Path) -> str | None:
    """The pooling a sentence-transformers folder declares (modules.json -> Pooling config), as open_clip's
    pooler name; None when the folder does not say (then the architecture's default, open_clip's arch_dict)."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return None
    for module in json.loads(modules.read_text()):
        if module.get("type", "").endswith("Pooling"):
            config = folder / module.get("path", "") / "config.json"
            if config.is_file():
                pooling = json.loads(config.read_text())
                if pooling.get("pooling_mode_mean_tokens"):
                    return "mean_pooler"
                if pooling.get("pooling_mode_cls_token"):
                    return "cls_last_hidden_state_pooler"
                raise ValueError(f"{config}: only mean or CLS pooling is supported")
    return None


def _text_only_config(folder: Path) -> dict[str, Any]:
    """A text-only backbone from a Hugging Face encoder folder: its English text tower, no image tower, no
    projection (the embedding is the tower's pooled output, e.g. all-MiniLM-L6-v2's 384-d mean pool)."""
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"model.backbone.name: {folder} is a folder but not a Hugging Face model folder "
                                "(no config.json)")
    width = int(json.loads(config.read_text())["hidden_size"])
    return {"embed_dim": width, "text_cfg": {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder),
                                             "hf_pooler_type": _sentence_pooling(folder), "hf_proj_type": None}}


def _resolve_hf_text(cfg: dict[str, Any], hf_model: str) -> dict[str, Any]:
    """Embed the HF tower's config and name its local tokenizer folder; a config that already embeds one (a
    checkpoint's) is returned as it is."""
    cfg = copy.deepcopy(cfg)
    text = cfg["text_cfg"]
    if HF_CONFIG in text:
        return cfg
    folder = Path(hf_model or text["hf_model_name"]).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model.backbone.hf_model: the text tower is the Hugging Face model {text['hf_model_name']!r} and nothing "
            f"is downloaded; set model.backbone.hf_model to a local folder with its config.json and tokenizer "
            f"({folder} has no config.json)")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        raise FileNotFoundError(f"model.backbone.hf_model: {folder} has no tokenizer (tokenizer.json / vocab.txt); "
                                "the English captions are read with the tower's own tokenizer")
    text[HF_CONFIG] = json.loads((folder / "config.json").read_text())
    model_type = text[HF_CONFIG].get("model_type")
    if model_type not in HF_ENCODERS:
        raise ValueError(f"model.backbone: the Hugging Face model in {folder} is a {model_type!r}; the text tower seam "
                         f"runs encoders of type {', '.join(HF_ENCODERS)}")
    text.setdefault("hf_pooler_type", "mean_pooler")  # open_clip's CLIPTextCfg defaults for keys left out
    text.setdefault("hf_proj_type", "mlp")
    text["hf_pooler_type"] = text["hf_pooler_type"] or open_clip.hf_configs.arch_dict[model_type]["pooler"]
    text["hf_tokenizer_name"] = str(folder.resolve())
    text["hf_model_pretrained"] = False  # weights come from model.backbone.pretrained, as for every backbone
    limit = int(text[HF_CONFIG].get("max_position_embeddings", HF_CONTEXT))
    if text[HF_CONFIG].get("model_type") in ("roberta", "xlm-roberta"):
        limit -= int(text[HF_CONFIG].get("pad_token_id", 1)) + 1  # RoBERTa's positions start after its pad index
    text["context_length"] = min(int(text.get("context_length", HF_CONTEXT)), limit)
    return cfg


class HFTextCLIP(nn.Module):
    """open_clip's CustomTextCLIP layout (`visual`, `text`, `logit_scale`: the same state-dict names, so its
    checkpoints load) with a Hugging Face encoder as the text tower, built from the config dict the model config
    carries (no folder, no download). `visual` is None for a text-only backbone.

    The tower runs without dropout: it is frozen in every multilingual stage, and its English outputs are the
    distillation targets, which must not be noisy (the CLIP text transformer has no dropout either)."""

    def __init__(self, model_cfg: dict[str, Any], quick_gelu: bool):
        super().__init__()
        from open_clip.hf_model import HFTextEncoder
        from transformers import AutoConfig

        embed_dim = int(model_cfg["embed_dim"])
        text = model_cfg["text_cfg"]
        self.visual = (open_clip.model._build_vision_tower(embed_dim, model_cfg["vision_cfg"], quick_gelu)
                       if has_image_config(model_cfg) else None)
        values = dict(text[HF_CONFIG])
        model_type = values.pop("model_type")
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
            if key in values:
                values[key] = 0.0
        config = AutoConfig.for_model(model_type, **values)
        config._attn_implementation = "eager"  # the seam passes an additive padding mask (export-safe, any dtype)
        pooler = text["hf_pooler_type"]
        self.text = HFTextEncoder(text["hf_model_name"], output_dim=embed_dim, config=config, pooler_type=pooler,
                                  proj_type=text.get("hf_proj_type"))
        if pooler != "cls_pooler" and getattr(self.text.transformer, "pooler", None) is not None:
            self.text.transformer.pooler = None  # unused, and absent from open_clip's checkpoints of such towers
        self.pooler_type = pooler
        self.context_length = int(text.get("context_length", HF_CONTEXT))
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        self.logit_bias = None  # as CustomTextCLIP without SigLIP's bias (open_clip's loader reads it)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        if self.visual is None:
            raise ValueError("this backbone has no image tower (a text-only backbone: text stages and text-to-text "
                             "evaluation only)")
        return self.visual(image)


def build_clip(model_cfg: dict[str, Any], quick_gelu: bool = True) -> nn.Module:
    """A randomly initialised backbone from a model config dict (weights are loaded separately): open_clip's CLIP,
    or an `HFTextCLIP` when the text tower is a Hugging Face encoder."""
    cfg = copy.deepcopy(model_cfg)
    cfg.pop("custom_text", None)
    cfg["quick_gelu"] = bool(cfg.get("quick_gelu", False) or quick_gelu)
    if is_hf_config(cfg):
        if HF_CONFIG not in cfg["text_cfg"]:
            raise ValueError("an HF text tower's model config must be resolved first (backbone_model_config)")
        model = HFTextCLIP(cfg, cfg["quick_gelu"])
    else:
        model = open_clip.model.CLIP(**cfg)
    preprocess = preprocess_from_model_config(model_cfg)
    if preprocess is not None:
        open_clip.model.set_model_preprocess_cfg(model, preprocess)
    return model


def has_image_tower(clip: nn.Module) -> bool:
    return getattr(clip, "visual", None) is not None


def preprocess_from_model_config(model_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """CLIP's eval preprocessing for a model config, without building the model (the driver needs it); None for
    a backbone without an image tower."""
    if not has_image_config(model_cfg):
        return None
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


def _read_state(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state = torch.load(file, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _load_hf_tower_weights(model: HFTextCLIP, state: dict[str, torch.Tensor], file: Path) -> None:
    """A Hugging Face weights file (BertModel / RobertaModel keys, maybe under a `bert.` / `roberta.` prefix) into
    the HF text tower. Tensors the tower does not build (an unused pooler, MLM heads, traced buffers) are
    ignored; a tower weight the file lacks is an error."""
    tower = model.text.transformer
    prefix = f"{tower.config.model_type}."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    own = tower.state_dict()
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise ValueError(f"model.backbone.pretrained: {file} lacks {len(missing)} weights of the "
                         f"{tower.config.model_type} text tower, e.g. {missing[:3]}")
    tower.load_state_dict({k: state[k] for k in own}, strict=True)


def load_backbone_weights(model: nn.Module, path: str) -> None:
    """Load local backbone weights: an open_clip checkpoint (.pt/.bin/.safetensors), an OpenAI TorchScript
    archive, or, for an HF text tower, the Hugging Face model's own weights file (that tower alone).

    Plain checkpoints load with `weights_only=True` (never an arbitrary unpickle). OpenAI's archives are
    TorchScript, read with `torch.jit.load`, which runs TorchScript, not pickled Python objects.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model.backbone.pretrained: no such file {file}")
    if isinstance(model, HFTextCLIP):
        state = _read_state(file)
        if not any(k.startswith(("text.", "visual.")) for k in state):  # the HF model's own file
            _load_hf_tower_weights(model, state, file)
            return
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


def preprocess_config(model: nn.Module) -> dict[str, Any] | None:
    """Image preprocessing parameters of the model (open_clip's PreprocessCfg as a plain dict); None without an
    image tower."""
    if not has_image_tower(model):
        return None
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
    """The English text tower's own path (its tokenizer's ids, any length <= the context, so trimmed batches and
    dynamic-length ONNX graphs work). [B, T] -> [B, D], unnormalised."""
    return text_tower(clip).encode_english(ids)


def text_tower(clip, sep_id: int | None = None) -> TextTower:
    """The backbone's text tower behind the seam: open_clip's CLIP text transformer or a Hugging Face encoder.
    `sep_id`: the multilingual tokenizer's [SEP] (where a CLIP tower pools target-language captions)."""
    return HFTextTower(clip) if isinstance(clip, HFTextCLIP) else CLIPTextTower(clip, sep_id)


class TextTower:
    """The frozen text tower as adapters see it: embed token vectors, run block i, pool, project.

    A view over the backbone's own modules (it owns no parameters, so the model's state dict is unchanged):
    `CCRModel` inserts adapters between the blocks; DASD's semantic disentangling runs the first blocks alone.
    Two implementations: `CLIPTextTower` and `HFTextTower`; everything else sees only this interface.

        width, num_layers, context_length, embed_dim, english_pad_id
        embed(vectors)                  token vectors [B, T, width] -> the first block's input (+ positions, ...)
        attention(ids, mask)            what every block takes besides its input (a mask)
        run_block(i, x, attention) / run_blocks(x, start, stop, attention)
        pool(x, ids, mask)              the sentence vector [B, width] (mask: 1 = real token)
        finish(x, ids, mask)            after the last block: final norm, pool, projection -> [B, D]
        encode_english(ids)             the untouched English path from the tower's own token ids
        word_embeddings()               the English vocabulary's input rows [V_en, width] (vocabulary transfer)
        after_load()                    tensors adapters may initialise from (text_projection [width, D])
    """

    width: int
    num_layers: int
    context_length: int
    embed_dim: int
    english_pad_id: int

    def embed(self, vectors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attention(self, ids: torch.Tensor, mask: torch.Tensor | None):
        raise NotImplementedError

    def run_block(self, layer: int, x: torch.Tensor, attention) -> torch.Tensor:
        raise NotImplementedError

    def run_blocks(self, x: torch.Tensor, start: int, stop: int, attention) -> torch.Tensor:
        for layer in range(start, stop):
            x = self.run_block(layer, x, attention)
        return x

    def pool(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def encode_english(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def word_embeddings(self) -> torch.Tensor:
        raise NotImplementedError

    def after_load(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class CLIPTextTower(TextTower):
    """open_clip's CLIP text transformer: causal mask, learned positions, ln_final, the sentence pooled at the first
    [SEP] of the multilingual tokenizer (English: at EOT, the largest id), text_projection."""

    english_pad_id = 0

    def __init__(self, clip, sep_id: int | None):
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

    def embed(self, vectors: torch.Tensor) -> torch.Tensor:
        """Token vectors [B, T, width] (the multilingual table's, projected) + the tower's positions."""
        return vectors + self.clip.positional_embedding[: vectors.shape[1]]

    def attention(self, ids: torch.Tensor, mask: torch.Tensor | None):
        """CLIP's causal mask (padding after [SEP] never reaches the pooled token)."""
        return causal_mask(self.clip, ids.shape[1])

    def run_block(self, layer: int, x: torch.Tensor, attention) -> torch.Tensor:
        return self.clip.transformer.resblocks[layer](x, attn_mask=attention)

    def pool(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The sentence's token: the first [SEP]. [B, T, width] -> [B, width]."""
        return gather_positions(x, first_position_of(ids, self.sep_id))

    def finish(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """After the last block: ln_final, pool, text_projection -> [B, D]."""
        return _project(self.clip, self.pool(self.clip.ln_final(x), ids, mask))

    def encode_english(self, ids: torch.Tensor) -> torch.Tensor:
        """As open_clip's `encode_text`, pooled at EOT (the largest id in each row)."""
        clip = self.clip
        x = clip.token_embedding(ids) + clip.positional_embedding[: ids.shape[1]]
        x = self.run_blocks(x, 0, self.num_layers, self.attention(ids, None))
        eot = ids.to(torch.float32).argmax(dim=-1)  # float argmax: first maximum, export-safe
        return _project(clip, gather_positions(clip.ln_final(x), eot))

    def word_embeddings(self) -> torch.Tensor:
        return self.clip.token_embedding.weight

    def after_load(self) -> dict[str, torch.Tensor]:
        return {"text_projection": self.clip.text_projection.detach()}


class HFTextTower(TextTower):
    """A Hugging Face encoder (BERT, RoBERTa, ... as open_clip's HFTextEncoder holds it): its own embeddings
    pipeline (positions, token type 0, LayerNorm) on the given token vectors, bidirectional attention with padding
    masked out, its pooling (mean over real tokens, or CLS, per the tower's config) and open_clip's projection
    (none for a text-only backbone). English: the same, from the word embeddings of the tower's own ids, the
    mask derived from padding as open_clip's HFTextEncoder does."""

    def __init__(self, clip: HFTextCLIP):
        self.clip = clip
        self.encoder = clip.text.transformer
        self.config = self.encoder.config
        layers = open_clip.hf_configs.arch_dict.get(self.config.model_type, {}).get("config_names", {})
        self.layers = getattr(self.encoder.encoder, layers.get("layer_attr", "layer"))
        self.english_pad_id = int(self.config.pad_token_id or 0)

    @property
    def width(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    @property
    def embed_dim(self) -> int:
        return int(self.clip.text.output_dim)

    def embed(self, vectors: torch.Tensor) -> torch.Tensor:
        """Token vectors [B, T, width] through the tower's embedding pipeline in place of its word embeddings."""
        return self.encoder.embeddings(inputs_embeds=vectors)

    def attention(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Additive [B, 1, 1, T] mask: 0 on real tokens, the float minimum on padding (as transformers' eager
        attention takes it)."""
        real = (ids != self.english_pad_id) if mask is None else mask
        return (1.0 - real[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min

    def run_block(self, layer: int, x: torch.Tensor, attention) -> torch.Tensor:
        out = self.layers[layer](x, attention_mask=attention)
        return out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple, 5 the tensor

    def pool(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        kind = self.clip.pooler_type
        if kind == "mean_pooler":
            return masked_mean(x, (ids != self.english_pad_id) if mask is None else mask)
        if kind == "cls_pooler" and getattr(self.encoder, "pooler", None) is not None:
            return self.encoder.pooler(x)  # open_clip's ClsPooler takes the transformer's pooler output
        if kind in ("cls_pooler", "cls_last_hidden_state_pooler"):
            return x[:, 0]
        raise ValueError(f"HF text tower: pooler {kind!r} is not supported (mean_pooler, cls_pooler, "
                         "cls_last_hidden_state_pooler)")

    def finish(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.clip.text.proj(self.pool(x, ids, mask))

    def encode_english(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.english_pad_id
        x = self.encoder.embeddings(input_ids=ids)
        x = self.run_blocks(x, 0, self.num_layers, self.attention(ids, mask))
        return self.finish(x, ids, mask)

    def word_embeddings(self) -> torch.Tensor:
        return self.encoder.embeddings.word_embeddings.weight

    def after_load(self) -> dict[str, torch.Tensor]:
        proj = self.clip.text.proj
        if isinstance(proj, nn.Identity):
            return {"text_projection": torch.eye(self.width)}
        if isinstance(proj, nn.Linear) and proj.bias is None:
            return {"text_projection": proj.weight.detach().t()}
        raise ValueError("this HF text tower's projection is not linear; there is no matrix to copy "
                         "(model.dasd.sr_init=copy_text_projection)")
