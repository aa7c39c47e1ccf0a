"""The retriever's accounting of what a C-MOVE / C-GET failed to bring."""

from __future__ import annotations

from dicom_node.retrieve import MAX_FAILED_LISTED, Progress, dimse_failures
from dicom_node.scu import InstanceFailure, RetrieveResult


def test_failed_instances_are_counted_once_and_named() -> None:
    # The peer said 2 sub-operations failed and named both (one of them also failed our
    # own write): 2 failed, not 4.
    result = RetrieveResult("PACS", "c-move", False, completed=3, failed=2, failures=[
        InstanceFailure("1.2.3.1", 0xA702, "failed sub-operation"),
        InstanceFailure("1.2.3.2", 0xA700, "No space left on device"),
        InstanceFailure("1.2.3.2", 0xA702, "failed sub-operation")])
    assert dimse_failures(result) == (2, ["1.2.3.1", "1.2.3.2"])
    # A peer that counts failures without naming them, and one that names but miscounts
    assert dimse_failures(RetrieveResult("PACS", "c-get", False, failed=5)) == (5, [])
    named = RetrieveResult("PACS", "c-get", False, failed=0,
                           failures=[InstanceFailure("1.2.3.9", 0xC000, "x")])
    assert dimse_failures(named) == (1, ["1.2.3.9"])


def test_progress_lists_at_most_the_first_failed_instances() -> None:
    uids = [f"1.2.3.{i}" for i in range(MAX_FAILED_LISTED + 50)]
    p = Progress("1.2.3", state="partial", received=10, failed=len(uids), failed_instances=uids)
    shown = p.as_dict()
    assert shown["failed"] == MAX_FAILED_LISTED + 50
    assert shown["failed_instances"] == uids[:MAX_FAILED_LISTED]


def test_patient_ids_compare_as_dicom_strings() -> None:
    from dicom_node.retrieve import dicom_string

    assert dicom_string("ACR-REAL  ") == "ACR-REAL"  # padding
    assert dicom_string(" ACR-REAL") == " ACR-REAL" and dicom_string("acr-real") != "ACR-REAL"
    assert dicom_string("") is None and dicom_string(None) is None and dicom_string("  ") is None
    assert Progress("1.2.3", patient_id="P1").as_dict()["PatientID"] == "P1"
