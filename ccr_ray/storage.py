"""Writing folders and files so that a reader never sees them half-written.

    with staged_folder(target) as tmp:     write into a hidden sibling; on success it replaces `target` by renames,
        ...                                on an exception it is removed and `target` is left as it was
    swap_in(tmp, target)                   the rename step alone, for writers that stage over several calls
    atomic_write_text(path, text)          a file, by rename
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{uuid.uuid4().hex[:8]}")


def swap_in(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Replace folder `target` by the finished folder `tmp` with renames (readers see old or new, never half)."""
    tmp, target = Path(tmp), Path(target)
    old = None
    if target.exists():
        old = _sibling(target, "old")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
