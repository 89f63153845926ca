"""Model contracts: parameter counts, English path = open_clip, export-safe pooling, freezing by groups."""

import copy

import pytest
import torch

from ccr_ray.config import ModelConfig
from ccr_ray.models import backbone
from ccr_ray.models.ccr import CCRModel, build_model
from ccr_ray.models.mla import MLAAdapters
from ccr_ray.stages import STAGES
from ccr_ray.tokenization import TokenizerInfo
from tests.conftest import MICRO_PRESET

TOKENS = TokenizerInfo(vocab_size=50, pad_id=0, cls_id=2, sep_id=3)


def micro_model(languages=("de", "fr"), adapter="mla") -> CCRModel:
    cfg = ModelConfig(languages=list(languages), adapter=adapter)
    cfg.dasd.core, cfg.dasd.latent_dim = 4, 16
    cfg.backbone.name = MICRO_PRESET
    cfg.text.embed_dim = 24
    cfg.mla.hidden = 8
    torch.manual_seed(0)
    return build_model(cfg, TOKENS)


def target_ids(batch=3, length=12):
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        n = 4 + 2 * b
        ids[b, 0] = TOKENS.cls_id
        ids[b, 1:n - 1] = torch.randint(5, 50, (n - 2,))
        ids[b, n - 1] = TOKENS.sep_id
        mask[b, :n] = 1
    return ids, mask


def test_acquirer_parameters_at_real_size():
    adapters = MLAAdapters(["de"], layers=12, width=512, hidden=256)
    assert sum(p.numel() for p in adapters.parameters()) == 3_154_944  # spec 2.2
    five = MLAAdapters(["de", "fr", "cs", "zh", "ja"], layers=12, width=512, hidden=256)
    assert sum(p.numel() for p in five.parameters()) == 5 * 3_154_944


def test_vitb32_multilingual_path_counts():
    cfg = ModelConfig(languages=["de"])
    cfg.backbone.name = "ViT-B-32"
    model = build_model(cfg, TokenizerInfo(vocab_size=119_547, pad_id=0, cls_id=101, sep_id=102))
    groups = {k: sum(p.numel() for _, p in v) for k, v in model.param_groups().items()}
    assert groups["token_embedding"] == 91_812_096
    assert groups["embedding_proj"] == 393_728
    assert groups["adapters"] == 3_154_944


def test_param_groups_partition_every_parameter():
    model = micro_model()
    seen = [id(p) for params in model.param_groups().values() for _, p in params]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))


def test_a_token_table_offset_belongs_to_its_language_alone_and_starts_at_zero():
    """A language added to a trained model reads the frozen table through an offset of its own: zero at the start
    (its embeddings are those of the table alone, bit for bit), in its language's parameters and, when it is the
    language being added, in the group the add stage trains; the other languages never read it."""
    plain = micro_model(("de", "fr"))
    cfg = ModelConfig(languages=["de", "fr"], adapter="mla")
    cfg.backbone.name, cfg.text.embed_dim, cfg.mla.hidden = MICRO_PRESET, 24, 8
    cfg.text.language_offsets = ["fr"]
    torch.manual_seed(0)
    offset = build_model(cfg, TOKENS)
    offset.load_state_dict(plain.state_dict(), strict=False)  # everything but the (zero) offset
    ids, mask = target_ids()
    with torch.no_grad():
        for lang in ("de", "fr"):
            assert torch.equal(plain.encode_text(ids, mask, lang), offset.encode_text(ids, mask, lang)), lang
        offset.embedding.token_offsets["fr"].weight.normal_()
        assert torch.equal(plain.encode_text(ids, mask, "de"), offset.encode_text(ids, mask, "de"))
        assert not torch.allclose(plain.encode_text(ids, mask, "fr"), offset.encode_text(ids, mask, "fr"))
    name = "embedding.token_offsets.fr.weight"
    assert name in offset.language_parameters()["fr"] and name not in offset.language_parameters()["shared"]
    assert name in dict(offset.param_groups(new_languages=["fr"])["new_language_adapters"])
    assert name in dict(offset.param_groups()["adapters"])  # a language's own part, not the shared table
    trainable = {n for n, _ in offset.set_trainable(["new_language_adapters"], new_languages=["fr"])}
    assert name in trainable and all(".fr." in n for n in trainable)


def test_english_path_equals_open_clip_encode_text_and_is_length_independent():
    model = micro_model().eval()
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[0, :5] = torch.tensor([49406, 320, 1929, 539, 49407])
    ids[1, :3] = torch.tensor([49406, 1237, 49407])
    with torch.no_grad():
        ours = model.encode_text_en(ids)
        ref = model.clip.encode_text(ids)
        trimmed = model.encode_text_en(ids[:, :6])
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(trimmed, ref, atol=1e-5)


