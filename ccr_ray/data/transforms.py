"""Pure numpy + PIL transforms (no torch, no ray): the training pipeline, evaluation and the torch-free ONNX
runtime all use these, so preprocessing is identical everywhere.

`ImageTransform` reproduces open_clip's eval preprocessing for `resize_mode='shortest'` exactly:
torchvision `Resize(size, bicubic)` on a PIL image (short side -> size, long side int(size * long / short)),
`CenterCrop(size)` (offsets int(round((H - size) / 2))), RGB, `ToTensor` (/255), `Normalize(mean, std)`.
The seeds use no augmentation at train time either (spec section 1).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class ImageTransform:
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def from_config(cls, cfg: dict) -> ImageTransform:
        if cfg.get("resize_mode", "shortest") != "shortest":
            raise ValueError(f"unsupported resize_mode {cfg.get('resize_mode')!r} (only 'shortest')")
        return cls(size=int(cfg["size"]), mean=tuple(float(v) for v in cfg["mean"]),
                   std=tuple(float(v) for v in cfg["std"]), interpolation=cfg.get("interpolation", "bicubic"))

    def to_config(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "resize_mode": self.resize_mode}

    def resize_crop(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        if short != self.size:
            new_short, new_long = self.size, int(self.size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
            image = image.resize((new_w, new_h), _INTERPOLATION[self.interpolation])
        w, h = image.size
        if (w, h) != (self.size, self.size):
            top = int(round((h - self.size) / 2.0))
            left = int(round((w - self.size) / 2.0))
            image = image.crop((left, top, left + self.size, top + self.size))
        return image

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """PIL image -> uint8 [3, size, size], resized and cropped but not normalised. The training stream ships
        these (a quarter of float32's bytes through Ray's object store) and the training step normalises them
        (`normalize`, or `ccr_ray.train.state.normalize_pixels` on the device)."""
        return np.ascontiguousarray(np.asarray(self.resize_crop(image), dtype=np.uint8).transpose(2, 0, 1))

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [..., 3, H, W] -> float32, as ToTensor (/255) then Normalize(mean, std)."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        return (pixels.astype(np.float32) / 255.0 - mean) / std

    def __call__(self, image: Image.Image) -> np.ndarray:
        """PIL image -> float32 [3, size, size], normalised."""
        return self.normalize(self.to_uint8(image))

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, 3, self.size, self.size), dtype=np.float32)
        return np.stack([self(im) for im in images])


def open_image(data: bytes | None, path: str | None = None, root: str | None = None) -> Image.Image:
    """Decode embedded bytes, or open a path (relative paths are relative to the dataset root, which may be a URI)."""
    if data is not None:
        image = Image.open(io.BytesIO(data))
    elif path:
        # storage (pyarrow) only for images by path: the torch-free runtime decodes bytes without it
        from ccr_ray.storage import Location, is_uri

        if is_uri(path) or (root is not None and is_uri(root) and not os.path.isabs(path)):
            where = Location.of(path) if is_uri(path) else Location.of(root) / path  # a dataset on shared storage
            image = Image.open(io.BytesIO(where.read_bytes()))
        else:
            image = Image.open(path if os.path.isabs(path) or root is None else os.path.join(root, path))
    else:
        raise ValueError("record has neither image bytes nor an image path")
    image.load()
    return image
