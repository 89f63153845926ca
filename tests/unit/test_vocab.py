"""The token table beyond a random init: a pretrained table from any Hugging Face folder, vocabulary trimming
(the pieces the data uses, with an id map every consumer applies), vocabulary transfer from the English tower, and
freezing / a learning rate of its own. On the micro dataset and a tiny random BERT the test writes."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from ccr_ray import checkpoint as ckpt
from ccr_ray.data import schema
from ccr_ray.models.vocab_transfer import PieceStyle
from ccr_ray.stages import resolve_config
from ccr_ray.tokenization import VOCAB_MAP_FILE, TargetTokenizer, trim_tokenizer
from ccr_ray.train.plan import StageError, plan_stage
from ccr_ray.train.state import TrainState
from tests.conftest import micro_config
from tests.hf_fixtures import english_captions, write_tiny_bert


@pytest.fixture(scope="module")
def tiny_bert(micro_data, tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("hf") / "tiny-bert", english_captions(micro_data))


def captions(root, split, langs):
    table = schema.read_split_table(root, split, langs, with_images=False)
    return [c for lang in langs for caps in table.column(schema.captions_column(lang)).to_pylist() for c in caps]


def publish_clip(micro_data, home):
    clip = resolve_config("clip", micro_config(micro_data, home))
    TrainState.create(clip, os.path.join(micro_data, "tokenizer"), None, "cpu").save(
        clip.stage_dir() / "checkpoint", with_optimizer=False)


# ------------------------------------------------------------------------------------------- trimming


def test_a_trimmed_tokenizer_keeps_the_pieces_the_texts_use_and_maps_the_rest_to_unk(micro_data, tmp_path):
    source = os.path.join(micro_data, "tokenizer")
    texts = captions(micro_data, "train", ["de"])
    out = trim_tokenizer(source, texts, tmp_path / "trimmed")
    full, trimmed = TargetTokenizer(source, 16), TargetTokenizer(str(out), 16)
    data = json.loads((out / VOCAB_MAP_FILE).read_text())
    kept = np.asarray(data["kept"])
    assert trimmed.vocab_size == len(kept) < full.vocab_size
    assert (np.diff(kept) > 0).all()  # original order
    ids, mask = full(texts[:32])
    tids, tmask = trimmed(texts[:32])
    assert (tmask == mask).all() and (kept[tids] == ids).all()  # every piece the texts use survives, same order
    unk = data["unk_id"]
    assert (trimmed.pad_id, trimmed.cls_id, trimmed.sep_id) == tuple(int(np.flatnonzero(kept == i)[0]) for i in
                                                                     (full.pad_id, full.cls_id, full.sep_id))
    zh = [t for t in captions(micro_data, "train", ["zh"]) if (full([t])[0] != unk).all()][:8]
    zids, _ = trimmed(zh)
    assert (zids == int(np.flatnonzero(kept == unk)[0])).any()  # Chinese pieces the German text lacks: <unk>


def test_trim_vocab_plans_a_trimmed_tokenizer_whose_table_rows_come_from_the_pretrained_table(
        tiny_bert, micro_data, tmp_path):
    """A German-and-French model initialised from a Hugging Face folder's table (the tiny BERT stands in for
    multilingual-e5-small), trimmed: E holds exactly the table's rows of the kept pieces, the checkpoint carries
    the map, and the map is made once."""
    home = str(tmp_path / "home")
    publish_clip(micro_data, home)
    cfg = resolve_config("nlt", micro_config(micro_data, home, languages=("de", "fr"), model={
        "text": {"tokenizer": str(tiny_bert), "embeddings_init": str(tiny_bert), "trim_vocab": True,
                 "embed_dim": 32}}))
    plan = plan_stage(cfg)
    assert os.path.basename(plan.tokenizer_dir).startswith("trimmed-")  # beside the experiment's runs
    made = os.stat(os.path.join(plan.tokenizer_dir, VOCAB_MAP_FILE)).st_mtime_ns
    assert plan_stage(cfg).tokenizer_dir == plan.tokenizer_dir  # planned again: the same folder, not remade
    assert os.stat(os.path.join(plan.tokenizer_dir, VOCAB_MAP_FILE)).st_mtime_ns == made
    kept = json.loads(open(os.path.join(plan.tokenizer_dir, VOCAB_MAP_FILE)).read())["kept"]
    state = TrainState.create(cfg, plan.tokenizer_dir, plan.parent, "cpu")
    from safetensors.torch import load_file

    table = load_file(str(tiny_bert / "model.safetensors"))["embeddings.word_embeddings.weight"]
    assert torch.equal(state.model.embedding.token_embedding.weight, table[kept])
    out = state.save(tmp_path / "ckpt", with_optimizer=False)
    assert (out / ckpt.TOKENIZER_DIR / VOCAB_MAP_FILE).is_file()
    assert not (out / ckpt.TOKENIZER_DIR / "model.safetensors").exists()  # tokenizer files, not the weights
    model, _ = ckpt.load_checkpoint(out)
    assert model.embedding.token_embedding.weight.shape[0] == len(kept)


# ------------------------------------------------------------------------------------------- transfer


def test_piece_styles_name_the_same_piece_across_tokenizer_conventions():
    wordpiece, unigram = PieceStyle(continuation="##"), PieceStyle(word_start="▁")
    clip, uncased = PieceStyle(word_end="</w>", lowercase=True), PieceStyle(continuation="##", lowercase=True)
    assert wordpiece.surface("##ung") == ("ung", False) and wordpiece.surface("Hund") == ("Hund", True)
    assert unigram.surface("▁Hund") == ("Hund", True) and unigram.surface("en") == ("en", False)
    assert uncased.candidates("Hund", True) == ["hund"] and uncased.candidates("ung", False) == ["##ung"]
    assert clip.candidates("Dog", True)[0] == "dog</w>" and unigram.candidates("Dog", True) == ["▁Dog", "▁dog"]


def test_vocabulary_transfer_gives_shared_pieces_the_english_rows(tiny_bert, micro_data, tmp_path):
    """A German WordPiece table (the dataset's own tokenizer) on the tiny BERT: every piece the English vocabulary
    also has starts as its English row, the others as a mixture of English rows, W_e as the identity."""
    from tokenizers import Tokenizer

    home = str(tmp_path / "home")
    text = {"embeddings_init": "transfer", "embed_dim": 32}
    base = micro_config(micro_data, home, languages=("de",), model={
        "backbone": {"name": str(tiny_bert), "pretrained": str(tiny_bert / "model.safetensors")}, "text": text})
    cfg = resolve_config("nlt", base)
    plan = plan_stage(cfg)
    state = TrainState.create(cfg, plan.tokenizer_dir, None, "cpu")
    model = state.model
    english = Tokenizer.from_file(str(tiny_bert / "tokenizer.json")).get_vocab()
    target = Tokenizer.from_file(os.path.join(plan.tokenizer_dir, "tokenizer.json")).get_vocab()
    rows = model.text_tower.word_embeddings()
    table = model.embedding.token_embedding.weight
    shared = [(tid, english[p.lower() if not p.startswith("##") else "##" + p[2:].lower()]) for p, tid in
              target.items() if not p.startswith("[") and (p.lower() if not p.startswith("##")
                                                           else "##" + p[2:].lower()) in english]
    assert len(shared) > 20  # German and English share many pieces (names, numbers, cognates)
    for tid, eid in shared:
        assert torch.equal(table[tid], rows[eid]), (tid, eid)
    assert torch.equal(model.embedding.proj.weight, torch.eye(32)) and not model.embedding.proj.bias.any()
    unshared = [tid for p, tid in target.items() if tid not in dict(shared) and not p.startswith("[")]
    assert unshared and not any(torch.equal(table[t], rows[0]) for t in unshared[:20])
    with pytest.raises(StageError, match="model.text.embed_dim"):  # E must be the tower's width
        plan_stage(resolve_config("nlt", {**base, "model": {**base["model"], "text": {**text, "embed_dim": 16}}}))


# ------------------------------------------------------------------------------------------- freezing


def test_a_frozen_table_or_projection_leaves_the_optimizer_and_the_table_its_own_learning_rate(
        micro_data, tmp_path):
    home = str(tmp_path / "home")
    publish_clip(micro_data, home)
    frozen = resolve_config("nlt", micro_config(micro_data, home, model={"text": {"freeze_table": True}}))
    state = TrainState.create(frozen, plan_stage(frozen).tokenizer_dir, plan_stage(frozen).parent, "cpu")
    assert not state.model.embedding.token_embedding.weight.requires_grad
    assert state.model.embedding.proj.weight.requires_grad
    assert not any(n.startswith("embedding.token_embedding") for n in state.optim.names)
    proj = resolve_config("nlt", micro_config(micro_data, home, model={"text": {"freeze_projection": True}}))
    assert not TrainState.create(proj, plan_stage(proj).tokenizer_dir, plan_stage(proj).parent,
                                 "cpu").model.embedding.proj.weight.requires_grad
    own = resolve_config("nlt", micro_config(micro_data, home, optim={"lr": 1e-3, "table_lr": 1e-2}))
    state = TrainState.create(own, plan_stage(own).tokenizer_dir, plan_stage(own).parent, "cpu")
    table = state.model.embedding.token_embedding.weight
    lrs = {id(p): g["lr"] for g in state.optim.optimizer.param_groups for p in g["params"]}
    assert lrs[id(table)] == 1e-2 and lrs[id(state.model.embedding.proj.weight)] == 1e-3
    shutil.rmtree(home)


def test_an_aligned_projection_maps_shared_pieces_onto_the_english_rows():
    """fit_projection on a table that is a linear image of the English rows (plus an offset): the fitted W_e, b_e
    undo it, so every shared piece enters the tower at its English row; unmatched rows do not count."""
    from ccr_ray.models.vocab_transfer import fit_projection

    gen = torch.Generator().manual_seed(0)
    english = torch.randn(500, 16, generator=gen)
    mix, offset = torch.randn(16, 24, generator=gen), torch.randn(24, generator=gen)
    matches = [i if i % 5 else None for i in range(400)]  # every fifth piece has no English twin
    table = torch.stack([english[m] if m is not None else torch.randn(16, generator=gen) for m in matches]) @ mix \
        + offset
    weight, bias, fit = fit_projection(table, english, matches, ridge=1e-8)
    assert weight.shape == (16, 24) and fit["pairs"] == 320 and fit["fit_cosine"] > 0.999
    mapped = table @ weight.T + bias
    shared = [r for r, m in enumerate(matches) if m is not None]
    assert torch.allclose(mapped[shared], english[[matches[r] for r in shared]], atol=1e-3)
    with pytest.raises(ValueError, match="shared"):
        fit_projection(table, english, [None] * 399 + [3])
