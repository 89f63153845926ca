"""CCRModel: a frozen backbone (CLIP, or any English text tower open_clip can hold) plus a multilingual text path
with per-language adapters (MLA or DASD).

One text-encoder interface for both methods, so training, evaluation, export and tune treat them alike:

    encode_image(pixels)                      -> [B, D]   the image tower (absent from a text-only backbone)
    encode_text_en(ids)                       -> [B, D]   the untouched English text tower (never uses adapters),
                                                          ids from its own tokenizer (`english_tokenizer`)
    encode_text(ids, mask, lang)              -> [B, D]   adapted text tower for target language `lang`

Outputs are unnormalised (the MSE distillation compares raw 512-d features, spec 2.3); callers normalise for
cosine similarity. Freezing goes through `param_groups()`, never through parameter-name substrings.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ccr_ray.models import backbone
from ccr_ray.models.adapters import TextAdapters
from ccr_ray.models.mla import MLAAdapters
from ccr_ray.models.multilingual import MultilingualEmbedding
from ccr_ray.stages import IMAGE_TOWER, TEXT_TOWER
from ccr_ray.tokenization import TokenizerInfo, english_tokenizer_folder


class CCRModel(nn.Module):
    def __init__(self, clip: nn.Module, embedding: MultilingualEmbedding, adapters: TextAdapters, tokens: TokenizerInfo,
                 context_length: int, english_tokenizer: str | None = None):
        super().__init__()
        self.clip = clip
        self.embedding = embedding
        self.adapters = adapters
        self.tokens = tokens
        self.context_length = context_length
        # the English tower's tokenizer folder (None = CLIP's BPE), as the backbone config states it
        self.english_tokenizer = english_tokenizer
        # a view over clip's text modules (no parameters of its own): the seam adapters are inserted into
        self.text_tower = backbone.text_tower(clip, tokens.sep_id)

    # ------------------------------------------------------------------ properties
    @property
    def languages(self) -> list[str]:
        return list(self.adapters.languages)

    @property
    def width(self) -> int:
        return self.text_tower.width

    @property
    def num_layers(self) -> int:
        return self.text_tower.num_layers

    @property
    def has_images(self) -> bool:
        """False for a text-only backbone: no image tower, evaluation by text-to-text retrieval."""
        return backbone.has_image_tower(self.clip)

    @property
    def english_pad_id(self) -> int:
        """Padding id of the English tokenizer (trailing columns of it can be cut from a batch)."""
        return self.text_tower.english_pad_id

    # ------------------------------------------------------------------ encoders
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return backbone.encode_image(self.clip, pixels)

    def encode_text_en(self, ids: torch.Tensor) -> torch.Tensor:
        return backbone.encode_text_en(self.clip, ids)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None, lang: str,
                    return_aux: bool = False, token_offset: torch.Tensor | None = None):
        """`token_offset`: the rows of `lang`'s token-table offset, looked up by the caller (the ONNX graph of all
        languages); by default the embedding looks them up itself."""
        if lang not in self.adapters.languages:
            raise KeyError(f"no adapters for language {lang!r}; this model has {', '.join(self.languages)}")
        tower = self.text_tower
        x = tower.embed(self.embedding(ids, lang, token_offset))  # [B, T, width]
        context = self.adapters.prepare(tower, x, ids, mask, lang)
        attention = tower.attention(ids, mask)
        for layer in range(tower.num_layers):
            x = tower.run_block(layer, x, attention)
            x = self.adapters.after_block(layer, x, lang, context)
        features = tower.finish(x, ids, mask)
        if return_aux:
            return features, self.adapters.aux_outputs(context)
        return features

    # ------------------------------------------------------------------ training forward
    def forward(self, batch: dict[str, torch.Tensor], lang: str | None, inputs: Iterable[str]) -> dict:
        """Features a stage's losses need. Frozen towers run without autograd (saves memory and time).

        A batch from the frozen-feature cache (data/feature_cache.py) carries `image_features` / `text_en_features`
        instead of `pixels` / `text_en_ids`: what `encode_image` / `encode_text_en` would return for them, computed
        once with these frozen weights. They are used as they are; a tower that trains cannot take them."""
        inputs = set(inputs)
        out: dict[str, torch.Tensor] = {}

        def precomputed(key: str, tower: str) -> torch.Tensor:
            if self._trains(tower):
                raise ValueError(f"the batch carries precomputed {key}, but the tower that computes them is being "
                                 "trained: cached features would be stale after the first step")
            return batch[key]

        if "image" in inputs:
            if "image_features" in batch:
                out["image"] = precomputed("image_features", IMAGE_TOWER)
            else:
                with torch.set_grad_enabled(torch.is_grad_enabled() and self._trains(IMAGE_TOWER)):
                    out["image"] = self.encode_image(batch["pixels"])
        if "text_en" in inputs:
            if "text_en_features" in batch:
                out["text_en"] = precomputed("text_en_features", TEXT_TOWER)
            else:
                with torch.set_grad_enabled(torch.is_grad_enabled() and self._trains(TEXT_TOWER)):
                    out["text_en"] = self.encode_text_en(batch["text_en_ids"])
        if "text_target" in inputs:
            features, aux = self.encode_text(batch["text_ids"], batch.get("text_mask"), lang, return_aux=True)
            out["text_target"] = features
            out.update(aux)
        return out

    def _trains(self, group: str) -> bool:
        """Whether any parameter of a parameter group (param_groups) is being trained."""
        return any(p.requires_grad for _, p in self.param_groups()[group])

    # ------------------------------------------------------------------ parameter groups
    def param_groups(self, new_languages: Iterable[str] = ()) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Every parameter in exactly one named group; stages say which groups train (stages.py).

        `new_languages`: languages being added to a trained model; the adapter parameters that belong to them
        alone (under the adapters' per-language dicts, and their token-table offsets) form `new_language_adapters`
        instead of `adapters`."""
        named = dict(self.named_parameters())
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {
            "image_tower": [], "text_tower": [], "logit_scale": [], "token_embedding": [], "embedding_proj": [],
            "adapters": [], "new_language_adapters": [],
        }
        new = tuple(prefix for lang in new_languages for prefix in self.language_prefixes(lang))
        own = tuple(prefix for lang in self.languages for prefix in self.language_prefixes(lang))
        for name, param in named.items():
            if name.startswith("clip."):
                groups[backbone.tower_of(name[len("clip."):])].append((name, param))
            elif new and name.startswith(new):
                groups["new_language_adapters"].append((name, param))
            elif name.startswith(own):  # a language's own parts: its adapters, its token-table offset
                groups["adapters"].append((name, param))
            elif name.startswith("embedding.token_embedding."):
                groups["token_embedding"].append((name, param))
            elif name.startswith("embedding."):
                groups["embedding_proj"].append((name, param))
            elif name.startswith("adapters."):
                groups["adapters"].append((name, param))
            else:  # pragma: no cover - a new submodule must be given a group
                raise AssertionError(f"parameter {name} belongs to no group")
        return groups

    def language_parameters(self) -> dict[str, dict[str, torch.Tensor]]:
        """{language: its own parameters} and {"shared": everything else}: what a language reads that no other
        does, and what every language reads (the checkpoint fingerprints each, so anyone can see what changed)."""
        own = {lang: self.language_prefixes(lang) for lang in self.languages}
        out: dict[str, dict[str, torch.Tensor]] = {lang: {} for lang in self.languages}
        out["shared"] = {}
        for name, tensor in self.state_dict().items():
            lang = next((lang for lang, prefixes in own.items() if name.startswith(prefixes)), "shared")
            out[lang][name] = tensor
        return out

    def language_prefixes(self, lang: str) -> tuple[str, ...]:
        """Name prefixes of the parameters `lang` reads and no other language does."""
        return (*(f"adapters.{d}.{lang}." for d in self.adapters.language_dicts()), f"embedding.token_offsets.{lang}.")

    def set_trainable(self, groups: Iterable[str], new_languages: Iterable[str] = ()
                      ) -> list[tuple[str, nn.Parameter]]:
        """requires_grad=True exactly for the named groups; returns the trainable (name, param) pairs.

        (The seeds leave requires_grad on everywhere and simply do not give frozen weights to the optimizer;
        turning it off computes the same update without the frozen weights' gradients.)"""
        wanted = set(groups)
        all_groups = self.param_groups(new_languages)
        unknown = wanted - set(all_groups)
        if unknown:
            raise KeyError(f"unknown parameter groups {sorted(unknown)}; known: {', '.join(all_groups)}")
        frozen = {id(p) for p in self.adapters.frozen_parameters()}
        trainable = []
        for group, params in all_groups.items():
            for name, param in params:
                train = group in wanted and id(param) not in frozen
                param.requires_grad_(train)
                if train:
                    trainable.append((name, param))
        return trainable


