"""Write an `ImportedEncoder` (from any packaged-format reader) as a standard local Hugging Face BERT folder:
what transformers' AutoModel/AutoTokenizer, sentence-transformers and ccr-ray's text towers read, so nothing
downstream knows where the model came from.

    config.json                       BertModel config
    model.safetensors                 float32 weights, BertModel names (no `bert.` prefix)
    tokenizer.json                    tokenizers' Unigram model, normaliser, Metaspace, `<s> $A </s>` template
    tokenizer_config.json, special_tokens_map.json   the special tokens by name (cls/sep/pad/unk/mask)
    modules.json, 1_Pooling/config.json, [2_Normalize/], sentence_bert_config.json,
    config_sentence_transformers.json   the sentence-transformers pipeline (pooling, normalisation, prompts)
    ccr_ray_import.json               where the weights came from (package, version, file, sha256)

The folder is staged beside its target and swapped in by renames (`storage.staged_folder`): a failed write leaves
nothing, or the earlier folder, in place.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ccr_ray.importers.encoder import BertShape, ImportedEncoder, UnigramVocab
from ccr_ray.storage import staged_folder

METASPACE = "\u2581"  # SentencePiece's word-boundary marker
PLACEHOLDERS = 0xF0000  # Supplementary Private Use Area-A: stands in for characters NFKC must not change
WEIGHTS_FILE = "model.safetensors"
IMPORT_RECORD = "ccr_ray_import.json"
POOLING_MODES = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}


def bert_weight_shapes(shape: BertShape) -> dict[str, tuple[int, ...]]:
    """BertModel's state dict (without the pooler, which sentence encoders do not use): name -> shape."""
    hidden, ffn = shape.hidden, shape.intermediate
    out: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (shape.vocab_size, hidden),
        "embeddings.position_embeddings.weight": (shape.max_positions, hidden),
        "embeddings.token_type_embeddings.weight": (shape.type_vocab_size, hidden),
        "embeddings.LayerNorm.weight": (hidden,), "embeddings.LayerNorm.bias": (hidden,),
    }
    linear = {"attention.self.query": (hidden, hidden), "attention.self.key": (hidden, hidden),
              "attention.self.value": (hidden, hidden), "attention.output.dense": (hidden, hidden),
              "intermediate.dense": (ffn, hidden), "output.dense": (hidden, ffn)}
    for i in range(shape.layers):
        for name, dims in linear.items():
            out[f"encoder.layer.{i}.{name}.weight"] = dims
            out[f"encoder.layer.{i}.{name}.bias"] = dims[:1]
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            out[f"encoder.layer.{i}.{norm}.weight"] = (hidden,)
            out[f"encoder.layer.{i}.{norm}.bias"] = (hidden,)
    return out


def check_weights(encoder: ImportedEncoder) -> None:
    """Every BertModel weight present with its shape, float32, finite; nothing else (a reader's mistake must not
    reach the folder)."""
    expected = bert_weight_shapes(encoder.shape)
    got = {name: tuple(w.shape) for name, w in encoder.weights.items()}
    wrong = sorted(set(expected) ^ set(got)) + sorted(n for n in expected if n in got and got[n] != expected[n])
    if wrong:
        raise ValueError(f"the imported weights do not form a BertModel: {len(wrong)} names missing, extra or of "
                         f"the wrong shape, e.g. {wrong[:3]}")
    for name, w in encoder.weights.items():
        if w.dtype != np.float32 or not np.isfinite(w).all():
            raise ValueError(f"imported weight {name} is {w.dtype} or not finite")


def bert_config(encoder: ImportedEncoder) -> dict[str, Any]:
    shape, specials = encoder.shape, encoder.vocab.specials
    return {
        "architectures": ["BertModel"], "model_type": "bert", "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "intermediate_size": shape.intermediate, "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_positions, "type_vocab_size": shape.type_vocab_size,
        "layer_norm_eps": shape.layer_norm_eps, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02, "position_embedding_type": "absolute",
        "pad_token_id": specials["pad"], "bos_token_id": specials["bos"], "eos_token_id": specials["eos"],
        "classifier_dropout": None, "use_cache": True, "torch_dtype": "float32",
    }


def _char_class(chars: list[str]) -> str:
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in sorted(chars)) + "]"


