"""dicom-node: a DICOM networking node with an AI inference pipeline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dicom-node")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
