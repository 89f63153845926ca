"""A tiny random BERT as a Hugging Face folder, written by the tests themselves (no weights are downloaded)."""

from __future__ import annotations

import json

import torch

from ccr_ray.data import schema
from ccr_ray.tokenization import train_wordpiece

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 64, "max_position_embeddings": 64, "pad_token_id": 0, "type_vocab_size": 2,
             "hidden_act": "gelu", "layer_norm_eps": 1e-12}


def write_tiny_bert(folder, texts, pooling: str | None = "mean", seed: int = 0):
    """A Hugging Face folder: an uncased WordPiece tokenizer trained on `texts`, a random BertModel saved with
    save_pretrained (config.json + model.safetensors), and sentence-transformers' pooling files."""
    from tokenizers import normalizers

    from ccr_ray._compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # transformers imports torchvision (platform notes)
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    train_wordpiece(texts, folder, vocab_size=300, min_frequency=1)
    fast = PreTrainedTokenizerFast.from_pretrained(str(folder))  # make it uncased, like MiniLM's
    fast.backend_tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None)
    fast.save_pretrained(str(folder))
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(fast), **{k: v for k, v in TINY_BERT.items() if k != "model_type"}),
                      add_pooling_layer=True)
    model.save_pretrained(str(folder))
    if pooling:
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_cls_token": pooling == "cls"}))
    return folder


def english_captions(data_root: str, split: str = "train") -> list[str]:
    column = schema.read_split_table(data_root, split, ["en"])[schema.captions_column("en")]
    return [c for caps in column.to_pylist() for c in caps]
