"""Adding a language to a trained model (model.add_languages / train_stage.py --add-language): a micro MLA and DASD
model trained on de and zh get fr through the same stages a language normally gets (nlt -> le, cla -> cma), and
everything de, zh and English read stays bit-identical, in PyTorch and in the ONNX export; the shared parameters
the new stage could reach keep their fingerprints; a stage that would train a shared parameter refuses to start;
removing fr gives back the old model's weights. Ray-free (the training loop on local batches); the Ray run of the
same CLI chain is tests/ray/test_stages_on_ray.py."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from ccr_ray import checkpoint as ckpt
from ccr_ray.config import ConfigError
from ccr_ray.data import schema
from ccr_ray.stages import resolve_config
from ccr_ray.tokenization import target_tokenizer
from ccr_ray.train import loop
from ccr_ray.train.plan import CHECKPOINT_DIR, StageError, plan_stage
from ccr_ray.train.state import TrainState
from tests.conftest import micro_config
from tests.export.conftest import load_cli
from tests.unit.test_loop import stream

CHAINS = {"mla": ("nlt", "le"), "dasd": ("cla", "cma")}


def train(cfg, steps: int = 4):
    """A stage as the worker runs it, on local batches; its checkpoint published where the stage table looks."""
    plan = plan_stage(cfg)
    state = TrainState.create(plan.cfg, plan.tokenizer_dir, plan.parent, "cpu")
    loop.run(state, stream(plan), steps=steps)
    out = state.save(plan.output_dir.local_path() / CHECKPOINT_DIR, with_optimizer=False)
    return plan, state, str(out)


def config(micro_data, home, stage, adapter, **sections):
    model = {"adapter": adapter, **sections.pop("model", {})}
    return resolve_config(stage, micro_config(micro_data, home, train={"max_steps": 4, "eval_every": 0,
                                                                      "log_every": 2},
                                              model=model, **sections))


@pytest.fixture(scope="module", params=sorted(CHAINS))
def added(request, micro_data, tmp_path_factory):
    """(base checkpoint on de+zh, the merged checkpoint with fr, the first add stage's state, the adapter kind)."""
    adapter = request.param
    home = str(tmp_path_factory.mktemp(f"add-{adapter}"))
    clip = resolve_config("clip", micro_config(micro_data, home))
    TrainState.create(clip, os.path.join(micro_data, "tokenizer"), None, "cpu").save(
        clip.stage_dir() / CHECKPOINT_DIR, with_optimizer=False)
    first, second = CHAINS[adapter]
    train(config(micro_data, home, first, adapter))
    _, _, base = train(config(micro_data, home, second, adapter))
    # --add-language fr --from the base model, then the second stage finds the first's output
    plan, state, _ = train(config(micro_data, home, first, adapter, model={"add_languages": ["fr"]},
                                  run={"init_from": base}))
    _, _, merged = train(config(micro_data, home, second, adapter, model={"add_languages": ["fr"]}))
    return base, merged, plan, state, adapter


def encode(checkpoint, langs, captions):
    model, meta = ckpt.load_checkpoint(checkpoint)
    model.eval()
    tok = target_tokenizer(ckpt.tokenizer_of(checkpoint), model.context_length)
    out = {}
    with torch.no_grad():
        for lang in langs:
            ids, mask = tok(captions[lang])
            out[lang] = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask), lang)
        from ccr_ray.tokenization import english_tokenizer

        out["en"] = model.encode_text_en(torch.from_numpy(english_tokenizer(model.context_length)(captions["en"])))
    return out


def test_the_other_languages_are_bit_identical_and_only_the_new_one_trained(added, micro_data):
    base, merged, plan, state, adapter = added
    table = schema.read_split_table(micro_data, "test", ["en", "de", "zh", "fr"], with_images=False)
    captions = {lang: [caps[0] for caps in table[schema.captions_column(lang)].to_pylist()[:16]]
                for lang in ("en", "de", "zh", "fr")}
    before, after = encode(base, ["de", "zh"], captions), encode(merged, ["de", "zh", "fr"], captions)
    for lang in ("de", "zh", "en"):
        assert torch.equal(before[lang], after[lang]), lang
    assert not torch.allclose(after["fr"], after["de"])  # fr has adapters of its own
    # what the new stage trained: fr's adapters and nothing any other language reads (the stage table enforces it)
    trainable = {name for name, p in state.model.named_parameters() if p.requires_grad}
    assert trainable and all(".fr." in name for name in trainable), sorted(trainable)[:5]
    assert not state.model.embedding.token_embedding.weight.requires_grad  # the table: rows fr shares with de
    # fr reads the table through an offset of its own (model.text.new_language_table=offset), which trained
    offset = state.model.embedding.token_offsets["fr"].weight
    assert offset.requires_grad and offset.detach().abs().max() > 0
    assert ckpt.read_meta(merged).experiment.model.text.language_offsets == ["fr"]
    assert plan.train_languages == ["fr"] and plan.eval_languages == ["fr"]
    assert ckpt.read_meta(merged).experiment.model.languages == ["de", "zh", "fr"]
    # fingerprints: shared parts and the old languages unchanged, fr added (jobs/languages.py compare exits 0)
    old, new = ckpt.read_fingerprints(base), ckpt.read_fingerprints(merged)
    assert {k: new[k] for k in old} == old and set(new) - set(old) == {"fr"}
    assert load_cli_languages().main(["compare", base, merged]) == 0
    if adapter == "dasd":  # the shared generator and SD parts are in "shared": unchanged above, and frozen here
        assert not any(p.requires_grad for n, p in state.model.named_parameters() if n.startswith(
            ("adapters.generators", "adapters.latent", "adapters.sr_projection")))