def test_target_path_pools_at_sep_and_ignores_padding():
    model = micro_model().eval()
    ids, mask = target_ids()
    with torch.no_grad():
        full = model.encode_text(ids, mask, "de")
        longer = model.encode_text(torch.nn.functional.pad(ids, (0, 20)), torch.nn.functional.pad(mask, (0, 20)), "de")
        changed = ids.clone()
        changed[0, 8:] = 7  # tokens after row 0's [SEP] (position 3) do not matter: causal mask
        after = model.encode_text(changed, mask, "de")
        other = model.encode_text(ids, mask, "fr")
    assert torch.allclose(full, longer, atol=1e-5)
    assert torch.allclose(full[0], after[0], atol=1e-5)
    assert not torch.allclose(full, other)  # languages have their own acquirers


def test_unknown_language_fails_clearly():
    model = micro_model()
    ids, mask = target_ids()
    with pytest.raises(KeyError, match="no adapters for language 'ja'"):
        model.encode_text(ids, mask, "ja")


@pytest.mark.parametrize("stage", list(STAGES))
def test_gradients_reach_only_the_stage_trainable_parameters(stage):
    spec = STAGES[stage]
    model = micro_model(adapter=spec.adapter or "mla")
    trainable = {n for n, _ in model.set_trainable(spec.trains)}
    ids, mask = target_ids(4)
    batch = {"pixels": torch.randn(4, 3, 32, 32), "text_ids": ids, "text_mask": mask,
             "text_en_ids": torch.randint(1, 49000, (4, 10))}
    batch["text_en_ids"][:, -1] = 49407
    out = model(batch, "de", spec.inputs)
    sum(v.float().pow(2).sum() for v in out.values()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad, stage
    assert with_grad <= trainable, sorted(with_grad - trainable)[:5]
    # frozen groups really are frozen; the 'fr' acquirers get nothing from a 'de' batch
    assert not any(n.startswith(("adapters.acquirers.fr", "adapters.adapters.fr")) for n in with_grad)


def test_build_clip_presets_and_preprocess_config():
    cfg = backbone.backbone_model_config("tiny-vit")
    clip = backbone.build_clip(cfg)
    pp = backbone.preprocess_config(clip)
    assert pp == backbone.preprocess_from_model_config(cfg)
    assert pp["size"] == 64 and len(pp["mean"]) == 3
    with pytest.raises(ValueError, match="model.backbone.name"):
        backbone.backbone_model_config("no-such-model")


def test_load_backbone_weights_round_trip(tmp_path):
    from safetensors.torch import save_file

    a, b = micro_model(), micro_model()
    with torch.no_grad():
        for p in a.clip.parameters():
            p.add_(0.5)
    save_file({k: v.contiguous() for k, v in a.clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    backbone.load_backbone_weights(b.clip, str(tmp_path / "clip.safetensors"))
    for (n, x), (_, y) in zip(a.clip.state_dict().items(), b.clip.state_dict().items()):
        assert torch.equal(x, y), n
    with pytest.raises(FileNotFoundError, match="model.backbone.pretrained"):
        backbone.load_backbone_weights(b.clip, str(tmp_path / "missing.pt"))


def test_load_backbone_weights_from_a_torchscript_archive(tmp_path):
    """OpenAI's CLIP files are traced TorchScript archives: read with torch.jit, nothing written beside them."""
    a, b = micro_model(), micro_model()
    with torch.no_grad():
        for p in a.clip.parameters():
            p.add_(0.25)
    size = a.clip.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    example = (torch.zeros(1, 3, size, size), torch.zeros(1, a.clip.context_length, dtype=torch.long))
    archive = tmp_path / "ViT-micro.pt"
    torch.jit.save(torch.jit.trace(a.clip.eval(), example, strict=False, check_trace=False), str(archive))
    assert backbone._is_torchscript_archive(archive)
    backbone.load_backbone_weights(b.clip, str(archive))
    for (n, x), (_, y) in zip(a.clip.state_dict().items(), b.clip.state_dict().items()):
        assert torch.equal(x, y), n
    assert [p.name for p in tmp_path.iterdir()] == ["ViT-micro.pt"]


def test_deepcopy_keeps_outputs():
    model = micro_model().eval()
    ids, mask = target_ids()
    with torch.no_grad():
        assert torch.allclose(model.encode_text(ids, mask, "de"), copy.deepcopy(model).encode_text(ids, mask, "de"))
