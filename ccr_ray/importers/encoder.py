"""What a packaged-format reader hands the folder writer, independent of where the model came from: a BERT
encoder's shape, its float32 weights under Hugging Face BertModel names, and a SentencePiece-unigram vocabulary
with its normalisation. Plain data, numpy only."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class ImportFormatError(ValueError):
    """A packaged model file that cannot be read: the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class BertShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab_size: int  # rows of the word-embedding table (may exceed the tokenizer's pieces)
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float


@dataclass(frozen=True)
class UnigramVocab:
    """A SentencePiece-unigram vocabulary: pieces with their log-probabilities, the special tokens' ids by role
    (bos, eos, pad, unk, mask), and the text normalisation the model was tokenised with: per-character
    `replacements` (applied first), then Unicode NFKC when `nfkc` except on the characters in `nfkc_kept`
    (which the source leaves as they are), then runs of spaces collapsed to one when `collapse_spaces`."""

    pieces: list[str]
    scores: list[float]
    specials: dict[str, int]
    replacements: dict[str, str] = field(default_factory=dict)
    nfkc: bool = True
    nfkc_kept: frozenset[str] = frozenset()
    collapse_spaces: bool = True


@dataclass
class ImportedEncoder:
    """A BERT encoder read from a packaged file: `weights` are float32 arrays under BertModel's state-dict names
    (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`, ...), `source` says where
    it came from (written to the folder's ccr_ray_import.json). The sentence embedding is `pooling` ("mean" over
    all tokens, or "cls") of the last layer, L2-normalised when `normalize`; `prompts` are the prefixes the model
    expects by use (e.g. {"query": "query: "})."""

    shape: BertShape
    vocab: UnigramVocab
    weights: dict[str, np.ndarray]
    source: dict[str, object]
    pooling: str = "mean"
    normalize: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
