"""Tokenizers: the English text tower's own for English (CLIP's BPE, or the Hugging Face tokenizer of an HF
encoder tower), a Hugging Face tokenizer (M-BERT, or a WordPiece trained for the data) for the rest.

All run on the Rust `tokenizers` library and import neither torch nor open_clip, so Ray Data preprocessing
processes start fast and the ONNX runtime can use the same code paths.

All return numpy arrays of fixed length `context_length`, so batches stack without padding logic:
  * English, CLIP: SOT + BPE + EOT, zero-padded; with truncation the last kept token becomes EOT (open_clip).
  * English, HF tower: the tower's tokenizer ([CLS] ... [SEP] for BERT), padded with its pad id; the tower
    derives its attention mask from the padding (as open_clip's HFTextEncoder does), so ids are all it takes.
  * Others:  [CLS] + WordPieces + [SEP], padded with [PAD] (`padding='max_length', truncation=True`).

Which English tokenizer a model uses is part of its backbone config (`english_tokenizer_folder(clip_cfg)`: None =
CLIP's BPE), stored in every checkpoint and export; every consumer asks `english_tokenizer(context, folder)`.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4 in tokenizers we train
CLIP_SPECIAL = ("<start_of_text>", "<end_of_text>")  # open_clip's names; ids 49406, 49407


def clip_bpe_vocab_file() -> Path:
    """open_clip's BPE vocabulary (ships inside the open_clip package), located without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed: CLIP's BPE vocabulary ships with it")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable-unicode table (the byte-level alphabet of the BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_clip_bpe(vocab_file: str | Path | None = None):
    """CLIP's tokenizer as a `tokenizers.Tokenizer` (Rust, torch-free), built from open_clip's vocabulary the
    way transformers' CLIPConverter builds CLIPTokenizerFast: NFC + whitespace folding + lower-casing, CLIP's
    split regex, byte-level BPE with `</w>` word ends, SOT/EOT around every caption. Token ids equal
    open_clip's `SimpleTokenizer` (tests/unit/test_tokenization.py checks real captions)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    lines = gzip.open(vocab_file or clip_bpe_vocab_file()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [v + "</w>" for v in alphabet] + ["".join(m) for m in merges] + list(CLIP_SPECIAL)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                               fuse_unk=False, unk_token=CLIP_SPECIAL[1]))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing((CLIP_SPECIAL[1], vocab[CLIP_SPECIAL[1]]),
                                                      (CLIP_SPECIAL[0], vocab[CLIP_SPECIAL[0]]), False, False)
    return tok


def clean_english(text: str) -> str:
    """open_clip's `basic_clean` minus ftfy (which only repairs mis-decoded text): HTML entities, outer space."""
    return html.unescape(html.unescape(text)).strip()


def padded_length(ids: np.ndarray, pad_id: int) -> int:
    """Columns up to the last non-padding token of any row of ids [N, T]: the rest is padding everywhere and can
    be cut (exact: CLIP pools at EOT under a causal mask, an HF tower masks padding out)."""
    if not ids.size:
        return 0
    real = ids != pad_id
    return int((real * np.arange(1, ids.shape[1] + 1)).max())


class EnglishTokenizer:
    """CLIP's BPE for English captions: SOT + BPE + EOT, zero-padded to the context; truncation keeps EOT last."""

    kind = "clip_bpe"
    pad_id = 0

    def __init__(self, context_length: int, tokenizer=None):
        self.context_length = context_length
        self._tok = tokenizer or build_clip_bpe()
        self._tok.enable_truncation(max_length=context_length)
        self._tok.enable_padding(length=context_length, pad_id=0, pad_token=CLIP_SPECIAL[1])

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        encoded = self._tok.encode_batch([clean_english(t) for t in texts])
        return np.asarray([e.ids for e in encoded], dtype=np.int64).reshape(len(texts), self.context_length)

    def count_truncated(self, texts: Sequence[str]) -> int:
        """Captions longer than the context (they are cut, with EOT kept at the end)."""
        return sum(len(e.overflowing) > 0 for e in self._tok.encode_batch([clean_english(t) for t in texts]))

    def trim(self, ids: np.ndarray) -> np.ndarray:
        """ids [N, T] without the columns that are padding in every row."""
        return ids[:, : padded_length(ids, self.pad_id)]


class HFEnglishTokenizer(EnglishTokenizer):
    """The tokenizer of an English Hugging Face encoder tower (a folder: tokenizer.json or vocab.txt), as the
    tower was trained with it: `[CLS] ... [SEP]` (its own specials), truncated and padded with its pad id. No CLIP
    cleaning: the tokenizer's own normaliser applies."""

    kind = "hf"

    def __init__(self, folder: str, context_length: int):
        self.folder = str(folder)
        self.context_length = context_length
        self._target = TargetTokenizer(folder, context_length)
        self.pad_id = self._target.pad_id

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self._target(texts)[0]

    def count_truncated(self, texts: Sequence[str]) -> int:
        return self._target.count_truncated(texts)


@dataclass(frozen=True)
class TokenizerInfo:
    """What the model needs to know about the non-English tokenizer."""

    vocab_size: int
    pad_id: int
    cls_id: int
    sep_id: int

    def to_dict(self) -> dict:
        return asdict(self)


