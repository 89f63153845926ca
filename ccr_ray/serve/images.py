"""Images for the service: the dataset's images by id (search results link to them) and uploaded images
(decoded under byte and pixel limits before any pixel is touched).

A dataset folder (ccr-ray layout: dataset.json + <split>/part-*.parquet) holds each image as embedded bytes or
as a path. The store keeps only an id -> (file, row group, row) map in memory; an image is read from its row
group when asked for, and the last row groups and thumbnails are cached.
"""

from __future__ import annotations

import io
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ccr_ray.data import schema

THUMB_CACHE = 512
ROW_GROUP_CACHE = 4
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp",
               "BMP": "image/bmp", "TIFF": "image/tiff"}


class ImageInputError(ValueError):
    """An upload that is not a usable image; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Encoded image bytes -> an RGB PIL image. The size is read from the header first, so an image over the
    pixel limit is refused (413) before it is decoded. Pillow's own decompression-bomb check runs inside
    `Image.open`, before ours can: it raises DecompressionBombError over twice Image.MAX_IMAGE_PIXELS (~179 MP) and
    warns over it (~89 MP); `Limits` keeps max_pixels within Pillow's bound, so an image it flags is over the
    service's limit too and gets the same 413."""
    if not data:
        raise ImageInputError("empty upload: send the image bytes as the request body or as the form field 'image'")
    if len(data) > max_bytes:
        raise ImageInputError(f"{len(data):,} bytes; the limit is {max_bytes:,}", status=413)
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # the warning: under -W error
        declared = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(declared.group(1)):,} pixels" if declared else "more pixels than Pillow decodes"
        raise ImageInputError(f"{size} in its header; the limit is {max_pixels:,}", status=413) from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageInputError(f"not an image PIL can read ({type(err).__name__})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageInputError(f"{width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}",
                              status=413)
    try:
        image.load()
        return image.convert("RGB")
    except Exception as err:  # noqa: BLE001 - truncated or corrupt data raises many kinds
        raise ImageInputError(f"corrupt or truncated image ({type(err).__name__}: {err})") from None


class ImageStore:
    """Encoded images of a dataset folder, by image id (every split)."""

    def __init__(self, root: str | os.PathLike):
        import pyarrow.parquet as pq

        self.root = Path(root)
        manifest = schema.load_manifest(self.root)
        self.files: list[str] = []
        self.where: dict[str, tuple[int, int, int]] = {}
        for split in manifest.splits:
            for file in schema.split_files(self.root, split):
                parquet = pq.ParquetFile(file)
                self.files.append(file)
                for group in range(parquet.num_row_groups):
                    ids = parquet.read_row_group(group, columns=[schema.IMAGE_ID])[schema.IMAGE_ID].to_pylist()
                    for row, image_id in enumerate(ids):
                        self.where.setdefault(image_id, (len(self.files) - 1, group, row))
        self._groups: OrderedDict = OrderedDict()
        self._thumbs: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.where

    def __len__(self) -> int:
        return len(self.where)

    def _row_group(self, file: int, group: int):
        import pyarrow.parquet as pq

        key = (file, group)
        with self._lock:
            if key in self._groups:
                self._groups.move_to_end(key)
                return self._groups[key]
        parquet = pq.ParquetFile(self.files[file])
        columns = [c for c in (schema.IMAGE, schema.IMAGE_PATH) if c in parquet.schema_arrow.names]
        table = parquet.read_row_group(group, columns=columns)
        with self._lock:
            self._groups[key] = table
            while len(self._groups) > ROW_GROUP_CACHE:
                self._groups.popitem(last=False)
        return table

    def encoded(self, image_id: str) -> bytes:
        """The image's bytes as stored (embedded, or read from its path). KeyError for an unknown id."""
        file, group, row = self.where[image_id]
        table = self._row_group(file, group)
        data = table[schema.IMAGE][row].as_py() if schema.IMAGE in table.column_names else None
        if data is not None:
            return data
        path = table[schema.IMAGE_PATH][row].as_py() if schema.IMAGE_PATH in table.column_names else None
        if not path:
            raise KeyError(image_id)
        full = Path(path) if os.path.isabs(path) else self.root / path
        return full.read_bytes()

    def thumbnail(self, image_id: str, max_side: int | None) -> tuple[bytes, str]:
        """(bytes, media type): the stored image when it fits in max_side (or no max_side), else a PNG at most
        max_side pixels on its longer side."""
        key = (image_id, max_side)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        data = self.encoded(image_id)
        image = Image.open(io.BytesIO(data))
        if max_side is None or max(image.size) <= max_side:
            out = (data, MEDIA_TYPES.get(image.format or "", "application/octet-stream"))
        else:
            image = image.convert("RGB")
            image.thumbnail((max_side, max_side))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            out = (buffer.getvalue(), "image/png")
        with self._lock:
            self._thumbs[key] = out
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return out
