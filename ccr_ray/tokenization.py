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
    """A Hugging Face tokenizer folder (M-BERT's, XLM-R's, or the one trained for the data), run through the Rust
    `tokenizers` library: `[CLS] ... [SEP]` (`<s> ... </s>`), truncated and padded to the context length, exactly
    as `tokenizer(texts, padding='max_length', truncation=True, max_length=context_length)`. A folder with only a
    `vocab.txt` is converted once through transformers and the `tokenizer.json` cached beside it.

    A folder with a vocabulary map (`vocab_map.json`, written by `trim_tokenizer`) maps every id to its row in a
    trimmed token table: the pieces kept keep their order, every other piece becomes `<unk>`. Training, evaluation,
    the ONNX export and the torch-free runtime all tokenize through this class, so they agree on the ids."""

    def __init__(self, folder: str, context_length: int):
        from tokenizers import Tokenizer

        self.folder = str(folder)
        self.context_length = context_length
        self._tok = Tokenizer.from_file(str(ensure_tokenizer_json(folder)))
        special = _special_ids(Path(folder), self._tok)
        self._tok.enable_truncation(max_length=context_length)
        self._tok.enable_padding(length=context_length, pad_id=special["pad"], pad_token=special["pad_token"])
        self.kept: np.ndarray | None = None  # source ids of the table's rows, in row order (None: no map)
        self._map: np.ndarray | None = None  # source id -> row
        vocab_map = Path(folder) / VOCAB_MAP_FILE
        if vocab_map.is_file():
            self.kept, self._map = read_vocab_map(vocab_map, self._tok.get_vocab_size(with_added_tokens=True))
        self.pad_id, self.cls_id, self.sep_id = (self._row(special[k]) for k in ("pad", "cls", "sep"))

    def _row(self, source_id: int) -> int:
        return int(self._map[source_id]) if self._map is not None else int(source_id)

    @property
    def vocab_size(self) -> int:
        if self.kept is not None:
            return len(self.kept)
        return self._tok.get_vocab_size(with_added_tokens=True)

    def info(self) -> TokenizerInfo:
        return TokenizerInfo(vocab_size=self.vocab_size, pad_id=self.pad_id, cls_id=self.cls_id, sep_id=self.sep_id)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = self._tok.encode_batch(list(texts))
        shape = (len(texts), self.context_length)
        ids = np.asarray([e.ids for e in encoded], dtype=np.int64).reshape(shape)
        mask = np.asarray([e.attention_mask for e in encoded], dtype=np.int64).reshape(shape)
        if self._map is not None:
            ids = self._map[ids]
        return ids, mask

    def count_truncated(self, texts: Sequence[str]) -> int:
        return sum(len(e.overflowing) > 0 for e in self._tok.encode_batch(list(texts)))


# ---------------------------------------------------------------------------------------------- trimmed tables

VOCAB_MAP_FILE = "vocab_map.json"
VOCAB_MAP_FORMAT = "ccr_ray.vocab_map"


def read_vocab_map(path: Path, source_vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept source ids in row order, source id -> row with every other id on <unk>'s row)."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != VOCAB_MAP_FORMAT:
        raise ValueError(f"{path}: not a ccr-ray vocabulary map (format {data.get('format')!r})")
    if int(data["source_vocab_size"]) != source_vocab:
        raise ValueError(f"{path}: made for a vocabulary of {data['source_vocab_size']} pieces; the tokenizer beside "
                         f"it has {source_vocab}")
    kept = np.asarray(data["kept"], dtype=np.int64)
    rows = np.full(source_vocab, -1, dtype=np.int64)
    rows[kept] = np.arange(len(kept))
    unk = int(rows[int(data["unk_id"])])
    if unk < 0:
        raise ValueError(f"{path}: the unknown piece (id {data['unk_id']}) is not kept")
    rows[rows < 0] = unk
    return kept, rows


def trim_tokenizer(source: str | Path, texts: Iterable[str], out: str | Path, batch: int = 4096) -> Path:
    """A copy of the tokenizer folder `source` whose vocabulary map keeps only the pieces `texts` use, plus every
    special and added token (pad, unk, cls, sep, mask...), in their original order. A 250k-piece multilingual
    table then trains as the few tens of thousands of rows the data can reach (a dense table update is the
    optimizer's largest cost); pieces outside it read as <unk>."""
    from tokenizers import Tokenizer

    source, out = Path(source), Path(out)
    tok = Tokenizer.from_file(str(ensure_tokenizer_json(source)))
    size = tok.get_vocab_size(with_added_tokens=True)
    used = np.zeros(size, dtype=bool)
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == batch:
            used[np.fromiter((i for e in tok.encode_batch(chunk) for i in e.ids), dtype=np.int64)] = True
            chunk = []
    if chunk:
        used[np.fromiter((i for e in tok.encode_batch(chunk) for i in e.ids), dtype=np.int64)] = True
    specials = {v for v in _special_ids(source, tok).values() if isinstance(v, int)}
    specials |= set(tok.get_added_tokens_decoder())  # [MASK], <mask>, ... : ids, not pieces of the text
    unk = special_roles(source, tok).get("unk")
    if unk is None:
        raise ValueError(f"tokenizer {source}: no unknown token ([UNK] / <unk>) to map trimmed pieces to")
    used[sorted(specials | {unk})] = True
    copy_tokenizer_files(source, out)
    kept = np.flatnonzero(used)
    (out / VOCAB_MAP_FILE).write_text(json.dumps({
        "format": VOCAB_MAP_FORMAT, "version": 1, "source_vocab_size": int(size), "unk_id": int(unk),
        "kept": kept.tolist()}))
    return out


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


# special-token roles and the names tokenizers give them (BERT, XLM-R / RoBERTa, CLIP), after the folder's own
ROLE_NAMES = {"pad": ("[PAD]", "<pad>"), "cls": ("[CLS]", "<s>", "<start_of_text>"),
              "sep": ("[SEP]", "</s>", "<end_of_text>"), "unk": ("[UNK]", "<unk>")}


def special_roles(folder: str | Path | None, tok) -> dict[str, int]:
    """Role -> id of the special tokens a tokenizer has: the names its folder's special_tokens_map /
    tokenizer_config give, else the usual names of each role (a role it lacks is left out)."""
    named: dict[str, str] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        path = Path(folder) / file if folder else None
        if path is not None and path.exists():
            data = json.loads(path.read_text())
            for role in ROLE_NAMES:
                value = data.get(f"{role}_token")
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    named.setdefault(role, value)
    out = {}
    for role, names in ROLE_NAMES.items():
        for name in ([named[role]] if role in named else []) + list(names):
            if tok.token_to_id(name) is not None:
                out[role] = int(tok.token_to_id(name))
                break
    return out


def _special_ids(folder: Path, tok) -> dict:
    """The pad/cls/sep ids a target tokenizer needs (and the pad token's text, for padding)."""
    roles = special_roles(folder, tok)
    missing = [role for role in ("pad", "cls", "sep") if role not in roles]
    if missing:
        raise ValueError(f"tokenizer {folder}: no {'/'.join(missing)} token; a BERT- or XLM-R-style tokenizer is "
                         "needed")
    return {**{k: roles[k] for k in ("pad", "cls", "sep")}, "pad_token": tok.id_to_token(roles["pad"])}


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
                   "merges.txt", "added_tokens.json", "sentencepiece.bpe.model", "spiece.model", VOCAB_MAP_FILE)


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
