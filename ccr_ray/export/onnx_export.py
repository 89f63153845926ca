"""Export a checkpoint to ONNX: three graphs, pooled + projected + L2-normalised, batch and length dynamic.

    image_encoder.onnx     pixels [B, 3, S, S]                                        -> image_embeds [B, D]
    text_en_encoder.onnx   input_ids [B, T] (the English tower's tokenizer)           -> text_embeds [B, D]
    text_encoder.onnx      input_ids [B, T], attention_mask [B, T], lang_index [1]    -> text_embeds [B, D]

plus the tokenizers (the English tower's: CLIP BPE as a `tokenizers` JSON, or an HF tower's own tokenizer
folder; the checkpoint's target tokenizer folder), the image preprocessing (`preprocess.json`) and
`manifest.json` (model fingerprint, languages and their indices, dims, opset, files, parity figures).
`ccr_ray.runtime.Encoder` reads the folder without torch. A backbone without an image tower (text-only) has no
image graph and no `preprocess.json`.

One multilingual graph selects the language's adapters from an input (`lang_index`, the manifest maps codes to
indices), instead of one graph per language: the token table E (M-BERT: 119,547 x 768 = 367 MB fp32) and the
frozen CLIP text blocks are shared by every language, and separate ONNX files cannot share initialisers, so
per-language graphs would copy them once per language (ViT-B-32, 5 languages: 5 x ~530 MB = ~2.7 GB, against
586 MB measured for the single graph). The per-language weights are stacked [L, ...] and gathered by
`lang_index` (a per-call copy of one language's adapters: 12.6 MB for MLA at real size); everything else is
the model's own `encode_text`, run through `torch.func.functional_call` with the first language's adapter
weights swapped for the gathered ones, so the graph is the PyTorch code path itself (no re-implementation of
MLA or DASD to drift from it), and any adapter that names its per-language `nn.ModuleDict`s in
`language_dicts()` (models/adapters.py) exports unchanged (per-language weights kept any other way would be
missed, and the parity check, which runs every language, would fail the export).

Pooling is export-safe in the model already: EOT and [SEP] are found by a float compare + argmax (no `nonzero`,
no argmax over integer ids), positions are sliced to the input length, so T is free up to the context length.

After writing, every graph is run against PyTorch on real inputs (batches of 1, 3 and 8; one-word, real and
context-filling captions; every language; full-context and trimmed token sequences); the export fails when a
cosine similarity falls below the threshold (0.9999 for fp32). `int8=True` adds dynamically quantised text
graphs (onnxruntime.quantization) and reports their cosine to PyTorch and their retrieval agreement with fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ccr_ray import checkpoint as ckpt
from ccr_ray import runtime as rt
from ccr_ray import storage
from ccr_ray.data.transforms import ImageTransform
from ccr_ray.export.probes import Probes, build_probes, image_cases, text_cases
from ccr_ray.models.ccr import CCRModel
from ccr_ray.stages import STAGES

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18  # the dynamo exporter's native opset
MIN_OPSET = 18
PARITY_THRESHOLD = 0.9999  # min cosine to PyTorch, fp32 graphs
GRAPHS = (rt.IMAGE, rt.TEXT_EN, rt.TEXT)
FILES = {rt.IMAGE: "image_encoder.onnx", rt.TEXT_EN: "text_en_encoder.onnx", rt.TEXT: "text_encoder.onnx"}
DESCRIPTIONS = {  # the manifest says which file does what
    rt.IMAGE: "pixels float32 [B, 3, S, S] (preprocess.json applied) -> image_embeds float32 [B, D], L2-normalised",
    rt.TEXT_EN: "input_ids int64 [B, T] (the English tower's tokenizer, tokenizer_en/; T <= context_length) -> "
                "text_embeds [B, D], L2-normalised; the untouched English text tower (padding derived from ids)",
    rt.TEXT: "input_ids, attention_mask int64 [B, T] (tokenizer/), lang_index int64 [1] (language_index) -> "
             "text_embeds [B, D], L2-normalised; the language's adapters, pooled at [SEP]",
}
OTHER_FILES = {
    rt.MANIFEST: "this file",
    rt.PREPROCESS_FILE: "image preprocessing: resize the short side (bicubic), centre-crop, /255, normalise",
    rt.EN_TOKENIZER_FILE: "the English tower's tokenizer as a `tokenizers` JSON (CLIP BPE: SOT + BPE + EOT, "
                          "zero-padded; an HF tower: its own tokenizer folder, tokenizers.en says which)",
    rt.TARGET_TOKENIZER_DIR + "/": "the checkpoint's tokenizer for every non-English language ([CLS] ... [SEP], [PAD])",
}
EXTERNAL_DATA_BYTES = 1_800_000_000  # a single protobuf file holds at most 2 GB; larger graphs get a .data file


class ExportError(ValueError):
    """Bad input to the export (checkpoint, languages, opset, output folder); the message names it."""


class ParityError(RuntimeError):
    """A graph does not reproduce PyTorch; the export folder is written with `parity.passed: false`."""


# ---------------------------------------------------------------------------------------------- wrappers


class ImageEncoder(nn.Module):
    def __init__(self, model: CCRModel):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels), dim=-1)


class EnglishTextEncoder(nn.Module):
    def __init__(self, model: CCRModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text_en(input_ids), dim=-1)


class _EncodeText(nn.Module):
    """`CCRModel.encode_text` as a module's forward, for `functional_call`."""

    def __init__(self, model: CCRModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, lang: str, token_offset=None):
        return self.model.encode_text(input_ids, attention_mask, lang, token_offset=token_offset)


