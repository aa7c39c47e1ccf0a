"""The File Meta Information in front of each received instance, encoded directly.

In chunked mode pynetdicom writes every incoming C-STORE dataset to a temporary file,
and in front of it a File Meta Information group built as a pydicom FileMetaDataset,
element by element with validation, then encoded by pydicom: ~0.2 ms an instance, a
tenth of the node's CPU time for each instance of a C-MOVE. The group is always the
same seven elements in Explicit VR Little Endian (PS3.10 7.1): Group Length, Version,
Media Storage SOP Class and Instance UIDs, Transfer Syntax UID, and pynetdicom's
Implementation Class UID and Version Name. :func:`install` has pynetdicom write those
bytes directly, the same bytes pydicom writes; a UID that is not plain ASCII goes the
usual way.
"""

from __future__ import annotations

import struct
from typing import Any

from dicom_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

__all__ = ["encode_file_meta", "install"]

_TAG_VR_SHORT = struct.Struct("<HH2sH")  # tag, VR, 2-byte length (UL, UI, SH)
_GROUP_LENGTH_VR = b"UL"
_VERSION = b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"  # (0002,0001) OB 00\01


def _element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad  # PS3.5 6.2: UI pads with NUL, text VRs with a space
    return _TAG_VR_SHORT.pack(0x0002, element, vr, len(value)) + value


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                     implementation_uid: str, implementation_version: str) -> bytes:
    """The encoded File Meta Information group (without preamble and ``DICM``).

    Raises:
        UnicodeEncodeError: a value is not ASCII.
    """
    rest = b"".join((
        _VERSION,
        _element(0x0002, b"UI", sop_class_uid.encode("ascii"), b"\0"),
        _element(0x0003, b"UI", sop_instance_uid.encode("ascii"), b"\0"),
        _element(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\0"),
        _element(0x0012, b"UI", implementation_uid.encode("ascii"), b"\0"),
        _element(0x0013, b"SH", implementation_version.encode("ascii"), b" "),
    ))
    return _TAG_VR_SHORT.pack(0x0002, 0x0000, _GROUP_LENGTH_VR, 4) + struct.pack(
        "<I", len(rest)) + rest


class _Encoded:
    """What :func:`install`'s ``create_file_meta`` hands to its ``write_file_meta_info``."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def install() -> bool:
    """Patch what pynetdicom's DIMSE messages use to write received file meta
    (idempotent); False when this pynetdicom has another layout and nothing changed."""
    from pynetdicom import dimse_messages

    create = getattr(dimse_messages, "create_file_meta", None)
    write = getattr(dimse_messages, "write_file_meta_info", None)
    if create is None or write is None:
        return False
    uid, version = IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
    if getattr(create, "_encodes_directly", False):
        return True

    def create_file_meta(*, sop_class_uid: str, sop_instance_uid: str,
                         transfer_syntax: str, **kwargs: Any) -> Any:
        if not kwargs:  # the node wrote the file: its implementation UID and version
            try:
                return _Encoded(encode_file_meta(sop_class_uid, sop_instance_uid,
                                                 transfer_syntax, uid, version))
            except UnicodeEncodeError:
                pass
        kwargs.setdefault("implementation_uid", uid)
        kwargs.setdefault("implementation_version", version)
        return create(sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
                      transfer_syntax=transfer_syntax, **kwargs)

    def write_file_meta_info(fp: Any, file_meta: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(file_meta, _Encoded):
            fp.write(file_meta.data)
            return
        write(fp, file_meta, *args, **kwargs)

    create_file_meta._encodes_directly = True  # type: ignore[attr-defined]
    setattr(dimse_messages, "create_file_meta", create_file_meta)  # noqa: B010
    setattr(dimse_messages, "write_file_meta_info", write_file_meta_info)  # noqa: B010
    return True
