"""Tokenizers: CLIP's BPE for English, a Hugging Face tokenizer (M-BERT, or the demo's WordPiece) for the rest.

Both run on the Rust `tokenizers` library and import neither torch nor open_clip, so Ray Data preprocessing
processes start fast and the ONNX runtime can use the same code paths.

Both return numpy arrays of fixed length `context_length`, so batches stack without padding logic:
  * English: SOT + BPE + EOT, zero-padded; with truncation the last kept token becomes EOT (open_clip).
  * Others:  [CLS] + WordPieces + [SEP], padded with [PAD] (`padding='max_length', truncation=True`).
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


class EnglishTokenizer:
    """CLIP's BPE for English captions: SOT + BPE + EOT, zero-padded to the context; truncation keeps EOT last."""

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
def english_tokenizer(context_length: int) -> EnglishTokenizer:
    """Cached per process: Ray Data tasks reuse worker processes, so the vocabulary loads once per worker."""
    return EnglishTokenizer(context_length)


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
