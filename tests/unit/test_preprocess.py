"""TrainPreprocessor: caption slots, teacher pairing by index, bad images counted, not fatal."""

import io

import numpy as np
from PIL import Image

from ccr_ray.data.preprocess import PreprocessSpec, TrainPreprocessor, select_language


def png(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


def rows(tokenizer_rows=False):
    obj = lambda values: np.array(values, dtype=object)  # noqa: E731
    return {
        "image_id": obj(["a", "b", "c"]),
        "image": obj([png(), b"not an image", png((0, 0, 255))]),
        "image_path": obj([None, None, None]),
        "captions_en": obj([["a red circle", "a circle that is red"], ["a blue square"], ["a green star"]]),
        "captions_de": obj([["ein roter Kreis", "ein Kreis, der rot ist"], ["ein blaues Quadrat"], []]),
        "captions_zh": obj([["一个红色的圆形"], ["一个蓝色的正方形"], ["一颗绿色的五角星"]]),
    }


def spec(micro_data, inputs, languages=("de", "zh")):
    image = {"size": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "shortest"}
    return PreprocessSpec(languages=languages, inputs=inputs, image=image if "image" in inputs else None,
                          context_length=24, tokenizer=f"{micro_data}/tokenizer")


def test_slots_teacher_pairing_and_missing_language(micro_data):
    pre = TrainPreprocessor(spec(micro_data, ("text_en", "text_target")))
    out = pre(rows())
    # row a: de has 2 captions paired with 2 English, zh 1 -> 2 slots; row b: 1 slot; row c lacks de -> dropped
    assert out["text_ids_de"].shape == (3, 24) and out["text_ids_zh"].shape == (3, 24)
    assert pre.missing_language == 1
    from ccr_ray.tokenization import EnglishTokenizer

    en = EnglishTokenizer(24)
    assert np.array_equal(out["text_en_ids_de"], en(["a red circle", "a circle that is red", "a blue square"]))
    # zh has one caption for row a: both slots reuse it, teacher = English caption 0 both times
    assert np.array_equal(out["text_en_ids_zh"], en(["a red circle", "a red circle", "a blue square"]))
    assert (out["text_ids_zh"][0] == out["text_ids_zh"][1]).all()
    picked = select_language(out, "zh", english_only=False)
    assert set(picked) == {"text_ids", "text_mask", "text_en_ids"}


def test_bad_image_is_counted_and_skipped(micro_data):
    pre = TrainPreprocessor(spec(micro_data, ("image", "text_target")))
    out = pre(rows())
    assert pre.bad_images == 1  # row b
    assert out["pixels"].shape == (2, 3, 16, 16)  # row a's two slots survive; b undecodable, c lacks de
    assert out["pixels"].dtype == np.uint8 and (out["pixels"][:, 0] == 255).all()  # red, not yet normalised
    assert out["text_ids_de"].shape[0] == 2


def test_english_only_stream(micro_data):
    pre = TrainPreprocessor(spec(micro_data, ("image", "text_en"), languages=("en",)))
    out = pre(rows())
    assert set(out) == {"pixels", "text_en_ids"}
    assert out["text_en_ids"].shape[0] == 3  # a: 2 captions, b: bad image, c: 1
