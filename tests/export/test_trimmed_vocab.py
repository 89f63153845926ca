"""A model with a trimmed token table (model.text.trim_vocab): the export carries the vocabulary map, and the
torch-free runtime tokenizes to the same trimmed ids, so its embeddings are PyTorch's (parity on real captions,
including pieces outside the kept vocabulary, which read as <unk>)."""

from __future__ import annotations

import os

import numpy as np
import torch

from ccr_ray import checkpoint as ckpt
from ccr_ray.data import schema
from ccr_ray.stages import resolve_config
from ccr_ray.tokenization import VOCAB_MAP_FILE, TargetTokenizer
from ccr_ray.train.plan import plan_stage
from ccr_ray.train.state import TrainState
from tests.conftest import micro_config
from tests.export.conftest import load_cli


def test_a_trimmed_model_exports_and_the_runtime_reads_the_same_ids(micro_data, tmp_path):
    from ccr_ray.runtime import Encoder

    home = str(tmp_path / "home")
    clip = resolve_config("clip", micro_config(micro_data, home))
    TrainState.create(clip, os.path.join(micro_data, "tokenizer"), None, "cpu").save(
        clip.stage_dir() / "checkpoint", with_optimizer=False)
    cfg = resolve_config("nlt", micro_config(micro_data, home, languages=("de",), model={"text": {"trim_vocab": True}}))
    plan = plan_stage(cfg)
    state = TrainState.create(cfg, plan.tokenizer_dir, plan.parent, "cpu")
    folder = state.save(tmp_path / "checkpoint", with_optimizer=False)
    assert load_cli("to_onnx").main([str(folder), "--out", str(tmp_path / "onnx"), "--graphs", "text"]) == 0
    assert (tmp_path / "onnx" / "tokenizer" / VOCAB_MAP_FILE).is_file()
    encoder = Encoder(tmp_path / "onnx")
    table = schema.read_split_table(micro_data, "test", ["de", "zh"], with_images=False)
    texts = [caps[0] for caps in table[schema.captions_column("de")].to_pylist()[:8]]
    texts += [caps[0] for caps in table[schema.captions_column("zh")].to_pylist()[:2]]  # pieces German lacks: <unk>
    model, _ = ckpt.load_checkpoint(folder)
    tok = TargetTokenizer(ckpt.tokenizer_of(folder), model.context_length)
    ids, mask = tok(texts)
    assert ids.max() < model.embedding.token_embedding.weight.shape[0]
    model.eval()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask), "de"), dim=-1).numpy()
    got = encoder.encode_text(texts, "de")
    assert np.allclose(got, expected, atol=1e-5), np.abs(got - expected).max()
