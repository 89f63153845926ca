"""An M-BERT-shaped tokenizer folder for real-size benchmarks, built without a download."""

from __future__ import annotations

import json
from pathlib import Path

MBERT_VOCAB = 119_547  # bert-base-multilingual-cased


def mbert_shaped_tokenizer(folder: Path, texts: list[str], learned: int = 20_000) -> str:
    """vocab.txt of M-BERT's size and special ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102): up to `learned`
    WordPieces trained on `texts` (so captions tokenize to realistic lengths), then filler tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=learned, special_tokens=["[UNK]"]))
    pieces = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if t != "[UNK]"]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + pieces
    vocab += [f"[filler{i}]" for i in range(MBERT_VOCAB - len(vocab))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab[:MBERT_VOCAB]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    return str(folder)
