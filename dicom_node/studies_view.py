"""``dicom-node studies``: what the node has received, as a PACS administrator checks it.

``list`` shows the most recently received studies, one line each: when the last
instance came, the patient, modalities, series and instance counts, size and who sent
it. ``show`` gives one study series by series (the counts to compare with what the
modality says it sent, the transfer syntaxes as received) and the jobs it became.
``delete`` removes one study's files and records (a study sent to the wrong place).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pydicom.uid import UID

from dicom_node.config import Settings
from dicom_node.digits import ascii_digits
from dicom_node.errors import Conflict, NotFound
from dicom_node.store import SeriesRecord, Store, StudyRecord

__all__ = ["clip", "column_width", "delete_study", "find_study", "list_studies", "show_study",
           "size_text"]


def size_text(n: int) -> str:
    """Bytes for people: ``512 B``, ``1.2 MB``, ``3.4 GB``."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def clip(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` with an ellipsis that says it was cut."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def column_width(head: str, values: Iterable[str], most: int) -> int:
    """A table column as wide as its longest value (or its heading), ``most`` at most:
    identifiers are shown whole where they fit, and cut visibly where they do not."""
    return min(most, max([len(head), *(len(v) for v in values)]))


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}Z" if value else ""


def _date(value: str) -> str:
    """DICOM DA ``YYYYMMDD`` as ``YYYY-MM-DD``; anything else as it is."""
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if len(value) == 8 and ascii_digits(value) \
        else value


