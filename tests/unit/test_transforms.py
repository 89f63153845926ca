"""The numpy/PIL image transform equals open_clip's torchvision preprocessing."""

import numpy as np
import pytest
import torch
from PIL import Image

from ccr_ray._compat import ensure_torchvision_importable
from ccr_ray.data.transforms import ImageTransform, open_image

ensure_torchvision_importable()
from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: E402


@pytest.mark.parametrize("size", [(64, 64), (100, 60), (37, 90), (224, 300), (500, 333)])
@pytest.mark.parametrize("image_size", [32, 224])
def test_matches_open_clip_preprocess(size, image_size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    cfg = PreprocessCfg(size=image_size)
    ref = image_transform_v2(cfg, is_train=False)(image)
    ours = ImageTransform(size=image_size, mean=tuple(cfg.mean), std=tuple(cfg.std))(image)
    assert ours.shape == tuple(ref.shape)
    assert np.abs(ours - ref.numpy()).max() < 1e-5


def test_grey_and_rgba_become_rgb(tmp_path):
    t = ImageTransform(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    for mode in ("L", "RGBA", "P"):
        out = t(Image.new(mode, (20, 20)))
        assert out.shape == (3, 16, 16)
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    assert open_image(None, "x.png", str(tmp_path)).size == (8, 8)
    with pytest.raises(ValueError):
        open_image(None, None)


def test_batch_is_float32():
    t = ImageTransform(size=8, mean=(0, 0, 0), std=(1, 1, 1))
    out = t.batch([Image.new("RGB", (8, 8), (255, 255, 255))] * 2)
    assert out.dtype == np.float32 and torch.allclose(torch.from_numpy(out), torch.ones(2, 3, 8, 8))


def test_stream_ships_uint8_and_the_step_normalises_like_open_clip():
    """The training stream carries uint8 pixels; `normalize_pixels` (what train_step runs on the device) must
    give open_clip's float preprocessing, as the numpy path does."""
    from ccr_ray.train.state import normalize_pixels

    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8))
    cfg = PreprocessCfg(size=32)
    ref = image_transform_v2(cfg, is_train=False)(image)
    t = ImageTransform(size=32, mean=tuple(cfg.mean), std=tuple(cfg.std))
    raw = t.to_uint8(image)
    assert raw.dtype == np.uint8 and raw.shape == (3, 32, 32)
    stepped = normalize_pixels({"pixels": torch.from_numpy(np.stack([raw, raw]))}, t)["pixels"]
    assert stepped.dtype == torch.float32
    assert (stepped - ref).abs().max() < 1e-5
    assert np.abs(t.normalize(raw) - ref.numpy()).max() < 1e-5
    already = {"pixels": torch.from_numpy(t.batch([image]))}
    assert normalize_pixels(already, t) is already  # float input is taken as normalised
