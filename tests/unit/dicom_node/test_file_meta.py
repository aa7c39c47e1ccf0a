"""Received file meta encoded directly (dicom_node.file_meta): the bytes are pydicom's."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)
from pynetdicom import dimse_messages
from pynetdicom.dsutils import create_file_meta

from dicom_node import file_meta
from dicom_node.identity import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    version_name,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
SOPS = ["1.2.826.0.1.3680043.8.498.12345678901234567890",  # even length
        "1.2.826.0.1.3680043.8.498.1234567890123456789",  # odd
        "1.2"]


@pytest.mark.parametrize("sop", SOPS)
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                    JPEGBaseline8Bit, JPEG2000Lossless])
def test_file_meta_is_what_pydicom_writes(sop: str, syntax: str) -> None:
    assert file_meta.install()
    ours = BytesIO()
    dimse_messages.write_file_meta_info(
        ours, dimse_messages.create_file_meta(sop_class_uid=CT, sop_instance_uid=sop,
                                              transfer_syntax=syntax))
    theirs = BytesIO()
    write_file_meta_info(theirs, create_file_meta(
        sop_class_uid=CT, sop_instance_uid=sop, transfer_syntax=syntax,
        implementation_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version=IMPLEMENTATION_VERSION_NAME))
    assert ours.getvalue() == theirs.getvalue()
    # and a reader takes it as the file meta of a Part 10 file
    meta = dcmread(BytesIO(b"\0" * 128 + b"DICM" + ours.getvalue())).file_meta
    assert (meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID) == (sop, syntax)
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID  # the node wrote it


def test_a_uid_that_is_not_ascii_goes_the_usual_way() -> None:
    assert file_meta.install()
    made = dimse_messages.create_file_meta(sop_class_uid=CT, sop_instance_uid="1.2.\u00e9",
                                           transfer_syntax=ExplicitVRLittleEndian)
    assert made.__class__.__name__ == "FileMetaDataset"
    assert made.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    out = BytesIO()
    dimse_messages.write_file_meta_info(out, made)  # pydicom's writer, as before
    assert out.getvalue().startswith(b"\x02\x00\x00\x00UL")


@pytest.mark.parametrize(("version", "name"), [
    ("0.1.0", "DICOMNODE_0.1.0"),
    ("0.1.0+local build", "DICOMNODE_0.1.0l"),  # within 16 characters, none an SH lacks
    ("12.34.56.dev789", "DICOMNODE_12.34."),
])
def test_version_name_is_a_valid_sh(version: str, name: str) -> None:
    assert version_name(version) == name
