"""The node's DICOM Conformance Statement, written from the code and the settings.

A PACS administrator connecting a modality, or a peer's vendor, asks for one (PS3.2).
``dicom-node conformance`` prints it for a configuration: the SOP classes, transfer
syntaxes, roles, AE titles and association policies the node actually uses, read from
the same lists and settings the listener and the clients are built from, so that it
cannot drift from what the node does. ``docs/conformance.md`` is this with the
built-in defaults.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pydicom
import pynetdicom
from pydicom.uid import UID

from dicom_node import __version__
from dicom_node.config import Settings
from dicom_node.dimse_status import (
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_LOCAL_LIMIT,
    REJECT_NO_SPACE,
    Status,
)
from dicom_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.scp import (
    ACCEPTED_TRANSFER_SYNTAXES,
    RETIRED_STORAGE_CLASSES,
    VERIFICATION_TRANSFER_SYNTAXES,
    storage_sop_classes,
)
from dicom_node.scu import GET_STORAGE_CLASSES, UNCOMPRESSED_TRANSFER_SYNTAXES

__all__ = ["statement"]

_VERIFICATION = "1.2.840.10008.1.1"
_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
_GET = "1.2.840.10008.5.1.4.1.2.2.3"
# What a pipeline sends back (pipeline.artifacts), by output name
_RESULT_CLASSES = {
    "sr": ("1.2.840.10008.5.1.4.1.1.88.33", "Explicit VR Little Endian"),
    "seg": ("1.2.840.10008.5.1.4.1.1.66.4", "Explicit VR Little Endian"),
    "sc": ("1.2.840.10008.5.1.4.1.1.7",
           "Explicit VR Little Endian; JPEG Baseline (marked lossy) with a pipeline's "
           "`secondary_capture.compression: jpeg`"),
    "encapsulated_pdf": ("1.2.840.10008.5.1.4.1.1.104.1", "Explicit VR Little Endian"),
}
_STATUS_MEANING = {
    Status.SUCCESS: "stored: written to disk, fsynced and recorded (or an ignored class, "
                    "not kept)",
    Status.SOP_CLASS_NOT_SUPPORTED: "the SOP class does not match the presentation context",
    Status.OUT_OF_RESOURCES: "disk full, storage or store failure: the sender may retry",
    Status.DATASET_DOES_NOT_MATCH_SOP_CLASS: "the dataset's SOP class differs from the "
                                             "request's",
    Status.CANNOT_UNDERSTAND: "the dataset or its UIDs cannot be read; nothing is kept",
    Status.PROCESSING_FAILURE: "another failure while storing",
}


def _name(uid: str) -> str:
    name = UID(uid).name
    return name if name != uid else "(private or unnamed)"


def _names(uids: Iterable[str]) -> str:
    return ", ".join(UID(u).name if UID(u).name != u else f"`{u}`" for u in uids)


def _table(head: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _syntaxes(uids: Sequence[str]) -> list[str]:
    return _table(["preference", "transfer syntax", "UID"],
                  ((i, _name(u), f"`{u}`") for i, u in enumerate(uids, 1)))


def statement(settings: Settings) -> str:
    """The conformance statement for ``settings``, as Markdown."""
    d = settings.dimse
    storage = storage_sop_classes()
    lines = [
        f"# DICOM Conformance Statement: dicom-node {__version__}",
        "",
        "Written by `dicom-node conformance` from the node's code and the settings it ran "
        "with (`docs/conformance.md`: the built-in defaults). Run it with your own "
        "`--config` for the AE titles and peers you configured.",
        "",
        "## 1. Overview",
        "",
        "dicom-node receives images over DICOM, runs AI models on them and sends the "
        "results (SR, SEG, Secondary Capture, Encapsulated PDF) back to a PACS. It "
        "retrieves studies that an HTTP request names from a PACS.",
        "",
        *_table(["SOP class", "SCU", "SCP"], [
            ("Verification", "yes", "yes"),
            (f"Storage ({len(storage) - len(RETIRED_STORAGE_CLASSES)} classes, "
             f"{len(RETIRED_STORAGE_CLASSES)} retired ones, and private classes named in an "
             "AE title's lists)", "results; C-GET sub-operations as SCP", "yes"),
            ("Study Root Query/Retrieve - FIND", "yes", "no"),
            ("Study Root Query/Retrieve - MOVE", "yes", "no"),
            ("Study Root Query/Retrieve - GET", "yes", "no"),
        ]),
        "",
        "## 2. Implementation",
        "",
        *_table(["", ""], [
            ("Implementation Class UID", f"`{IMPLEMENTATION_CLASS_UID}`"),
            ("Implementation Version Name", f"`{IMPLEMENTATION_VERSION_NAME}`"),
            ("Toolkits", f"pynetdicom {pynetdicom.__version__}, pydicom {pydicom.__version__}"),
        ]),
        "",
        "The same UID and name are in the file meta of every file the node writes.",
        "",
        "## 3. Network and associations",
        "",
        *_table(["setting", "value"], [
            ("AE title (as SCU; `dimse.ae_title`)", f"`{d.ae_title}`"),
            ("listening port (`dimse.port`)", f"{d.port} on {d.host}"),
            ("TLS on that port (`dimse.tls`)",
             "off" if d.tls is None else "on" + (", client certificates required"
                                                 if d.tls.ca_certificate else "")),
            ("associations at once (`dimse.max_associations`)", d.max_associations),
            ("maximum PDU received (`dimse.maximum_pdu_size`)",
             d.maximum_pdu_size or "unlimited (0)"),
            ("ARTIM / DIMSE / network timeouts",
             f"{d.acse_timeout_s:g} s / {d.dimse_timeout_s:g} s / {d.network_timeout_s:g} s"),
            ("asynchronous operations window", "not negotiated: one operation at a time"),
            ("extended negotiation, user identity", "not used; user identity is accepted "
                                                    "without a response and not checked"),
        ]),
        "",
        "### 3.1 Called AE titles (Storage SCP)",
        "",
        *(_table(["AE title", "grouping", "complete", "sources", "SOP classes",
                  "duplicate SOP Instance UID", "pipelines"],
                 ((f"`{a.ae_title}`", a.grouping.value,
                   f"on release or after {a.timeout_s:g} s" if a.complete_on_release
                   else f"after {a.timeout_s:g} s",
                   (", ".join(a.sources) or "any")
                   + (" (others rejected)" if a.reject_unknown_sources else ""),
                   (_names(a.allowed_sop_classes) if a.allowed_sop_classes else "every")
                   + (f"; ignored: {_names(a.ignored_sop_classes)}"
                      if a.ignored_sop_classes else ""),
                   a.duplicates.value, ", ".join(a.pipelines) or "none (stores only)")
                  for a in settings.ae_titles))
          if settings.ae_titles else ["None configured: every association is rejected."]),
        "",
        "### 3.2 Association rejections",
        "",
        *_table(["when", "result", "source", "reason", "as a peer's log shows it"], [
            ("the called AE title is not one of the above", *REJECT_CALLED_AE[:3],
             REJECT_CALLED_AE.text),
            ("the calling AE title or host is not allowed (`sources`)",
             *REJECT_CALLING_AE[:3], REJECT_CALLING_AE.text),
            ("`max_associations` are open", *REJECT_LOCAL_LIMIT[:3], REJECT_LOCAL_LIMIT.text),
            (f"free disk space under {settings.storage.min_free_mb} MB (Verification alone "
             "is accepted)",
             *REJECT_NO_SPACE[:3], REJECT_NO_SPACE.text),
        ]),
        "",
        "### 3.3 Storage SCP",
        "",
        "Every storage SOP class in the annex, retired ones included, is accepted, or "
        "only an AE title's `allowed_sop_classes`; a class named in `allowed_sop_classes` "
        "or `ignored_sop_classes` is accepted even when it is private. Of the transfer "
        "syntaxes a sender offers in one presentation context, the first in this list is "
        "accepted (explicit before implicit VR, lossless before lossy):",
        "",
        *_syntaxes(ACCEPTED_TRANSFER_SYNTAXES),
        "",
        "Instances are stored exactly as received (no decoding, no coercion of "
        "attributes), under `studies/<Study UID>/<Series UID>/<SOP UID>.dcm`, each "
        "fsynced, renamed into place and recorded before its status is sent. Storage "
        "level 2 (full); Digital Signatures are kept as received. C-STORE statuses:",
        "",
        *_table(["status", "meaning"],
                ((f"0x{s.value:04X}", _STATUS_MEANING[s]) for s in Status)),
        "",
        "A study (or series) becomes jobs when its association is released, or after the "
        "AE title's timeout without a new instance.",
        "",
        "Verification SCP accepts: "
        + ", ".join(_name(u) for u in VERIFICATION_TRANSFER_SYNTAXES) + ".",
        "",
        "### 3.4 Storage SCU (results)",
        "",
        *_table(["SOP class", "UID", "transfer syntax written"],
                ((_name(uid), f"`{uid}`", ts) for uid, ts in _RESULT_CLASSES.values())),
        "",
        "Each object is offered in its own transfer syntax, in a presentation context of "
        "its own, and in "
        + " or ".join(_name(u) for u in UNCOMPRESSED_TRANSFER_SYNTAXES)
        + " as the fallback. One association per export. An object answered 0xA7xx (out of "
        "resources), or left without an answer because the association could not be "
        "opened or was lost, is sent again with exponential backoff, up to the "
        "destination's `retry.max_attempts`; any other failure status fails that object "
        "at once, and a permanent association rejection fails the export. Only the "
        "objects a destination did not acknowledge are sent again. Warning statuses "
        "count as stored.",
        "",
        "### 3.5 Query/Retrieve SCU",
        "",
        "Study Root only. C-FIND at STUDY, SERIES and IMAGE level with Study, Series and "
        "SOP Instance UIDs, Patient ID and Accession Number as keys. C-MOVE asks for the "
        f"instances to be sent to the node's AE title (`{d.ae_title}`), which the PACS must "
        "know. A C-STORE is taken as one of its sub-operations when its Move Originator "
        "AE Title is the node's and its Move Originator Message ID that of a C-MOVE in "
        "flight, whatever AE title the PACS stores from; one without these attributes "
        "only when it comes from the PACS's AE title and matches the C-MOVE's keys (its "
        "Study Instance UID). Any other C-STORE, during a C-MOVE too, is an ordinary "
        "push. C-GET (a source's `retrieve: c-get`) proposes the Get model with the "
        "storage classes the study's C-FIND reports, then the usual ones "
        f"({len(GET_STORAGE_CLASSES)} at most), each with SCP/SCU Role Selection (SCP "
        "role) and every transfer syntax of 3.3.",
        "",
        "## 4. Character sets",
        "",
        "Received instances are kept in their own Specific Character Set. The node's own "
        "objects keep their source's, and declare ISO_IR 192 (UTF-8) when a text the node "
        "adds (a finding or structure name, a description) is not ASCII.",
        "",
        "## 5. Security",
        "",
        "TLS (TLS 1.2 or later) on the DICOM port when a certificate and key are "
        "configured, verifying client certificates when a CA is; to each destination and "
        "source with its own `tls`. Calling AE titles and hosts are checked against an AE "
        "title's `sources`. No user identity negotiation.",
        "",
        "## Annex: storage SOP classes accepted",
        "",
        *_table(["SOP class", "UID"], ((_name(u), f"`{u}`") for u in storage)),
        "",
    ]
    return "\n".join(lines)