def build_normalizer(vocab: UnigramVocab):
    """The vocabulary's normalisation as tokenizers normalisers: one regex Replace per replacement text (the
    characters mapped to it), NFKC, then runs of 2+ spaces to one. A character NFKC must leave alone is swapped
    for a private-use placeholder (plane 15, which NFKC keeps and captions do not use) around the NFKC step."""
    from tokenizers import Regex, normalizers

    by_output: dict[str, list[str]] = {}
    for char, out in vocab.replacements.items():
        by_output.setdefault(out, []).append(char)
    chained = [c for out in by_output for c in out if c in vocab.replacements]
    if chained:  # the source applies its map in one pass; a sequence of Replaces would apply them twice
        raise ValueError(f"the normalisation map replaces {chained[:3]}, which it also produces")
    steps = [normalizers.Replace(Regex(_char_class(chars)), out) for out, chars in sorted(by_output.items())]
    if vocab.nfkc:
        nfkc = normalizers.NFKC()
        kept = sorted(c for c in vocab.nfkc_kept if nfkc.normalize_str(c) != c)  # only what this NFKC changes
        placeholders = [chr(PLACEHOLDERS + i) for i in range(len(kept))]
        steps += [normalizers.Replace(c, p) for c, p in zip(kept, placeholders)]
        steps.append(nfkc)
        steps += [normalizers.Replace(p, c) for c, p in zip(kept, placeholders)]
    if vocab.collapse_spaces:
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    return normalizers.Sequence(steps)


def build_tokenizer(vocab: UnigramVocab):
    """A tokenizers Tokenizer: Unigram over the pieces and scores, the normaliser, a Metaspace pre-tokenizer that
    always prepends the marker, `<s> $A </s>` around each text, the specials as special added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram(list(zip(vocab.pieces, vocab.scores)), unk_id=vocab.specials["unk"],
                                   byte_fallback=False))
    tok.normalizer = build_normalizer(vocab)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always")
    bos, eos = (vocab.pieces[vocab.specials[k]] for k in ("bos", "eos"))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, vocab.specials["bos"]), (eos, vocab.specials["eos"])])
    # already in the vocabulary (same ids); marked special so text never splits them and decoding skips them
    tok.add_special_tokens([AddedToken(vocab.pieces[i], special=True, lstrip=(role == "mask"), normalized=False)
                            for role, i in sorted(vocab.specials.items(), key=lambda kv: kv[1])])
    return tok


def special_token_names(vocab: UnigramVocab) -> dict[str, str]:
    """transformers' special-token keys: cls/bos is the sequence start, sep/eos its end (RoBERTa's convention)."""
    name = {role: vocab.pieces[i] for role, i in vocab.specials.items()}
    out = {"bos_token": name["bos"], "cls_token": name["bos"], "eos_token": name["eos"], "sep_token": name["eos"],
           "pad_token": name["pad"], "unk_token": name["unk"]}
    if "mask" in name:
        out["mask_token"] = name["mask"]
    return out


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _write_sentence_transformers(encoder: ImportedEncoder, folder: Path) -> None:
    if encoder.pooling not in POOLING_MODES:
        raise ValueError(f"pooling {encoder.pooling!r}: the folder writer knows {', '.join(POOLING_MODES)}")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if encoder.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    _write_json(folder / "modules.json", modules)
    pooling = {"word_embedding_dimension": encoder.shape.hidden, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
               "pooling_mode_lasttoken": False, "include_prompt": True}
    pooling[POOLING_MODES[encoder.pooling]] = True
    _write_json(folder / "1_Pooling" / "config.json", pooling)
    _write_json(folder / "sentence_bert_config.json",
                {"max_seq_length": encoder.shape.max_positions, "do_lower_case": False})
    _write_json(folder / "config_sentence_transformers.json",
                {"prompts": encoder.prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"})


def write_bert_folder(encoder: ImportedEncoder, out: str | Path, replace: bool = False) -> Path:
    """Write the folder at `out` (staged, then swapped in). An existing `out` is an error unless `replace`."""
    from safetensors.numpy import save_file

    out = Path(out).expanduser().absolute()
    if out.exists() and not replace:
        raise FileExistsError(f"{out} exists")
    check_weights(encoder)
    tokenizer = build_tokenizer(encoder.vocab)
    names = special_token_names(encoder.vocab)
    with staged_folder(out) as tmp:
        _write_json(tmp / "config.json", bert_config(encoder))
        save_file(encoder.weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / WEIGHTS_FILE).chmod((tmp / "config.json").stat().st_mode)  # safetensors creates it 0600
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "special_tokens_map.json", names)
        _write_json(tmp / "tokenizer_config.json", {
            **names, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": encoder.shape.max_positions,
            "clean_up_tokenization_spaces": False, "do_lower_case": False})
        _write_sentence_transformers(encoder, tmp)
        _write_json(tmp / IMPORT_RECORD, {**encoder.source, "pieces": len(encoder.vocab.pieces),
                                          "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return out
