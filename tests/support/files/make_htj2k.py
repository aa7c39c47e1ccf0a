"""Make ``MR_small_htj2k.dcm``: pydicom's ``MR_small.dcm`` with its pixels encoded as
High-Throughput JPEG 2000 (lossless, transfer syntax 1.2.840.10008.1.2.4.201).

pydicom decodes HTJ2K (pylibjpeg-openjpeg) but cannot encode it, so the committed file
was made once with OpenJPH through imagecodecs, which is not a dependency of the node:

    python3 -m venv /tmp/ic && /tmp/ic/bin/pip install imagecodecs pydicom
    /tmp/ic/bin/python tests/support/files/make_htj2k.py
"""

from pathlib import Path

import imagecodecs
import pydicom
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate

HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"

ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
pixels = ds.pixel_array
codestream = imagecodecs.htj2k_encode(pixels)  # reversible: lossless
assert (imagecodecs.htj2k_decode(codestream) == pixels).all()
ds.PixelData = encapsulate([codestream])
ds["PixelData"].VR = "OB"
ds.file_meta.TransferSyntaxUID = HTJ2K_LOSSLESS
ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.54918316371233920311442398373081520751"
ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
out = Path(__file__).with_name("MR_small_htj2k.dcm")
ds.save_as(out, enforce_file_format=True)
print(f"{out}: {out.stat().st_size} bytes, {imagecodecs.htj2k_version()}")
