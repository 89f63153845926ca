"""Tokenizers: our torch-free CLIP BPE equals open_clip's SimpleTokenizer; the target tokenizer equals
transformers' `tokenizer(..., padding='max_length', truncation=True)`."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from ccr_ray.data import schema
from ccr_ray.tokenization import EnglishTokenizer, TargetTokenizer, train_wordpiece
from tests.conftest import SHARED_DATA

EDGE_CASES = ["A  man &amp; a DOG's   toy!!", "x" * 300, "", "  spaces  ", "Café naïve 日本語 😀", "it's 3 o'clock",
              "tabs\tand\nnewlines", "UPPER lower MiXeD"]


def english_corpus(micro_data):
    texts = list(EDGE_CASES)
    table = pq.read_table(schema.split_files(micro_data, "train")[0], columns=["captions_en"])
    texts += [c for caps in table["captions_en"].to_pylist() for c in caps]
    for path in sorted(SHARED_DATA.glob("multi30k/task*/*.en"))[:4]:
        texts += path.read_text(encoding="utf-8").splitlines()[:3000]
    return texts


@pytest.mark.parametrize("context", [77, 16])
def test_clip_bpe_equals_open_clip(micro_data, context):
    from ccr_ray._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from open_clip.tokenizer import SimpleTokenizer

    texts = english_corpus(micro_data)
    ours = EnglishTokenizer(context)(texts)
    ref = SimpleTokenizer(context_length=context)(texts, context_length=context).numpy()
    mismatched = [texts[i] for i in np.flatnonzero((ours != ref).any(axis=1))]
    assert not mismatched, mismatched[:3]
    assert ours.shape == (len(texts), context)


def test_truncation_keeps_eot_last():
    ids = EnglishTokenizer(8)(["one two three four five six seven eight nine ten"])
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407
    assert EnglishTokenizer(8).count_truncated(["a b", "one two three four five six seven eight nine"]) == 1


def test_target_tokenizer_equals_transformers(micro_data):
    from transformers import AutoTokenizer

    folder = f"{micro_data}/tokenizer"
    table = pq.read_table(schema.split_files(micro_data, "train")[0])
    texts = [c for lang in ("de", "cs", "zh", "ja") for caps in table[f"captions_{lang}"].to_pylist() for c in caps]
    texts += ["Ünïcödé wörds ünseen", "word " * 100, ""]
    ours = TargetTokenizer(folder, 40)
    ids, mask = ours(texts)
    ref = AutoTokenizer.from_pretrained(folder)(texts, padding="max_length", truncation=True, max_length=40,
                                                return_tensors="np")
    assert np.array_equal(ids, ref["input_ids"]) and np.array_equal(mask, ref["attention_mask"])
    assert (ids[:, 0] == ours.cls_id).all()
    assert ((ids == ours.sep_id).sum(axis=1) == 1).all()  # exactly one [SEP]: the pooling position
    assert ours.count_truncated(texts) >= 1


def test_vocab_txt_only_folder_is_converted(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "ein", "rot", "##er", "kreis"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = TargetTokenizer(str(tmp_path), 8)
    ids, mask = tok(["ein roter kreis"])
    assert ids[0, :6].tolist() == [2, 5, 6, 7, 8, 3] and mask[0].sum() == 6


def test_train_wordpiece_roundtrip(tmp_path):
    folder = train_wordpiece(["ein roter Kreis", "一个红色的圆形", "Un cercle rouge"] * 50, tmp_path / "tok",
                             vocab_size=200, min_frequency=1)
    tok = TargetTokenizer(str(folder), 16)
    ids, _ = tok(["一个红色的圆形"])
    assert tok.pad_id == 0 and tok.cls_id == 2 and tok.sep_id == 3
    assert (ids[0] != 1).all()  # no [UNK]: CJK ideographs are split into characters
