"""Command sets encoded once (dicom_node.command_set): the bytes sent are pydicom's."""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from typing import Any

import pytest
from pynetdicom import dimse_messages
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_MOVE, C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.dsutils import encode as pydicom_encode

from dicom_node import command_set

CT = "1.2.840.10008.5.1.4.1.1.2"
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
SOP = "1.2.826.0.1.3680043.8.498.1234567890123456789"


def _store_rq() -> C_STORE:
    p = C_STORE()
    p.MessageID, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID = 7, CT, SOP
    p.Priority, p.MoveOriginatorApplicationEntityTitle, p.MoveOriginatorMessageID = 2, "RIS", 3
    p.DataSet = BytesIO(b"")  # the message only needs to know a data set follows
    return p


def _store_rsp(status: int = 0x0000, comment: str | None = None) -> C_STORE:
    p = C_STORE()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID = 7, CT, SOP
    p.Status = status
    if comment is not None:
        p.ErrorComment = comment
    return p


def _echo_rq() -> C_ECHO:
    p = C_ECHO()
    p.MessageID, p.AffectedSOPClassUID = 1, "1.2.840.10008.1.1"
    return p


def _move_rsp() -> C_MOVE:
    p = C_MOVE()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.Status = 5, MOVE, 0xFF00
    p.NumberOfRemainingSuboperations, p.NumberOfCompletedSuboperations = 299, 1
    p.NumberOfFailedSuboperations, p.NumberOfWarningSuboperations = 0, 0
    return p


def _find_rq() -> C_FIND:
    p = C_FIND()
    p.MessageID, p.AffectedSOPClassUID, p.Priority = 9, "1.2.840.10008.5.1.4.1.2.2.1", 0
    p.Identifier = BytesIO(b"")
    return p


CASES: dict[str, tuple[type[Any], Callable[[], Any]]] = {
    "C-STORE-RQ": (dimse_messages.C_STORE_RQ, _store_rq),
    "C-STORE-RSP": (dimse_messages.C_STORE_RSP, _store_rsp),
    "C-STORE-RSP refused": (dimse_messages.C_STORE_RSP,
                            lambda: _store_rsp(0xA700, "cannot keep the instance: disk full")),
    "C-ECHO-RQ": (dimse_messages.C_ECHO_RQ, _echo_rq),
    "C-MOVE-RSP pending": (dimse_messages.C_MOVE_RSP, _move_rsp),
    "C-FIND-RQ": (dimse_messages.C_FIND_RQ, _find_rq),
}


def _sent_command(msg: Any) -> bytes:
    """The command set bytes of the P-DATA fragments ``encode_msg`` yields."""
    out = b""
    for pdata in msg.encode_msg(1, 16382):
        for _context, pdv in pdata.presentation_data_value_list:
            if pdv[0] & 0x01:  # a command fragment (bit 0 set)
                out += pdv[1:]
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_sent_command_set_is_what_pydicom_encodes(name: str) -> None:
    assert command_set.install()  # idempotent; the node installs it on import
    cls, primitive = CASES[name]
    msg = cls()
    msg.primitive_to_message(primitive())
    assert command_set._KEPT in msg.command_set.__dict__  # encoded once, bytes kept
    sent = _sent_command(msg)
    assert command_set._KEPT not in msg.command_set.__dict__  # and used
    assert sent == pydicom_encode(msg.command_set, True, True)
    assert int.from_bytes(sent[8:12], "little") == len(sent) - 12  # group length
    back = decode(BytesIO(sent), True, True)  # and it reads back as the same elements
    assert [(e.tag, e.value) for e in back] == [(e.tag, e.value) for e in msg.command_set]


def test_a_command_set_changed_after_its_length_is_encoded_afresh() -> None:
    assert command_set.install()
    msg = dimse_messages.C_STORE_RSP()
    msg.primitive_to_message(_store_rsp())
    msg.command_set.ErrorComment = "added after the length was set"
    # pynetdicom would now send a stale group length; the kept bytes must not be used
    sent = _sent_command(msg)
    assert sent == pydicom_encode(msg.command_set, True, True)
    assert b"added after the length was set" in sent


