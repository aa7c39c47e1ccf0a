"""How the node names itself in DICOM: the Implementation Class UID and Version Name.

Peers log them for every association (a PACS administrator reads "DICOMNODE_0.1.0",
not the toolkit's "PYNETDICOM_304"), conformance statements quote them, and PS3.10
asks every file's meta to name the implementation that wrote it: the instances the
node receives, the files a drop folder completes and the node's own results.

No imports beyond the standard library: the pipeline uses it as well.
"""

from __future__ import annotations

import re
import uuid

from dicom_node import __version__

__all__ = ["IMPLEMENTATION_CLASS_UID", "IMPLEMENTATION_VERSION_NAME", "version_name"]


def version_name(version: str) -> str:
    """``DICOMNODE_<version>`` within the 16 characters of the SH value PS3.7 D.3.3.2
    allows, keeping only characters an SH may hold."""
    kept = re.sub(r"[^0-9A-Za-z._-]", "", version)
    return ("DICOMNODE_" + kept)[:16]


# A UUID-derived UID (PS3.5 B.2) under 2.25: no registered root is needed, and one per
# release, as toolkits do, so that a peer's work-arounds can tell releases apart.
IMPLEMENTATION_CLASS_UID = "2.25." + str(
    uuid.uuid5(uuid.NAMESPACE_URL, f"https://dicom-node/implementation/{__version__}").int)
IMPLEMENTATION_VERSION_NAME = version_name(__version__)