class MultilingualTextEncoder(nn.Module):
    """All `languages` in one graph: per-language tensors stacked [L, ...], gathered by `lang_index`."""

    def __init__(self, model: CCRModel, languages: list[str]):
        super().__init__()
        self.encode = _EncodeText(model)
        self.languages = list(languages)
        self.template = self.languages[0]
        self._swaps: list[tuple[str, str]] = []  # (parameter name under `encode`, stacked buffer name)
        for dict_name in model.adapters.language_dicts():  # the per-language weights (models/adapters.py)
            module_dict = model.adapters.get_submodule(dict_name)
            for name, _ in module_dict[self.template].state_dict(keep_vars=True).items():
                stacked = torch.stack([module_dict[lang].state_dict(keep_vars=True)[name].detach()
                                       for lang in self.languages])
                buffer = f"stacked_{len(self._swaps)}"
                self.register_buffer(buffer, stacked.contiguous())
                prefix = f"model.adapters.{dict_name}." if dict_name else "model.adapters."
                self._swaps.append((f"{prefix}{self.template}.{name}", buffer))
        # token-table offsets (languages added to a trained model): one table of every offset language's rows and
        # a zero row; a language without an offset reads the zero row (x + 0 is x, so its embeddings are those of
        # an export without offsets, bit for bit)
        offset_languages = [lang for lang in self.languages if lang in model.embedding.token_offsets]
        self.has_offsets = bool(offset_languages)
        if self.has_offsets:
            tables = [model.embedding.token_offsets[lang].weight.detach() for lang in offset_languages]
            vocab, dim = tables[0].shape
            self.register_buffer("offset_rows", torch.cat([*tables, tables[0].new_zeros(1, dim)]).contiguous())
            self.register_buffer("offset_base", torch.tensor(
                [offset_languages.index(lang) * vocab if lang in offset_languages else -1 for lang in self.languages],
                dtype=torch.int64))

    def forward(self, input_ids, attention_mask, lang_index):
        swapped = {name: torch.index_select(getattr(self, buffer), 0, lang_index).squeeze(0)
                   for name, buffer in self._swaps}
        extra = {}
        if self.has_offsets:
            base = torch.index_select(self.offset_base, 0, lang_index)
            zero_row = torch.full_like(input_ids, self.offset_rows.shape[0] - 1)
            extra["token_offset"] = F.embedding(torch.where(base >= 0, input_ids + base, zero_row), self.offset_rows)
        out = torch.func.functional_call(self.encode, swapped, (input_ids, attention_mask, self.template), extra,
                                         strict=False, tie_weights=False)
        return F.normalize(out, dim=-1)