def test_kept_bytes_are_used_once() -> None:
    assert command_set.install()
    msg = dimse_messages.C_STORE_RSP()
    msg.primitive_to_message(_store_rsp())
    first = _sent_command(msg)
    assert first == _sent_command(msg)  # the second time from pydicom again, identical


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC210, 0xB000])
@pytest.mark.parametrize("uid", [SOP, SOP + "1", "1.2.3"])  # odd and even lengths
def test_store_response_bytes_are_what_pynetdicom_sends(status: int, uid: str) -> None:
    assert command_set.install()
    rsp = _store_rsp(status)
    rsp.AffectedSOPInstanceUID = uid
    rsp.MessageIDBeingRespondedTo = 0xFFFF
    msg = dimse_messages.C_STORE_RSP()
    msg.primitive_to_message(rsp)
    assert command_set.store_response_bytes(rsp) == pydicom_encode(msg.command_set, True, True)


def test_store_response_with_a_comment_is_left_to_pynetdicom() -> None:
    assert command_set.store_response_bytes(_store_rsp(0xA700, "disk full")) is None
    rsp = _store_rsp()
    rsp.AffectedSOPInstanceUID = None
    assert command_set.store_response_bytes(rsp) is None


def test_store_response_with_a_uid_that_is_not_ascii_is_left_to_pynetdicom() -> None:
    """A peer's request can carry such a UID (pydicom only warns on reading it); the
    response it gets back is pynetdicom's business, not a crash of the quick path."""
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 7, 0x0000
    rsp.AffectedSOPClassUID = CT
    rsp._affected_sop_instance_uid = "1.2.\u00e9"  # as a decoded request could set it
    assert command_set.store_response_bytes(rsp) is None


@pytest.mark.parametrize("max_pdu", [0, 16382, 64])
@pytest.mark.parametrize("comment", [None, "cannot keep the instance: disk full"])
@pytest.mark.parametrize("handler", [False, True])
def test_a_sent_store_response_is_the_same_either_way(
    max_pdu: int, comment: str | None, handler: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What goes to the DUL for a C-STORE response, by the quick path or pynetdicom's:
    the same P-DATA fragments. A PDU too small for one fragment, a comment, or a bound
    EVT_DIMSE_SENT handler take pynetdicom's path."""
    from pynetdicom import AE, _config, evt
    from pynetdicom.association import Association

    assert command_set.install()
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # as the node below debug
    assoc = Association(AE(), "requestor")  # never connected: only its DIMSE provider
    assoc.acceptor.maximum_length = max_pdu  # the peer's, which a requestor sends within
    seen: list[Any] = []
    if handler:
        assoc.bind(evt.EVT_DIMSE_SENT, lambda event: seen.append(event.message))
    sent: list[Any] = []
    assoc.dul.send_pdu = sent.append  # type: ignore[method-assign]
    built: list[Any] = []  # messages pynetdicom built: none on the quick path
    convert = dimse_messages.C_STORE_RSP.primitive_to_message
    monkeypatch.setattr(dimse_messages.C_STORE_RSP, "primitive_to_message",
                        lambda self, p: (built.append(p), convert(self, p))[1])
    assoc.dimse.send_msg(_store_rsp(0xA700, comment), 3)
    quick = not handler and comment is None and max_pdu != 64
    assert len(built) == (0 if quick else 1)
    monkeypatch.setattr(dimse_messages.C_STORE_RSP, "primitive_to_message", convert)
    msg = dimse_messages.C_STORE_RSP()
    msg.primitive_to_message(_store_rsp(0xA700, comment))
    expected = [p.presentation_data_value_list for p in msg.encode_msg(3, max_pdu)]
    assert [p.presentation_data_value_list for p in sent] == expected
    assert len(seen) == int(handler)