def _syntax(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


def _size(series: list[SeriesRecord]) -> int:
    """A study's bytes: the sum over its series."""
    return sum(s.size_bytes for s in series)


def _senders(series: list[SeriesRecord]) -> list[str]:
    """Everyone who sent a study's instances, over its series, sorted."""
    return sorted({x for s in series for x in s.senders})


def _study_json(study: StudyRecord, series: list[SeriesRecord]) -> dict[str, Any]:
    return {
        "study_instance_uid": study.study_instance_uid, "patient_id": study.patient_id,
        "accession_number": study.accession_number, "study_date": study.study_date,
        "modalities": study.modalities, "series": len(series), "instances": study.instances,
        "size_bytes": _size(series),
        "first_received": study.created_at.isoformat(),
        "last_received": study.updated_at.isoformat(),
        "senders": _senders(series),
    }


def list_studies(store: Store, *, limit: int, patient_id: str | None, as_json: bool) -> int:
    """Print the most recently received studies; returns the exit code."""
    rows = store.received_studies(limit=limit, patient_id=patient_id)
    if as_json:
        for study, series in rows:
            print(json.dumps(_study_json(study, series)))
        return 0
    if not rows:
        print("no studies" + (f" of patient {patient_id!r}" if patient_id else ""))
        return 0
    senders = []
    for _, series in rows:
        names = _senders(series) or ["-"]  # a study left with no instance has no sender
        senders.append(names[0] + (f" +{len(names) - 1}" if len(names) > 1 else ""))
    pid_w = column_width("PATIENT ID", (s.patient_id for s, _ in rows), 32)
    from_w = column_width("FROM", senders, 36)
    head = (f"{'LAST RECEIVED':20}  {'PATIENT ID':{pid_w}}  {'MODALITY':8}  {'SER':>3}  "
            f"{'INST':>5}  {'SIZE':>8}  {'FROM':{from_w}}  ")
    room = (max(20, shutil.get_terminal_size().columns - len(head))
            if sys.stdout.isatty() else 100_000)  # whole UIDs when piped
    print(f"{head}STUDY UID")
    for (study, series), sender in zip(rows, senders, strict=True):
        print(f"{_when(study.updated_at):20}  {clip(study.patient_id, pid_w):{pid_w}}  "
              f"{clip('/'.join(study.modalities), 8):8}  {len(series):>3}  "
              f"{study.instances:>5}  {size_text(_size(series)):>8}  "
              f"{clip(sender, from_w):{from_w}}  {clip(study.study_instance_uid, room)}")
    return 0


def find_study(store: Store, ref: str) -> tuple[StudyRecord, list[SeriesRecord]]:
    """A study by its UID or, for people typing, the unique start of one.

    Raises:
        NotFound: no study's UID is or starts with ``ref``.
        Conflict: several start with it.
    """
    exact = store.received_studies(limit=1, uid=ref)
    if exact:
        return exact[0]
    rows = store.received_studies(limit=6, uid_prefix=ref)
    if not rows:
        raise NotFound(f"no study {ref!r} (dicom-node studies list shows what is held)")
    if len(rows) > 1:
        more = ", ..." if len(rows) > 5 else ""
        raise Conflict(f"{ref!r} starts more than one study UID: "
                       f"{', '.join(r[0].study_instance_uid for r in rows[:5])}{more}; "
                       "give more of it")
    return rows[0]


def show_study(store: Store, ref: str, *, as_json: bool) -> int:
    """Print one study series by series, with its jobs; returns the exit code."""
    study, series = find_study(store, ref)
    jobs = store.list_jobs(limit=100, study_instance_uid=study.study_instance_uid,
                           with_input=False)
    if as_json:
        data = _study_json(study, series)
        data["series"] = [{
            "series_instance_uid": s.series_instance_uid, "modality": s.modality,
            "instances": s.instances, "size_bytes": s.size_bytes,
            "first_received": s.first_received.isoformat(),
            "last_received": s.last_received.isoformat(),
            "senders": s.senders, "transfer_syntaxes": s.transfer_syntaxes,
        } for s in series]
        data["jobs"] = [{"id": j.id, "pipeline": j.pipeline, "state": j.state.value,
                         "created_at": j.created_at.isoformat()} for j in jobs]
        print(json.dumps(data, indent=2))
        return 0
    size = size_text(_size(series))
    for key, value in (("study_instance_uid", study.study_instance_uid),
                       ("patient_id", study.patient_id),
                       ("accession_number", study.accession_number),
                       ("study_date", _date(study.study_date)),
                       ("first received", _when(study.created_at)),
                       ("last received", _when(study.updated_at)),
                       ("held", f"{study.instances} instance(s) in {len(series)} series, "
                                f"{size}")):
        if value:
            print(f"{key:20} {value}")
    print("series:")
    for s in series:
        print(f"  {s.series_instance_uid}")
        print(f"      {s.modality or '?':8} {s.instances:>5} instance(s)  "
              f"{size_text(s.size_bytes):>8}  last {_when(s.last_received)}  "
              f"from {', '.join(s.senders)}")
        syntaxes = "; ".join(_syntax(t) for t in s.transfer_syntaxes)
        print(f"      {syntaxes or 'transfer syntax unknown'}")
    print("jobs:" if jobs else "jobs: none yet (a study becomes jobs once complete, and only "
          "under an AE title with pipelines)")
    for j in jobs:
        print(f"  {j.id}  {j.state.value:10}  {j.pipeline}")
    return 0


def delete_study(settings: Settings, store: Store, ref: str, *, results: bool,
                 yes: bool) -> int:
    """Delete one study's instance files and records (and, with ``results``, its jobs'
    results folders) after asking; returns the exit code."""
    from dicom_node import retention

    study, series = find_study(store, ref)
    uid = study.study_instance_uid
    active, pending = store.study_activity(uid)
    if active:
        more = f" and {len(active) - 1} more" if len(active) > 1 else ""
        print(f"dicom-node: study {uid} has jobs queued or running ({active[0]}{more}); "
              f"cancel them first (dicom-node jobs cancel {active[0]}), or wait for them "
              "to end", file=sys.stderr)
        return 1
    if pending:
        print(f"dicom-node: study {uid} is still arriving ({pending} instance(s) not yet "
              "part of a job); try again once it is complete", file=sys.stderr)
        return 1
    own = retention.files_owner(settings)
    others = store.received_by_others(uid, own) if own is not None else []
    if others:  # its files are on those machines; deleting the records here orphans them
        where = "that node's" if len(others) == 1 else "those nodes'"
        print(f"dicom-node: study {uid} was received by {', '.join(others)} (its files are "
              f"on {where} disk): delete it there", file=sys.stderr)
        return 1
    jobs = store.list_jobs(limit=1000, study_instance_uid=uid, with_input=False)
    what = (f"{study.instances} instance(s), {size_text(_size(series))}, "
            f"of study {uid} (patient {study.patient_id or '?'})")
    if results and jobs:
        what += f" and the results of its {len(jobs)} job(s)"
    if not yes:
        if not sys.stdin.isatty():
            print(f"dicom-node: would delete {what}; add --yes to do it", file=sys.stderr)
            return 1
        if input(f"Delete {what}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    done = retention.SweepResult()
    retention.delete_study(store, uid, settings.studies_dir.resolve(), done,
                           forget_inputs_of=retention.inputs_to_forget(settings))
    if results:
        for job in jobs:
            retention.delete_results(job.id, settings.results_dir.resolve(), done)
    print(f"deleted {done.instances} instance(s), {size_text(done.bytes)}, of study {uid}"
          + (f", and {done.results} results folder(s)" if results else ""))
    if done.left:
        print(f"dicom-node: {done.left} file(s) could not be deleted; the log names them",
              file=sys.stderr)
        return 1
    return 0