class TargetTokenizer:
    """A Hugging Face tokenizer folder (M-BERT's, or the one trained for the demo), run through the Rust
    `tokenizers` library: `[CLS] ... [SEP]`, truncated and padded with [PAD] to the context length, exactly as
    `tokenizer(texts, padding='max_length', truncation=True, max_length=context_length)`. A folder with only a
    `vocab.txt` is converted once through transformers and the `tokenizer.json` cached beside it."""

    def __init__(self, folder: str, context_length: int):
        from tokenizers import Tokenizer

        self.folder = str(folder)
        self.context_length = context_length
        self._tok = Tokenizer.from_file(str(ensure_tokenizer_json(folder)))
        special = _special_ids(Path(folder), self._tok)
        self.pad_id, self.cls_id, self.sep_id = special["pad"], special["cls"], special["sep"]
        self._tok.enable_truncation(max_length=context_length)
        self._tok.enable_padding(length=context_length, pad_id=self.pad_id, pad_token=special["pad_token"])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def info(self) -> TokenizerInfo:
        return TokenizerInfo(vocab_size=self.vocab_size, pad_id=self.pad_id, cls_id=self.cls_id, sep_id=self.sep_id)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = self._tok.encode_batch(list(texts))
        shape = (len(texts), self.context_length)
        ids = np.asarray([e.ids for e in encoded], dtype=np.int64).reshape(shape)
        mask = np.asarray([e.attention_mask for e in encoded], dtype=np.int64).reshape(shape)
        return ids, mask

    def count_truncated(self, texts: Sequence[str]) -> int:
        return sum(len(e.overflowing) > 0 for e in self._tok.encode_batch(list(texts)))


def ensure_tokenizer_json(folder: str | Path) -> Path:
    """The folder's tokenizer.json; a BERT folder with only vocab.txt gets one built the way transformers'
    BertConverter builds BertTokenizerFast (casing from tokenizer_config.json, default cased like M-BERT)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if path.exists():
        return path
    if not (folder / "vocab.txt").exists():
        raise FileNotFoundError(f"{folder}: not a tokenizer folder (no tokenizer.json or vocab.txt)")
    from tokenizers.implementations import BertWordPieceTokenizer

    config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").exists() else {}
    lowercase = bool(config.get("do_lower_case", False))
    tok = BertWordPieceTokenizer(str(folder / "vocab.txt"), clean_text=True,
                                 handle_chinese_chars=config.get("tokenize_chinese_chars", True),
                                 strip_accents=config.get("strip_accents"), lowercase=lowercase)
    tok.save(str(path))
    return path


def _special_ids(folder: Path, tok) -> dict:
    """[PAD]/[CLS]/[SEP] from the folder's special_tokens_map / tokenizer_config, else BERT's names."""
    names = {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / file).exists():
            data = json.loads((folder / file).read_text())
            for key in names:
                value = data.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    names[key] = value
    out = {"pad_token": names["pad_token"]}
    for key, short in (("pad_token", "pad"), ("cls_token", "cls"), ("sep_token", "sep")):
        token_id = tok.token_to_id(names[key])
        if token_id is None:
            raise ValueError(f"tokenizer {folder}: no {names[key]} token; a BERT-style tokenizer is needed")
        out[short] = token_id
    return out


@functools.lru_cache(maxsize=8)
def english_tokenizer(context_length: int, folder: str | None = None) -> EnglishTokenizer:
    """The English tower's tokenizer: CLIP's BPE (folder None), else the HF tower's tokenizer folder
    (`english_tokenizer_folder`). Cached per process: Ray Data tasks reuse worker processes, so the vocabulary
    loads once per worker."""
    return HFEnglishTokenizer(folder, context_length) if folder else EnglishTokenizer(context_length)


def english_tokenizer_folder(clip_cfg: dict | None) -> str | None:
    """The English tokenizer a backbone config states: its HF text tower's tokenizer folder (open_clip's
    `text_cfg.hf_tokenizer_name`, a local folder once `backbone.backbone_model_config` resolved it), or None for
    CLIP's BPE."""
    text = (clip_cfg or {}).get("text_cfg", {})
    if not text.get("hf_model_name"):
        return None
    return text.get("hf_tokenizer_name") or text["hf_model_name"]


# What a tokenizer folder holds (copied into checkpoints and exports; never the weights beside them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "sentencepiece.bpe.model", "spiece.model")


def copy_tokenizer_files(source: str | Path, target: str | Path) -> Path:
    """Copy the tokenizer files of `source` (e.g. a Hugging Face model folder) into `target`."""
    import shutil

    source, target = Path(source), Path(target)
    files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not any(f.name in ("tokenizer.json", "vocab.txt") for f in files):
        raise FileNotFoundError(f"{source}: not a tokenizer folder (no tokenizer.json or vocab.txt)")
    target.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copy2(file, target / file.name)
    return target


@functools.lru_cache(maxsize=8)
def target_tokenizer(folder: str, context_length: int) -> TargetTokenizer:
    """The tokenizer of a folder on any storage (a remote one is read through this machine's copy)."""
    from ccr_ray.storage import localize

    return TargetTokenizer(localize(folder), context_length)


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 8000,
                    min_frequency: int = 2) -> Path:
    """Train a cased multilingual WordPiece tokenizer (M-BERT's recipe, small) and save it as a Hugging Face
    tokenizer folder that `AutoTokenizer.from_pretrained` and the torch-free runtime (`tokenizers`) both load."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # M-BERT (cased): no lower-casing, no accent stripping, CJK ideographs split into single characters
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False,
                                                lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    (out / "ccr_ray_tokenizer.json").write_text(json.dumps({"trained_by": "ccr_ray.tokenization.train_wordpiece",
                                                            "vocab_size": tok.get_vocab_size()}))
    return out