def load_cli_languages():
    import importlib

    return importlib.import_module("languages")  # jobs/ is on sys.path (tests/conftest.py)


def test_the_onnx_export_of_the_merged_model_answers_the_old_languages_as_before(added, micro_data, tmp_path):
    from ccr_ray.runtime import Encoder

    base, merged, *_ = added
    to_onnx = load_cli("to_onnx")
    for checkpoint, name in ((base, "old"), (merged, "new")):  # the multilingual text graph is what changes
        assert to_onnx.main([checkpoint, "--out", str(tmp_path / name), "--graphs", "text"]) == 0
    old, new = Encoder(tmp_path / "old"), Encoder(tmp_path / "new")
    assert new.languages == ["de", "zh", "fr"] and old.languages == ["de", "zh"]
    table = schema.read_split_table(micro_data, "test", ["de", "zh", "fr"], with_images=False)
    texts = {lang: [caps[0] for caps in table[schema.captions_column(lang)].to_pylist()[:12]]
             for lang in ("de", "zh", "fr")}
    for lang in ("de", "zh"):
        assert np.array_equal(old.encode_text(texts[lang], lang), new.encode_text(texts[lang], lang)), lang
    # fr's graph reads its token-table offset: the export answers as the PyTorch model does
    torch_fr = torch.nn.functional.normalize(encode(merged, ["fr"], {**texts, "en": texts["de"]})["fr"], dim=-1)
    assert np.abs(new.encode_text(texts["fr"], "fr") - torch_fr.numpy()).max() < 1e-4
    assert old.manifest["fingerprints"]["image"] == new.manifest["fingerprints"]["image"]


def test_removing_the_language_gives_back_the_old_weights(added, tmp_path):
    base, merged, *_ = added
    out = tmp_path / "without-fr"
    assert load_cli_languages().main(["remove", merged, "--lang", "fr", "--out", str(out)]) == 0
    assert ckpt.read_fingerprints(out) == ckpt.read_fingerprints(base)
    assert ckpt.read_meta(out).experiment.model.languages == ["de", "zh"]
    assert load_cli_languages().main(["remove", str(out), "--lang", "fr", "--out", str(tmp_path / "x")]) == 2


def test_a_run_that_would_change_what_other_languages_read_refuses_to_start(added, micro_data, tmp_path):
    base, merged, _, _, adapter = added
    home = str(tmp_path / "home")
    with pytest.raises(ConfigError, match="cannot add a language"):  # finetune-all trains the shared table
        resolve_config("finetune-all", micro_config(micro_data, home, model={"add_languages": ["fr"]}))
    with pytest.raises(StageError, match="--from"):  # nothing to extend
        plan_stage(resolve_config("nlt", micro_config(micro_data, home, model={"add_languages": ["fr"]})))
    first = CHAINS[adapter][0]
    with pytest.raises(StageError, match="already has zh"):
        plan_stage(config(micro_data, home, first, adapter, model={"add_languages": ["zh"]},
                          run={"init_from": base}))
    # the table policy: "frozen" gives the new language no offset of its own (only its adapters train)
    adding = config(micro_data, home, first, adapter, model={"add_languages": ["fr"]}, run={"init_from": base})
    assert plan_stage(adding).cfg.model.text.language_offsets == ["fr"]
    text = dataclasses.replace(adding.model.text, new_language_table="frozen")
    frozen = plan_stage(dataclasses.replace(adding, model=dataclasses.replace(adding.model, text=text)))
    assert frozen.cfg.model.text.language_offsets == []
    wider = {"mla": {"hidden": 32}} if adapter == "mla" else {"dasd": {"core": 4}}  # for every language
    with pytest.raises(StageError, match=f"model.{next(iter(wider))}.* differs"):
        plan_stage(config(micro_data, home, first, adapter, model={"add_languages": ["fr"], **wider},
                          run={"init_from": base}))
