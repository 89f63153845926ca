"""Checkpoints: Ray-agnostic folder, save -> load reproduces outputs, atomic writes, parent inheritance."""

import json
import os

import pytest
import torch

from ccr_ray import checkpoint as ckpt
from ccr_ray.train import loop
from ccr_ray.train.state import TrainState


def batch_for(state, n=8):
    from ccr_ray.tokenization import target_tokenizer

    tok = target_tokenizer(state.artifacts.tokenizer_dir, state.model.context_length)
    ids, mask = tok(["Ein großer roter Kreis oben links"] * n)
    en = torch.zeros(n, 77, dtype=torch.long)
    en[:, :4] = torch.tensor([49406, 1929, 1237, 49407])
    return {"text_ids": torch.from_numpy(ids), "text_mask": torch.from_numpy(mask), "text_en_ids": en,
            "pixels": torch.randn(n, 3, 32, 32)}


def stream_batch_for(state, n=8):
    """batch_for in the training stream's layout: one column set per language (the loop picks the step's)."""
    b = batch_for(state, n)
    return {f"{k}_{lang}": v for lang in state.train_languages for k, v in b.items() if k != "pixels"}


def test_save_load_reproduces_outputs(micro_cfg, micro_data, tmp_path):
    cfg = micro_cfg("nlt")
    state = TrainState.create(cfg, os.path.join(micro_data, "tokenizer"), None, "cpu")
    state.train_step(batch_for(state), "de")
    folder = state.save(tmp_path / "ckpt", metrics={"val/mR": 1.0})
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "optimizer.safetensors", "state.json",
                                         "tokenizer"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp folders left behind
    model, meta = ckpt.load_checkpoint(folder)
    assert meta.stage == "nlt" and meta.step == 1 and meta.metrics == {"val/mR": 1.0}
    b = batch_for(state, 3)
    state.model.eval()
    model.eval()
    with torch.no_grad():
        for lang in ("de", "zh"):
            x = state.model.encode_text(b["text_ids"], b["text_mask"], lang)
            y = model.encode_text(b["text_ids"], b["text_mask"], lang)
            assert (x - y).abs().max() < 1e-6, (x - y).abs().max()
        for (n, w), (_, v) in zip(state.model.state_dict().items(), model.state_dict().items()):
            assert torch.equal(w, v), n
        assert torch.allclose(state.model.encode_image(b["pixels"]), model.encode_image(b["pixels"]), atol=1e-6)
    # the folder is plain safetensors + JSON: no pickle anywhere
    json.loads((folder / "config.json").read_text())
    with open(folder / "model.safetensors", "rb") as f:
        assert b"\x80\x04" not in f.read(64)


def test_resume_continues_like_an_uninterrupted_run(micro_cfg, micro_data, tmp_path):
    cfg = micro_cfg("nlt")
    tok = os.path.join(micro_data, "tokenizer")
    a = TrainState.create(cfg, tok, None, "cpu")
    batches = [stream_batch_for(a) for _ in range(4)]
    loop.run(a, iter(batches[:2]), steps=2)
    a.save(tmp_path / "mid")
    loop.run(a, iter(batches[2:]))
    b_state = TrainState.create(cfg, tok, None, "cpu")
    b_state.restore(tmp_path / "mid")
    assert b_state.step == 2
    loop.run(b_state, iter(batches[2:]))
    for (n, x), (_, y) in zip(a.model.state_dict().items(), b_state.model.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), n


def test_atomic_overwrite_keeps_a_complete_checkpoint(micro_cfg, micro_data, tmp_path):
    cfg = micro_cfg("nlt")
    state = TrainState.create(cfg, os.path.join(micro_data, "tokenizer"), None, "cpu")
    state.save(tmp_path / "c", metrics={"v": 1})
    state.step = 5
    state.save(tmp_path / "c", metrics={"v": 2})
    assert ckpt.read_meta(tmp_path / "c").step == 5
    assert os.listdir(tmp_path) == ["c"]


def test_inherit_backbone_only_vs_all(micro_cfg, micro_data, tmp_path):
    tok = os.path.join(micro_data, "tokenizer")
    parent = TrainState.create(micro_cfg("nlt"), tok, None, "cpu")
    with torch.no_grad():
        for p in parent.model.parameters():
            p.add_(1.0)
    parent.save(tmp_path / "parent")
    child = TrainState.create(micro_cfg("nlt"), tok, None, "cpu").model
    ckpt.load_weights_into(child, tmp_path / "parent", inherit="backbone")
    assert torch.equal(child.clip.ln_final.weight, parent.model.clip.ln_final.weight)
    assert not torch.equal(child.embedding.proj.weight, parent.model.embedding.proj.weight)
    ckpt.load_weights_into(child, tmp_path / "parent", inherit="all")
    assert torch.equal(child.embedding.proj.weight, parent.model.embedding.proj.weight)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="missing model.safetensors"):
        ckpt.read_meta(tmp_path)


def test_fingerprint_changes_with_weights():
    a = {"w": torch.ones(3)}
    assert ckpt.tensor_fingerprint(a) == ckpt.tensor_fingerprint({"w": torch.ones(3)})
    assert ckpt.tensor_fingerprint(a) != ckpt.tensor_fingerprint({"w": torch.ones(3) * 2})
    # 0-d tensors (CLIP's logit_scale) hash too, by value
    assert ckpt.tensor_fingerprint({"s": torch.tensor(4.6)}) != ckpt.tensor_fingerprint({"s": torch.tensor(4.7)})
