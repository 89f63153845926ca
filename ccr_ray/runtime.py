"""Torch-free inference for an exported ccr-ray model folder (written by `export/to_onnx.py`).

Imports only onnxruntime, numpy, tokenizers and pillow: no torch, open_clip, transformers or ray (a test imports
it in a process where those cannot be imported). Tokenization and image preprocessing are the very code the
training and PyTorch evaluation run (`ccr_ray.tokenization`, `ccr_ray.data.transforms`, both torch-free), fed
from the files in the folder, so inputs are identical:

    from ccr_ray.runtime import Encoder
    enc = Encoder("runs/demo/le/onnx")                        # add precision="int8" for the quantised text graphs
    images = enc.encode_image(["a.png", "b.jpg"])             # [2, D] float32, L2-normalised
    texts = enc.encode_text(["ein roter Kreis"], "de")        # [1, D]; "en" takes plain CLIP
    scores = texts @ images.T                                 # cosine similarities

Token sequences are cut to the longest caption of each batch before they reach the graph (exact: the text
transformer is causal and pools at EOT / [SEP]), except for a DASD model that mean-pools over padding
(`padding_invariant: false` in the manifest), which always sees the full context as in training.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ccr_ray.data.transforms import ImageTransform, open_image
from ccr_ray.tokenization import EnglishTokenizer, HFEnglishTokenizer, TargetTokenizer, clean_english

FORMAT = "ccr_ray.onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PREPROCESS_FILE = "preprocess.json"
EN_TOKENIZER_FILE = "tokenizer_en/tokenizer.json"  # the English tower's tokenizer (CLIP BPE: no open_clip needed)
HF_TOKENIZER = "hf"  # manifest tokenizers.en.kind of an HF text tower's tokenizer (else "clip_bpe")
TARGET_TOKENIZER_DIR = "tokenizer"  # the checkpoint's non-English tokenizer folder

# Graph roles (manifest "graphs" keys) and their input / output names
IMAGE, TEXT_EN, TEXT = "image", "text_en", "text"
INT8_SUFFIX = "_int8"
PIXELS, INPUT_IDS, ATTENTION_MASK, LANG_INDEX = "pixels", "input_ids", "attention_mask", "lang_index"
IMAGE_OUTPUT, TEXT_OUTPUT = "image_embeds", "text_embeds"  # not "embedding": that name broke a dynamo export
PRECISIONS = ("fp32", "int8")


class ModelFolderError(ValueError):
    """An export folder is missing, incomplete or inconsistent; the message names the path or field."""


def load_manifest(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise ModelFolderError(f"{path}: no manifest (is {folder} a folder written by export/to_onnx.py?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path}: malformed JSON: {err}") from None
    if manifest.get("format") != FORMAT:
        raise ModelFolderError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFolderError(f"{path}: format_version {manifest.get('format_version')!r} is not supported "
                               f"(this runtime reads {FORMAT_VERSION})")
    for key in ("languages", "language_index", "embed_dim", "context_length", "graphs", "padding_invariant"):
        if key not in manifest:
            raise ModelFolderError(f"{path}: missing field {key!r}")
    for role, graph in manifest["graphs"].items():
        for name in graph.get("files", []):
            if not (folder / name).exists():
                raise ModelFolderError(f"{folder / name}: file of graph {role!r} listed in the manifest is missing")
    return manifest


class Encoder:
    """Image and text encoders of an exported model; every output is L2-normalised float32 [N, D].

    folder      an export folder (manifest.json + ONNX graphs + tokenizers + preprocess.json)
    precision   "fp32", or "int8" for the dynamically quantised text graphs (`to_onnx.py --int8`); images
                always use the fp32 graph
    threads     onnxruntime intra-op threads per session (default: onnxruntime's choice, all cores)
    spinning    let idle onnxruntime threads spin for the next call (onnxruntime's default: lowest latency
                for back-to-back calls, but it burns CPU that other processes on the same cores need)
    providers   onnxruntime execution providers (default: CPU)
    Sessions are created on first use, so a text-only service never loads the image graph.
    """

    def __init__(self, folder: str | os.PathLike, precision: str = "fp32", threads: int | None = None,
                 providers: Sequence[str] | None = None, require_parity: bool = True, spinning: bool = True):
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        if precision not in PRECISIONS:
            raise ValueError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
        if precision == "int8" and not any(r.endswith(INT8_SUFFIX) for r in self.manifest["graphs"]):
            raise ModelFolderError(f"{self.folder}: no int8 graphs (export with --int8)")
        parity = self.manifest.get("parity", {})
        if require_parity and parity and not parity.get("passed", False):
            raise ModelFolderError(f"{self.folder / MANIFEST}: parity.passed is false: the graphs do not match "
                                   "PyTorch (re-export; Encoder(..., require_parity=False) loads it anyway)")
        self.precision = precision
        self.threads = threads
        self.spinning = spinning
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.languages: list[str] = list(self.manifest["languages"])
        self.embed_dim = int(self.manifest["embed_dim"])
        self.context_length = int(self.manifest["context_length"])
        self.padding_invariant = bool(self.manifest["padding_invariant"])
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._english: EnglishTokenizer | None = None
        self._target: TargetTokenizer | None = None
        self._transform: ImageTransform | None = None

    # ------------------------------------------------------------------ pieces (lazy)
    @property
    def transform(self) -> ImageTransform:
        if self._transform is None:
            path = self.folder / PREPROCESS_FILE
            if not path.exists():
                raise ModelFolderError(f"{path}: missing image preprocessing parameters")
            self._transform = ImageTransform.from_config(json.loads(path.read_text()))
        return self._transform

    def tokenizer(self, lang: str) -> EnglishTokenizer | TargetTokenizer:
        """The English tower's tokenizer for English, the checkpoint's tokenizer for every other language."""
        self.check_language(lang)
        return self._english_tokenizer() if lang == "en" else self._target_tokenizer()

    def _english_tokenizer(self) -> EnglishTokenizer:
        if self._english is None:
            from tokenizers import Tokenizer

            path = self.folder / EN_TOKENIZER_FILE
            if not path.exists():
                raise ModelFolderError(f"{path}: missing English tokenizer")
            if self.manifest.get("tokenizers", {}).get("en", {}).get("kind") == HF_TOKENIZER:
                self._english = HFEnglishTokenizer(str(path.parent), self.context_length)
            else:
                self._english = EnglishTokenizer(self.context_length, Tokenizer.from_file(str(path)))
        return self._english

    def _target_tokenizer(self) -> TargetTokenizer:
        if self._target is None:
            folder = self.folder / TARGET_TOKENIZER_DIR
            if not folder.is_dir():
                raise ModelFolderError(f"{folder}: missing target-language tokenizer folder")
            self._target = TargetTokenizer(str(folder), self.context_length)
        return self._target

    def graph_role(self, base: str) -> str:
        """The manifest graph used for `base` (image / text_en / text) at this encoder's precision."""
        if self.precision == "int8" and base != IMAGE and base + INT8_SUFFIX in self.manifest["graphs"]:
            return base + INT8_SUFFIX
        return base

    def session(self, role: str) -> ort.InferenceSession:
        if role not in self._sessions:
            graph = self.manifest["graphs"].get(role)
            if graph is None:
                raise ModelFolderError(f"{self.folder / MANIFEST}: no graph {role!r} (graphs: "
                                       f"{', '.join(self.manifest['graphs'])})")
            options = ort.SessionOptions()
            options.log_severity_level = 3
            if self.threads:
                options.intra_op_num_threads = int(self.threads)
                options.inter_op_num_threads = 1
            if not self.spinning:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            file = self.folder / graph["files"][0]
            try:
                self._sessions[role] = ort.InferenceSession(str(file), options, providers=self.providers)
            except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for a broken graph
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ModelFolderError(f"{file}: cannot load the {role} graph (truncated or corrupt? {first})") from None
        return self._sessions[role]

    # ------------------------------------------------------------------ text
    def check_language(self, lang: str) -> None:
        if lang not in self.languages:
            raise KeyError(f"language {lang!r} is not in this model; it has {', '.join(self.languages)}")

    def caption_problem(self, text: str, lang: str) -> str | None:
        """Why `text` is no caption for the `lang` text tower, or None when it is one. A caption must be valid
        Unicode and give the tower something to read: at least one character that is not whitespace, a control or
        a format character (Unicode categories Z* and C*: NUL, U+200B, U+FEFF, ...), and at least one token besides
        the tokenizer's special ones once the tokenizer has normalised it (M-BERT's drops control and zero-width
        characters; CLIP's cleaning unescapes HTML, so "&nbsp;" is empty). Anything else would be encoded as
        [CLS][SEP] or a few byte tokens and answered with arbitrary images. The service and export/search.py
        both refuse captions through this."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "not valid Unicode (a lone surrogate code point)"
        if not any(unicodedata.category(c)[0] not in "CZ" for c in text):
            return "empty (only whitespace, control or zero-width characters)"
        if not self._content_tokens(text, lang):
            return f"empty once the {lang} tokenizer has normalised it (no token but its special ones)"
        return None

    def _content_tokens(self, text: str, lang: str) -> int:
        """Tokens of `text` besides special ones (CLS/SEP, SOT/EOT, padding, and those typed literally, such as
        "[SEP]"; an unknown piece counts), after the language's normalisation."""
        self.check_language(lang)
        if lang == "en":
            english = self._english_tokenizer()
            if isinstance(english, HFEnglishTokenizer):
                tok = english._target._tok
            else:
                tok, text = english._tok, clean_english(text)
        else:
            tok = self._target_tokenizer()._tok
        special = {i for i, added in tok.get_added_tokens_decoder().items()
                   if added.special and added.content not in ("[UNK]", "<unk>")}
        encoding = tok.encode(text, add_special_tokens=False)
        return sum(1 for i, real in zip(encoding.ids, encoding.attention_mask) if real and i not in special)

    def text_inputs(self, texts: Sequence[str], lang: str, trim: bool = True) -> dict[str, np.ndarray]:
        """The graph's feeds for a batch of captions (tokenized exactly as in training and evaluation)."""
        self.check_language(lang)
        if lang == "en":
            tokenize = self._english_tokenizer()
            ids = tokenize(texts)
            if trim and len(ids):
                ids = tokenize.trim(ids)  # up to the last real token of any row (CLIP: EOT, the pooled one)
            return {INPUT_IDS: ids}
        ids, mask = self._target_tokenizer()(texts)
        if trim and self.padding_invariant and len(ids):
            length = int(mask.sum(axis=1).max())
            ids, mask = ids[:, :length], mask[:, :length]
        index = np.asarray([self.manifest["language_index"][lang]], dtype=np.int64)
        return {INPUT_IDS: ids, ATTENTION_MASK: mask, LANG_INDEX: index}

    def run_text(self, feeds: dict[str, np.ndarray], lang: str) -> np.ndarray:
        role = self.graph_role(TEXT_EN if lang == "en" else TEXT)
        return self.session(role).run([TEXT_OUTPUT], feeds)[0]

    def encode_text(self, texts: str | Sequence[str], lang: str, batch_size: int = 64) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        self.check_language(lang)
        out = [self.run_text(self.text_inputs(texts[i:i + batch_size], lang), lang)
               for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), dtype=np.float32)

    # ------------------------------------------------------------------ images
    def preprocess(self, images: Iterable) -> np.ndarray:
        """PIL images, encoded bytes or file paths -> pixels [N, 3, S, S] (open_clip's eval preprocessing)."""
        from PIL import Image

        decoded = []
        for item in images:
            if isinstance(item, Image.Image):
                decoded.append(item)
            elif isinstance(item, (bytes, bytearray, memoryview)):
                decoded.append(open_image(bytes(item)))
            elif isinstance(item, (str, os.PathLike)):
                decoded.append(open_image(None, str(item)))
            else:
                raise TypeError(f"images: expected PIL images, bytes or paths, got {type(item).__name__}")
        return self.transform.batch(decoded)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self.session(IMAGE).run([IMAGE_OUTPUT], {PIXELS: np.ascontiguousarray(pixels, np.float32)})[0]

    def encode_image(self, images, batch_size: int = 32) -> np.ndarray:
        """One image or a sequence of them: PIL images, encoded bytes or file paths."""
        from PIL import Image

        if isinstance(images, (Image.Image, bytes, bytearray, memoryview, str, os.PathLike)):
            images = [images]
        images = list(images)
        out = [self.encode_pixels(self.preprocess(images[i:i + batch_size]))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), dtype=np.float32)
