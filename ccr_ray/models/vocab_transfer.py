"""Vocabulary transfer: a new token table E initialised from the English tower's own input embeddings, for when no
pretrained multilingual table exists (a language the table lacks, or a WordPiece table trained on the data).

Each piece of the new vocabulary (FOCUS / WECHSEL in spirit, without an auxiliary embedding model):
    shared     the English vocabulary has the same piece (same word-initial / continuation role, its casing):
               its English row, copied
    composed   otherwise the English tokenizer splits the piece's text into pieces it has: the mean of their rows
    random     neither (only unknown pieces): N(0, std of the English rows)
Specials map by role (cls, sep, pad, unk) to the English tokenizer's. The table then lives in the tower's input
space, so W_e starts as the identity (E is the tower's width).

Pure PyTorch + the `tokenizers` library; the tokenizers and the English rows come from the caller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

SHARED, COMPOSED, RANDOM = "shared", "composed", "random"


@dataclass(frozen=True)
class PieceStyle:
    """How a tokenizer marks where a piece sits in a word."""

    continuation: str = ""  # WordPiece: "##" before a piece that continues a word
    word_start: str = ""  # SentencePiece / Metaspace: "▁" before a piece that starts a word
    word_end: str = ""  # CLIP's BPE: "</w>" after a piece that ends a word
    lowercase: bool = False  # the tokenizer lower-cases its input

    @classmethod
    def of(cls, tok) -> PieceStyle:
        spec = json.loads(tok.to_str())
        model = spec.get("model") or {}
        kind = model.get("type")
        lower = _lowercases(spec.get("normalizer"))
        if kind == "WordPiece":
            return cls(continuation=model.get("continuing_subword_prefix") or "##", lowercase=lower)
        if kind == "BPE" and model.get("end_of_word_suffix"):
            return cls(word_end=model["end_of_word_suffix"], lowercase=lower)
        if kind in ("Unigram", "BPE"):
            return cls(word_start="▁", lowercase=lower)
        raise ValueError(f"vocabulary transfer: tokenizer model {kind!r} is not supported")

    def surface(self, piece: str) -> tuple[str, bool]:
        """(text, starts a word) of a piece."""
        if self.continuation:
            return (piece[len(self.continuation):], False) if piece.startswith(self.continuation) else (piece, True)
        if self.word_start:
            return (piece[len(self.word_start):], True) if piece.startswith(self.word_start) else (piece, False)
        return piece.removesuffix(self.word_end), True

    def candidates(self, text: str, starts_word: bool) -> list[str]:
        """The pieces of this vocabulary that mean `text` in that role, most exact first."""
        forms = [text.lower()] if self.lowercase else list(dict.fromkeys([text, text.lower()]))
        if self.continuation:
            return forms if starts_word else [self.continuation + f for f in forms]
        if self.word_start:
            return [self.word_start + f for f in forms] if starts_word else forms
        # CLIP's BPE: a word-initial piece is most often a whole word ("dog</w>"), a continuation a word end
        return [f + self.word_end for f in forms] + forms if starts_word else forms + [f + self.word_end
                                                                                      for f in forms]


def _lowercases(normalizer) -> bool:
    if not normalizer:
        return False
    if normalizer.get("type") == "Lowercase" or normalizer.get("lowercase"):
        return True
    return any(_lowercases(n) for n in normalizer.get("normalizers", []) or [])


def english_matches(target, english, source_ids: list[int], roles: dict[str, tuple[int, int]]) -> list[int | None]:
    """Per target piece (in table order): the id of the same piece in the English vocabulary (same text and role
    in the word, the English tokenizer's casing; specials by role), or None."""
    tgt_style, en_style = PieceStyle.of(target), PieceStyle.of(english)
    en_vocab = english.get_vocab()
    en_unk = roles.get("unk", (None, None))[1]
    special = {t: e for t, e in roles.values() if t is not None and e is not None}
    out: list[int | None] = []
    for source_id in source_ids:
        if source_id in special:
            out.append(special[source_id])
            continue
        text, starts_word = tgt_style.surface(target.id_to_token(source_id) or "")
        match = next((en_vocab[c] for c in en_style.candidates(text, starts_word) if c in en_vocab), None) if text \
            else None
        out.append(match if match != en_unk else None)
    return out


def transfer_table(target, english, english_rows: torch.Tensor, source_ids: list[int],
                   roles: dict[str, tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, dict[str, int]]:
    """Rows for the target pieces `source_ids` (in table order) from `english_rows` [V_en, width].

    target, english   `tokenizers.Tokenizer`s (the new vocabulary's, the tower's own)
    roles             special-token role -> (target id, English id): cls, sep, pad, unk
    Returns the table [len(source_ids), width] and how many rows were shared / composed / random."""
    tgt_style = PieceStyle.of(target)
    en_unk = roles.get("unk", (None, None))[1]
    rows = english_rows.detach().float()
    generator = torch.Generator().manual_seed(seed)
    std = float(rows.std())
    out = torch.empty(len(source_ids), rows.shape[1])
    counts = {SHARED: 0, COMPOSED: 0, RANDOM: 0}
    for row, (source_id, match) in enumerate(zip(source_ids, english_matches(target, english, source_ids, roles))):
        if match is not None:
            out[row], kind = rows[match], SHARED
        else:
            text, _ = tgt_style.surface(target.id_to_token(source_id) or "")
            pieces = [i for i in english.encode(text, add_special_tokens=False).ids if i != en_unk] if text else []
            if pieces:
                out[row], kind = rows[pieces].mean(dim=0), COMPOSED
            else:
                out[row], kind = torch.randn(rows.shape[1], generator=generator) * std, RANDOM
        counts[kind] += 1
    return out, counts


def fit_projection(table: torch.Tensor, english_rows: torch.Tensor, matches: list[int | None], ridge: float = 1e-3
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """W_e, b_e (as nn.Linear holds them: [width, dim], [width]) mapping a pretrained table's rows onto the English
    tower's input rows of the same pieces: ridge least squares over the pieces both vocabularies have. A table
    from another model (multilingual-e5-small's, M-BERT's) then enters the tower where its English pieces would,
    and its other languages' rows, near their translations in the table, follow."""
    pairs = [(row, match) for row, match in enumerate(matches) if match is not None]
    if len(pairs) < table.shape[1]:
        raise ValueError(f"only {len(pairs)} pieces are shared with the English vocabulary; a {table.shape[1]}-wide "
                         "projection needs at least as many to be fitted")
    x = table.detach().float()[[r for r, _ in pairs]]
    y = english_rows.detach().float()[[m for _, m in pairs]]
    x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    gram = x1.T @ x1
    solution = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * torch.eye(x1.shape[1]), x1.T @ y)
    fit = torch.nn.functional.cosine_similarity(x1 @ solution, y).mean()
    return solution[:-1].T.contiguous(), solution[-1].contiguous(), {"pairs": len(pairs), "fit_cosine": float(fit)}