# ---------------------------------------------------------------------------------------------- building


def build_adapters(model_cfg, layers: int, width: int, embed_dim: int) -> TextAdapters:
    if model_cfg.adapter == "mla":
        return MLAAdapters(model_cfg.languages, layers, width, model_cfg.mla.hidden)
    if model_cfg.adapter == "dasd":
        from ccr_ray.models.dasd import DASDAdapters

        return DASDAdapters(model_cfg.languages, layers, width, model_cfg.dasd, embed_dim=embed_dim)
    raise ValueError(f"model.adapter: unknown adapter {model_cfg.adapter!r}")


def build_model(model_cfg, tokens: TokenizerInfo, clip_cfg: dict | None = None) -> CCRModel:
    """Build a CCRModel from a `ModelConfig` (random init; weights are loaded by the caller).

    `clip_cfg` is the open_clip model config dict; by default it is resolved from `model_cfg.backbone.name`
    (checkpoints store it, so loading never depends on preset files or an HF model folder)."""
    clip_cfg = clip_cfg or backbone.backbone_model_config(model_cfg.backbone.name, model_cfg.backbone.hf_model)
    clip = backbone.build_clip(clip_cfg, quick_gelu=model_cfg.backbone.quick_gelu)
    tower = backbone.text_tower(clip, tokens.sep_id)
    context = model_cfg.text.context_length or tower.context_length
    if context > tower.context_length:
        raise ValueError(f"model.text.context_length: {context} exceeds the backbone's {tower.context_length} "
                         "positions")
    embedding = MultilingualEmbedding(tokens.vocab_size, model_cfg.text.embed_dim, tower.width, model_cfg.text.init_std,
                                      offset_languages=model_cfg.text.language_offsets)
    adapters = build_adapters(model_cfg, tower.num_layers, tower.width, tower.embed_dim)
    return CCRModel(clip, embedding, adapters, tokens, context, english_tokenizer_folder(clip_cfg))


def load_mbert_embeddings(folder: str) -> torch.Tensor:
    """M-BERT's word-embedding matrix (119,547 x 768) from a local Hugging Face folder, without building BERT."""
    root = Path(folder).expanduser()
    keys = ("bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight")
    st = sorted(root.glob("*.safetensors"))
    if st:
        from safetensors import safe_open

        for file in st:
            with safe_open(str(file), framework="pt") as f:
                for key in keys:
                    if key in f.keys():
                        return f.get_tensor(key)
    for file in sorted(root.glob("*.bin")):
        state = torch.load(file, map_location="cpu", weights_only=True)
        for key in keys:
            if key in state:
                return state[key]
    raise FileNotFoundError(f"model.text.embeddings_init: no word-embedding matrix ({' or '.join(keys)}) in "
                            f"*.safetensors / *.bin under {root}")