# ---------------------------------------------------------------------------------------------- export


@dataclass
class ExportPlan:
    checkpoint: str
    out: str
    languages: list[str]  # target languages in the multilingual graph (English is the text_en graph)
    opset: int = DEFAULT_OPSET
    int8: bool = False
    graphs: tuple[str, ...] = GRAPHS
    data: str | None = None  # probe data (dataset folder); None = the checkpoint's own, if present
    split: str | None = None
    threshold: float = PARITY_THRESHOLD
    timings: dict[str, float] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints its progress and warns about internals; keep the job's output readable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def export_graph(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_name: str,
                 dynamic_shapes: tuple, opset: int) -> list[str]:
    """torch.onnx dynamo export of one wrapper; returns the files written (graph, and a .data file if large)."""
    size = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    external = size > EXTERNAL_DATA_BYTES
    module.eval()
    with torch.no_grad(), _quiet():
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=[output_name],
                          dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True, external_data=external,
                          verbose=False)
    import onnx

    onnx.checker.check_model(str(path))
    files = [path.name]
    if external and path.with_name(path.name + ".data").exists():
        files.append(path.name + ".data")
    return files


def _example_text(model: CCRModel, length: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Example inputs for tracing (values do not matter; batch 2 and T < context keep both dims symbolic)."""
    ids = torch.full((batch, length), model.tokens.pad_id, dtype=torch.long)
    ids[:, 0], ids[:, length // 2] = model.tokens.cls_id, model.tokens.sep_id
    mask = torch.zeros_like(ids)
    mask[:, : length // 2 + 1] = 1
    return ids, mask


def export_model(model: CCRModel, plan: ExportPlan, folder: Path, image_size: int) -> dict[str, dict]:
    """Write the ONNX graphs of `plan.graphs` into `folder`; returns the manifest's `graphs` block."""
    from torch.export import Dim

    context = model.context_length
    batch, seq = Dim("batch"), Dim("seq", min=1, max=context)
    example_len = max(2, min(context - 1, 16))
    graphs: dict[str, dict] = {}
    for role in plan.graphs:
        start = time.perf_counter()
        path = folder / FILES[role]
        if role == rt.IMAGE:
            files = export_graph(ImageEncoder(model), (torch.randn(2, 3, image_size, image_size),), path,
                                 [rt.PIXELS], rt.IMAGE_OUTPUT, ({0: batch},), plan.opset)
            inputs = [rt.PIXELS]
            output = rt.IMAGE_OUTPUT
        elif role == rt.TEXT_EN:
            from ccr_ray.tokenization import english_tokenizer

            tokenize = english_tokenizer(context, model.english_tokenizer)  # real ids; the values do not matter
            ids = torch.from_numpy(tokenize(["a dog runs on the grass", "two people"])[:, :example_len])
            files = export_graph(EnglishTextEncoder(model), (ids,), path, [rt.INPUT_IDS], rt.TEXT_OUTPUT,
                                 ({0: batch, 1: seq},), plan.opset)
            inputs, output = [rt.INPUT_IDS], rt.TEXT_OUTPUT
        else:
            ids, mask = _example_text(model, example_len)
            wrapper = MultilingualTextEncoder(model, plan.languages)
            inputs = [rt.INPUT_IDS, rt.ATTENTION_MASK, rt.LANG_INDEX]
            files = export_graph(wrapper, (ids, mask, torch.tensor([0])), path, inputs, rt.TEXT_OUTPUT,
                                 ({0: batch, 1: seq}, {0: batch, 1: seq}, None), plan.opset)
            output = rt.TEXT_OUTPUT
        seconds = time.perf_counter() - start
        plan.timings[f"export_{role}_s"] = round(seconds, 2)
        graphs[role] = {"description": DESCRIPTIONS[role], "files": files, "inputs": inputs, "output": output,
                        "precision": "fp32",
                        "bytes": sum((folder / f).stat().st_size for f in files), "sha256": _sha256(path)}
        log.info("exported %s in %.1fs (%s)", role, seconds, ", ".join(files))
    return graphs


# ---------------------------------------------------------------------------------------------- parity


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return (a * b).sum(axis=1)


def _summary(cases: list[dict], threshold: float) -> dict:
    worst = min(c["min_cosine"] for c in cases)
    return {"min_cosine": worst, "max_abs_diff": max(c["max_abs_diff"] for c in cases),
            "passed": bool(worst >= threshold), "cases": cases}


@torch.no_grad()
def _torch_text(model: CCRModel, feeds: dict[str, np.ndarray], lang: str) -> np.ndarray:
    ids = torch.from_numpy(feeds[rt.INPUT_IDS])
    if lang == "en":
        return F.normalize(model.encode_text_en(ids), dim=-1).numpy()
    return F.normalize(model.encode_text(ids, torch.from_numpy(feeds[rt.ATTENTION_MASK]), lang), dim=-1).numpy()


def text_parity(model: CCRModel, encoder: rt.Encoder, probes: Probes, lang: str, threshold: float) -> dict:
    """The graph on full-context and on trimmed inputs versus PyTorch on full-context inputs (what the
    PyTorch evaluation feeds)."""
    cases = []
    for name, texts in text_cases(probes.captions[lang], encoder.tokenizer(lang).count_truncated):
        full = encoder.text_inputs(texts, lang, trim=False)
        reference = _torch_text(model, full, lang)
        trimmed = encoder.text_inputs(texts, lang, trim=True)
        outs = [encoder.run_text(full, lang), encoder.run_text(trimmed, lang)]
        cos = min(float(_cosine(o, reference).min()) for o in outs)
        diff = max(float(np.abs(o - reference).max()) for o in outs)
        cases.append({"case": name, "batch": len(texts), "tokens": int(full[rt.INPUT_IDS].shape[1]),
                      "trimmed_tokens": int(trimmed[rt.INPUT_IDS].shape[1]), "min_cosine": cos,
                      "max_abs_diff": diff})
    return _summary(cases, threshold)


@torch.no_grad()
def image_parity(model: CCRModel, encoder: rt.Encoder, probes: Probes, threshold: float) -> dict:
    pixels = encoder.preprocess(probes.images)
    cases = []
    for name, index in image_cases(len(probes.images)):
        batch = pixels[index]
        reference = F.normalize(model.encode_image(torch.from_numpy(batch)), dim=-1).numpy()
        out = encoder.encode_pixels(batch)
        cases.append({"case": name, "batch": len(index), "min_cosine": float(_cosine(out, reference).min()),
                      "max_abs_diff": float(np.abs(out - reference).max())})
    return _summary(cases, threshold)


def check_parity(model: CCRModel, folder: str | os.PathLike, probes: Probes,
                 threshold: float = PARITY_THRESHOLD) -> dict:
    """Parity of every fp32 graph in `folder` with `model`; {"passed", "threshold", per graph / language}."""
    model.eval()
    encoder = rt.Encoder(folder, require_parity=False)
    graphs = encoder.manifest["graphs"]
    report: dict = {"threshold": threshold}
    if rt.IMAGE in graphs:
        report[rt.IMAGE] = image_parity(model, encoder, probes, threshold)
    if rt.TEXT_EN in graphs:
        report[rt.TEXT_EN] = text_parity(model, encoder, probes, "en", threshold)
    if rt.TEXT in graphs:
        report[rt.TEXT] = {lang: text_parity(model, encoder, probes, lang, threshold)
                           for lang in encoder.languages if lang != "en"}
    checks = [report[g] for g in (rt.IMAGE, rt.TEXT_EN) if g in report]
    checks += list(report.get(rt.TEXT, {}).values())
    report["passed"] = all(c["passed"] for c in checks)
    report["min_cosine"] = min(c["min_cosine"] for c in checks) if checks else None
    return report


def int8_report(model: CCRModel, folder: str | os.PathLike, probes: Probes) -> dict:
    """int8 text graphs: cosine to PyTorch (same cases as the fp32 parity) and retrieval agreement with the
    fp32 graphs on the probe images (text->image top-1 agreement and R@1 of both)."""
    fp32 = rt.Encoder(folder, require_parity=False)
    int8 = rt.Encoder(folder, precision="int8", require_parity=False)
    report: dict = {}
    image_feats = fp32.encode_image(probes.images) if rt.IMAGE in fp32.manifest["graphs"] else None
    for lang in fp32.languages:
        base = rt.TEXT_EN if lang == "en" else rt.TEXT
        if base + rt.INT8_SUFFIX not in fp32.manifest["graphs"]:
            continue
        entry = text_parity(model, int8, probes, lang, threshold=0.0)
        entry = {"min_cosine": entry["min_cosine"], "max_abs_diff": entry["max_abs_diff"]}
        if image_feats is not None:
            a = fp32.encode_text(probes.captions[lang], lang)
            b = int8.encode_text(probes.captions[lang], lang)
            truth = probes.caption_image[lang]
            top_a, top_b = (a @ image_feats.T).argmax(1), (b @ image_feats.T).argmax(1)
            entry.update({"mean_cosine_to_fp32": float(_cosine(a, b).mean()),
                          "top1_agreement": float((top_a == top_b).mean()),
                          "t2i_R@1_fp32": float((top_a == truth).mean() * 100),
                          "t2i_R@1_int8": float((top_b == truth).mean() * 100), "queries": int(len(truth))})
        report[lang] = entry
    return report


# ---------------------------------------------------------------------------------------------- the job


def resolve_plan(checkpoint: str, out: str | None = None, languages: list[str] | None = None, int8: bool = False,
                 opset: int = DEFAULT_OPSET, graphs: tuple[str, ...] = GRAPHS, data: str | None = None,
                 split: str | None = None) -> tuple[ExportPlan, CCRModel, ckpt.CheckpointMeta]:
    """Validate the request and load the model; every error names the path or option."""
    out = out or str(Path(checkpoint).resolve().parent / "onnx")
    check_out_folder(out)  # before the checkpoint loads: seconds, not a traceback after the export
    if opset < MIN_OPSET:
        raise ExportError(f"--opset: {opset} is below {MIN_OPSET}, the lowest the torch.onnx dynamo exporter "
                          "writes")
    import onnx

    if opset > onnx.defs.onnx_opset_version():
        raise ExportError(f"--opset: {opset} is above {onnx.defs.onnx_opset_version()}, the highest the installed "
                          f"onnx {onnx.__version__} knows")
    try:
        model, meta = ckpt.load_checkpoint(checkpoint)
    except ckpt.CheckpointError as err:
        raise ExportError(str(err)) from None
    model.eval()
    unknown_graphs = [g for g in graphs if g not in GRAPHS]
    if unknown_graphs:
        raise ExportError(f"--graphs: unknown {unknown_graphs} (known: {', '.join(GRAPHS)})")
    if not graphs:
        raise ExportError("--graphs: nothing to export")
    if languages:
        targets = [lang for lang in languages if lang != "en"]
        missing = [lang for lang in targets if lang not in model.languages]
        if missing:
            raise ExportError(f"--langs: the checkpoint has no adapters for {', '.join(missing)} (it has "
                              f"{', '.join(model.languages)}; en is always exported)")
    else:
        targets = list(model.languages)
    if rt.TEXT in graphs and not targets:
        graphs = tuple(g for g in graphs if g != rt.TEXT)
    if rt.IMAGE in graphs and not model.has_images:
        graphs = tuple(g for g in graphs if g != rt.IMAGE)  # a text-only backbone
    cfg = meta.experiment
    if data is None:
        candidate = STAGES[meta.stage].dataset_root(cfg)
        data = candidate if candidate and os.path.isdir(candidate) else None
    elif not os.path.isdir(data):
        raise ExportError(f"--data: no dataset folder {data}")
    else:  # asked for by name: used, or refused (the probes fall back to rendered scenes only by default)
        from ccr_ray.data import schema

        try:
            manifest = schema.load_manifest(data)
        except schema.DatasetError as err:
            raise ExportError(f"--data: {err}") from None
        if (split or cfg.data.test_split) not in manifest.splits:
            raise ExportError(f"--split: {data} has no split {split or cfg.data.test_split!r} (it has "
                              f"{', '.join(manifest.splits)})")
    plan = ExportPlan(checkpoint=str(checkpoint), out=str(out), languages=targets, opset=opset, int8=int8,
                      graphs=tuple(graphs), data=data, split=split or cfg.data.test_split)
    return plan, model, meta


def check_out_folder(out: str) -> None:
    """--out must be a folder this job may replace: absent, empty or an earlier export, under folders (not files)
    it can write in."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ExportError(f"--out: {out} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / rt.MANIFEST).exists():
        raise ExportError(f"--out: {out} exists, is not empty and is not an export folder; refusing to replace it")
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"--out: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--out: cannot write in {parent}")


def _write_tokenizers(checkpoint: str, meta: ckpt.CheckpointMeta, folder: Path, context_length: int,
                      english: str | None) -> dict:
    from ccr_ray.tokenization import (
        HFEnglishTokenizer,
        TargetTokenizer,
        build_clip_bpe,
        copy_tokenizer_files,
        ensure_tokenizer_json,
    )

    (folder / rt.EN_TOKENIZER_FILE).parent.mkdir(parents=True, exist_ok=True)
    if english:  # an HF tower's own tokenizer
        copy_tokenizer_files(english, (folder / rt.EN_TOKENIZER_FILE).parent)
        ensure_tokenizer_json((folder / rt.EN_TOKENIZER_FILE).parent)
        en = {"file": rt.EN_TOKENIZER_FILE, "kind": rt.HF_TOKENIZER,
              "pad_id": HFEnglishTokenizer(str((folder / rt.EN_TOKENIZER_FILE).parent), context_length).pad_id}
    else:
        build_clip_bpe().save(str(folder / rt.EN_TOKENIZER_FILE))
        en = {"file": rt.EN_TOKENIZER_FILE, "kind": "clip_bpe", "sot_id": 49406, "eot_id": 49407, "pad_id": 0}
    source = ckpt.tokenizer_of(checkpoint)
    if source is None:
        cfg = meta.experiment
        source = cfg.path(cfg.model.text.tokenizer) if cfg.model.text.tokenizer != "auto" else None
    if not source or not Path(source).is_dir():
        raise ExportError(f"{checkpoint}: no tokenizer/ folder in the checkpoint (and model.text.tokenizer names "
                          "none); the runtime needs the target-language tokenizer")
    target = folder / rt.TARGET_TOKENIZER_DIR
    copy_tokenizer_files(source, target)  # not the weights a model folder named as tokenizer also holds
    ensure_tokenizer_json(target)  # the runtime reads tokenizer.json with the Rust library only
    tok = TargetTokenizer(str(target), context_length)
    ids = {"pad_id": tok.pad_id, "cls_id": tok.cls_id, "sep_id": tok.sep_id}
    expected = {k: meta.tokens[k] for k in ids}
    if ids != expected:
        raise ExportError(f"{source}: special token ids {ids} differ from the checkpoint's {expected}")
    return {"en": en, "target": {"folder": rt.TARGET_TOKENIZER_DIR, "vocab_size": tok.vocab_size, **ids}}


def model_fingerprint(model: CCRModel) -> str:
    """`tensor_fingerprint` of the whole state dict: identifies the weights an export was made from."""
    return ckpt.tensor_fingerprint(model.state_dict())


def image_fingerprint(model: CCRModel) -> str | None:
    """`tensor_fingerprint` of the image tower (what an image embedding depends on); None without one."""
    tower = dict(model.param_groups()["image_tower"])
    return ckpt.tensor_fingerprint({name: p for name, p in tower.items()}) if tower else None


def export_checkpoint(plan: ExportPlan, model: CCRModel, meta: ckpt.CheckpointMeta) -> dict:
    """Write the export folder (into a temporary sibling, swapped in at the end) and check it; returns the
    manifest. Raises ParityError, after writing, when a fp32 graph misses the threshold."""
    import onnx
    import onnxruntime

    started = time.perf_counter()
    out = Path(plan.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        transform = ImageTransform.from_config(meta.preprocess) if meta.preprocess is not None else None
        if transform is not None:
            (tmp / rt.PREPROCESS_FILE).write_text(json.dumps(transform.to_config(), indent=2))
        tokenizers = _write_tokenizers(plan.checkpoint, meta, tmp, model.context_length, model.english_tokenizer)
        graphs = export_model(model, plan, tmp, transform.size if transform is not None else 0)
        image = image_fingerprint(model)
        manifest = {
            "format": rt.FORMAT, "format_version": rt.FORMAT_VERSION,
            "model": {"fingerprint": model_fingerprint(model), "image_fingerprint": image,
                      "checkpoint": str(Path(plan.checkpoint).resolve()), "stage": meta.stage, "step": meta.step,
                      "adapter": meta.experiment.model.adapter, "backbone": meta.experiment.model.backbone.name},
            "languages": (["en"] if rt.TEXT_EN in graphs else []) + (plan.languages if rt.TEXT in graphs else []),
            "language_index": {lang: i for i, lang in enumerate(plan.languages)} if rt.TEXT in graphs else {},
            "embed_dim": int(model.text_tower.embed_dim),
            "context_length": model.context_length, "image_size": transform.size if transform is not None else None,
            "padding_invariant": bool(model.adapters.padding_invariant),
            "opset": plan.opset, "graphs": graphs, "tokenizers": tokenizers,
            # what each part of the model is: the image tower (an index of image embeddings stays valid while it
            # is unchanged), what every language reads, and each language's own adapters
            "fingerprints": {"image": image, **ckpt.language_fingerprints(model)},
            "preprocess": rt.PREPROCESS_FILE if transform is not None else None,
            "normalized": True, "files": OTHER_FILES,
            "export": {"exporter": "torch.onnx (dynamo)", "torch": torch.__version__, "onnx": onnx.__version__,
                       "onnxruntime": onnxruntime.__version__},
        }
        (tmp / rt.MANIFEST).write_text(json.dumps(manifest, indent=2))

        wanted = list(manifest["languages"])
        def vocab() -> list[str]:
            from tokenizers import Tokenizer

            return list(Tokenizer.from_file(str(tmp / rt.TARGET_TOKENIZER_DIR / "tokenizer.json")).get_vocab())

        probes = build_probes(wanted, transform.size if transform is not None else 0, plan.data, plan.split,
                              vocabulary=vocab, images=rt.IMAGE in graphs)
        start = time.perf_counter()
        manifest["parity"] = check_parity(model, tmp, probes, plan.threshold)
        plan.timings["parity_s"] = round(time.perf_counter() - start, 2)
        manifest["parity"]["probes"] = probes.source

        if plan.int8:
            from ccr_ray.export.quantize import quantize_text_graph

            for role in (rt.TEXT_EN, rt.TEXT):
                if role not in graphs:
                    continue
                start = time.perf_counter()
                name = FILES[role].replace(".onnx", ".int8.onnx")
                files = quantize_text_graph(tmp / FILES[role], tmp / name,
                                            external_data=len(graphs[role]["files"]) > 1)
                graphs[role + rt.INT8_SUFFIX] = {**graphs[role], "files": files, "precision": "int8",
                                                 "description": graphs[role]["description"] + "; int8 weights "
                                                 "(dynamic quantisation)",
                                                 "bytes": sum((tmp / f).stat().st_size for f in files),
                                                 "sha256": _sha256(tmp / name)}
                plan.timings[f"quantize_{role}_s"] = round(time.perf_counter() - start, 2)
            (tmp / rt.MANIFEST).write_text(json.dumps(manifest, indent=2))
            manifest["int8"] = int8_report(model, tmp, probes)
        plan.timings["total_s"] = round(time.perf_counter() - started, 2)
        manifest["export"]["seconds"] = plan.timings
        (tmp / rt.MANIFEST).write_text(json.dumps(manifest, indent=2))
        storage.swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not manifest["parity"]["passed"]:
        raise ParityError(f"{out}: a graph differs from PyTorch (min cosine {manifest['parity']['min_cosine']:.6f} "
                          f"< {plan.threshold}); see parity in {out / rt.MANIFEST}")
    return manifest


def format_report(manifest: dict, folder: str) -> str:
    """Human-readable summary: files, sizes, parity and int8 figures."""
    lines = [f"export folder: {folder}", "| graph | files | MB | parity min cosine | max abs diff |",
             "|---|---|---|---|---|"]
    parity = manifest.get("parity", {})
    for role, graph in manifest["graphs"].items():
        if role == rt.TEXT:
            per = parity.get(rt.TEXT, {})
            cos = min((v["min_cosine"] for v in per.values()), default=float("nan"))
            diff = max((v["max_abs_diff"] for v in per.values()), default=float("nan"))
        elif role in parity:
            cos, diff = parity[role]["min_cosine"], parity[role]["max_abs_diff"]
        else:
            base = role[: -len(rt.INT8_SUFFIX)] if role.endswith(rt.INT8_SUFFIX) else role
            entries = [v for k, v in manifest.get("int8", {}).items()
                       if (k == "en") == (base == rt.TEXT_EN)]
            cos = min((e["min_cosine"] for e in entries), default=float("nan"))
            diff = max((e["max_abs_diff"] for e in entries), default=float("nan"))
        lines.append(f"| {role} | {', '.join(graph['files'])} | {graph['bytes'] / 1e6:.1f} | {cos:.6f} | {diff:.2e} |")
    if rt.TEXT in parity:
        lines.append("per language (fp32): " + ", ".join(f"{k} {v['min_cosine']:.6f}"
                                                           for k, v in parity[rt.TEXT].items()))
    for lang, entry in manifest.get("int8", {}).items():
        extra = ""
        if "top1_agreement" in entry:
            extra = (f", top-1 agreement with fp32 {entry['top1_agreement'] * 100:.1f}%, R@1 "
                     f"{entry['t2i_R@1_fp32']:.1f} -> {entry['t2i_R@1_int8']:.1f} ({entry['queries']} queries)")
        lines.append(f"int8 {lang}: min cosine to PyTorch {entry['min_cosine']:.5f}{extra}")
    lines.append(f"parity {'passed' if parity.get('passed') else 'FAILED'} (threshold {parity.get('threshold')}); "
                 f"probes: {parity.get('probes', {}).get('images', '?')}; "
                 f"export {manifest['export']['seconds'].get('total_s', 0):.1f}s")
    return "\n".join(lines)
