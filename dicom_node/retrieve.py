"""Retrieval for ACR requests: find the named studies on a PACS and fetch them.

Each query (study UIDs, a PatientID or accession numbers) is resolved to
studies on the request's sources, tried in order; each study is fetched from
the first source that has it, by C-MOVE / C-GET or by WADO-RS. Everything that
arrives is stored like a received instance. Progress per study goes into the
job's result as it happens.

A study is not fetched when the sources say it belongs to another patient than the
request names, nor when an accession number matches studies of several patients; one
whose instances arrive under another patient than expected is not processed.
"""

from __future__ import annotations

import base64
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.config import SourceSettings
from dicom_node.disk import short_of_space
from dicom_node.errors import DeferJob, InvalidInput, NodeError, PermanentJobError
from dicom_node.scheduler import DISK_FULL_RETRY_S, JobContext

if TYPE_CHECKING:
    from pydicom import Dataset

    from dicom_node.node import Node
    from dicom_node.scp import ReceivedInstance
    from dicom_node.scu import RetrieveResult


class RetrievalError(NodeError):
    """A source could not be reached; the job is retried with backoff."""


@dataclass
class Target:
    """One study (or some of its series or instances) to fetch."""

    study: str
    series: str | None = None
    instances: list[str] = field(default_factory=list)
    # the patient the study must belong to: the request's PatientID, else the sources'
    patient_id: str | None = None
    refusal: str = ""  # why it is not fetched at all (another patient's study)

    def key(self) -> str:
        return "/".join(x for x in (self.study, self.series) if x)


# The status shows this many failed SOP Instance UIDs per study (the count is exact).
MAX_FAILED_LISTED = 100


@dataclass(frozen=True)
class StudyMatch:
    """One study a source's C-FIND or QIDO-RS answer names, and its Patient ID there."""

    study: str
    patient_id: str | None  # None: the answer gave none


def dicom_string(value: Any) -> str | None:
    """A DICOM string as compared: trailing spaces stripped, case kept; None if empty."""
    text = str(value).rstrip(" ") if value is not None else ""
    return text or None


def wrong_patient(study: str, owner: str, requested: str) -> str:
    return (f"study {study} belongs to patient {owner} on the PACS, not {requested} "
            "as the request says; not retrieved")


@dataclass
class Fetched:
    """What one source gave for one target."""

    paths: list[Path]
    failed: int = 0  # instances that did not arrive (the peer's count, or ours if larger)
    failed_instances: list[str] = field(default_factory=list)  # their UIDs, where known
    message: str = ""
    # what the pipeline reads, one per path: the header the writer already read, else
    # the path
    sources: list[Path | Dataset] = field(default_factory=list)


@dataclass
class Progress:
    study: str
    source: str = ""
    state: str = "pending"  # pending, retrieved, partial, failed
    received: int = 0
    failed: int = 0
    failed_instances: list[str] = field(default_factory=list)
    message: str = ""
    patient_id: str | None = None  # what the sources (or the instances) say
    refused: bool = False  # not fetched or not processed: another patient's

    def as_dict(self) -> dict[str, Any]:
        return {"study": self.study, "PatientID": self.patient_id, "source": self.source,
                "state": self.state, "received": self.received, "failed": self.failed,
                "failed_instances": self.failed_instances[:MAX_FAILED_LISTED],
                "message": self.message}


class Retriever:
    """Fetches a job's studies; returns the stored paths of what arrived."""

    def __init__(self, node: Node, ctx: JobContext) -> None:
        self.node = node
        self.ctx = ctx
        self.unreachable: list[str] = []
        # what arrived, by StudyInstanceUID: the headers read while storing (the runner
        # takes them instead of reading each file once more), or paths
        self.by_study: dict[str, list[Path | Dataset]] = {}

    # -- sources -------------------------------------------------------------------------

    def _dimse_source(self, name: str) -> SourceSettings:
        for s in self.node.settings.sources:
            if s.name == name:
                return s
        raise PermanentJobError(f"source {name!r} is no longer configured")

    def _web_client(self, src: dict[str, Any]) -> Any:
        from dicom_node.dicomweb import BasicAuth, BearerAuth, DicomWebClient

        auth: Any = None
        kind = str(src.get("authType") or "None").lower()
        secret = src.get("authId") or ""
        if kind == "basic":
            if ":" not in secret:
                with contextlib.suppress(ValueError, UnicodeDecodeError):
                    secret = base64.b64decode(secret).decode("utf-8")
            user, _, password = secret.partition(":")
            auth = BasicAuth(user, password)
        elif kind == "bearer":
            auth = BearerAuth(secret)
        return DicomWebClient(src["uri"], auth, retries=1)

    @staticmethod
    def _label(src: dict[str, Any]) -> str:
        return str(src.get("name") or src.get("uri") or "?")

    # -- resolve -------------------------------------------------------------------------

    def resolve(self, query: dict[str, Any], sources: list[dict[str, Any]]) -> list[Target]:
        """The studies (or series, instances) a query names, each with the patient it
        must belong to; one that belongs to another patient than the request names, or
        that an accession matching several patients' studies names, carries a refusal."""
        kind = query.get("type")
        requested = dicom_string(query.get("PatientID"))
        if kind == "DICOM_UID":
            targets = []
            for st in query.get("studies", []):
                series = st.get("series") or []
                if not series:
                    targets.append(Target(st["StudyInstanceUID"]))
                for se in series:
                    sops = [u for inst in se.get("instances") or []
                            for u in inst.get("SOPInstanceUID", [])]
                    targets.append(Target(st["StudyInstanceUID"], se["SeriesInstanceUID"], sops))
            if requested is not None:
                self._check_owners(targets, requested, sources)
            return targets
        keys: list[dict[str, str]] = []
        if kind == "DICOM_PATIENT_ID":
            keys = [{"patient_id": query["PatientID"]}]
        elif kind == "ACCESSION_NUMBER":
            keys = [{"accession_number": a} for a in query.get("accessionNumber", [])]
        found: dict[str, Target] = {}
        for key in keys:
            owners: dict[str, set[str]] = {}  # study -> the Patient IDs the sources give
            for src in sources:
                for m in self._find_studies(src, key):
                    ids = owners.setdefault(m.study, set())
                    if m.patient_id is not None:
                        ids.add(m.patient_id)
            patients = set().union(*owners.values()) if owners else set()
            ambiguous = ""
            if "accession_number" in key and len(patients) > 1:
                # An accession number names one patient's order; a PACS where it matches
                # several patients' studies holds a mix-up nobody may guess around.
                ambiguous = (f"accession number {key['accession_number']} matches studies "
                             f"of {len(patients)} patients on the PACS "
                             f"({', '.join(sorted(patients))}); none of them retrieved")
            for uid, ids in owners.items():
                target = found.setdefault(uid, Target(uid))
                owner = next(iter(ids)) if len(ids) == 1 else None
                target.patient_id = target.patient_id or requested or owner
                if target.refusal:
                    continue  # refused for another key of the request: stays refused
                if ambiguous:
                    target.patient_id, target.refusal = owner, ambiguous
                elif len(ids) > 1:  # the sources disagree on whose study it is
                    target.refusal = (f"study {uid} belongs to {len(ids)} patients on the "
                                      f"sources ({', '.join(sorted(ids))}); not retrieved")
                elif requested is not None and owner is not None and owner != requested:
                    target.patient_id = owner
                    target.refusal = wrong_patient(uid, owner, requested)
        if not found:
            what = ", ".join(f"{k}={v}" for key in keys for k, v in key.items())
            if self.unreachable:
                raise RetrievalError(f"no study found for {what}; unreachable: "
                                     f"{'; '.join(self.unreachable)}")
            raise PermanentJobError(f"no study found for {what} on "
                                    f"{', '.join(self._label(s) for s in sources)}")
        return list(found.values())

    def _check_owners(self, targets: list[Target], requested: str,
                      sources: list[dict[str, Any]]) -> None:
        """Refuse each target whose study a source files under another patient than
        ``requested``. A study no source can find or answer for is left to the fetch
        (which says it is missing) and to the check of what arrives."""
        owners: dict[str, set[str]] = {}
        for study in dict.fromkeys(t.study for t in targets):
            ids = owners.setdefault(study, set())
            for src in sources:
                ids.update(m.patient_id for m in self._find_studies(
                    src, {"study_instance_uid": study})
                    if m.study == study and m.patient_id is not None)
        for t in targets:
            t.patient_id = requested
            others = sorted(owners[t.study] - {requested})
            if others:
                t.patient_id = ", ".join(others)  # whose study it is, as the status says
                t.refusal = wrong_patient(t.study, t.patient_id, requested)

    def _find_studies(self, src: dict[str, Any], key: dict[str, str]) -> list[StudyMatch]:
        from dicom_node.dicomweb import DicomWebError

        if src["interface"] == "DICOMweb":
            ops = src.get("operations")
            if ops is not None and "QUERY" not in ops:
                return []  # the request allows this source to be read, not searched
            web_key = {("study_uid" if k == "study_instance_uid" else k): v
                       for k, v in key.items()}
            try:
                with self._web_client(src) as client:
                    return [StudyMatch(s.study_uid, dicom_string(s.patient_id))
                            for s in client.search_studies(**web_key)]
            except DicomWebError as exc:
                self.unreachable.append(f"{self._label(src)}: {exc}")
                return []
        from dicom_node.scu import Query, QueryLevel

        source = self._dimse_source(src["name"])
        result = self.node.dicom_client().find(source, Query(QueryLevel.STUDY, **key))
        if not result.ok:
            self.unreachable.append(f"{source.name}: {result.message}")
        return [StudyMatch(str(m.StudyInstanceUID), dicom_string(m.get("PatientID")))
                for m in result.matches if m.get("StudyInstanceUID")]

    # -- fetch ---------------------------------------------------------------------------

    def run(self, queries: list[dict[str, Any]], sources: list[dict[str, Any]]) -> list[Path]:
        targets: list[Target] = []
        for q in queries:
            targets += self.resolve(q, sources)
        progress = [Progress(t.key(), patient_id=t.patient_id) for t in targets]
        for target, prog in zip(targets, progress, strict=True):
            if target.refusal:
                prog.state, prog.message, prog.refused = "failed", target.refusal, True
        self.ctx.publish(retrieval=[p.as_dict() for p in progress])
        paths: list[Path] = []
        for target, prog in zip(targets, progress, strict=True):
            if prog.refused:
                continue
            self.ctx.check_cancelled()
            for src in sources:
                fetched = self._fetch(src, target)
                got = fetched.paths
                prog.source = self._label(src)
                if got:
                    prog.received, prog.failed = len(got), fetched.failed
                    prog.failed_instances = fetched.failed_instances
                    arrived = {p for s in fetched.sources if (p := _patient_of(s)) is not None}
                    others = sorted(arrived - {target.patient_id}) if target.patient_id \
                        else sorted(arrived) if len(arrived) > 1 else []
                    if others:
                        # The instances themselves name another patient (a source that
                        # could not be searched, a PACS whose index and files disagree):
                        # kept as received, not processed as the request's patient's.
                        prog.state, prog.refused = "failed", True
                        prog.patient_id = ", ".join(sorted(arrived))
                        prog.message = (f"the instances of {target.key()} that arrived "
                                        f"belong to patient {prog.patient_id}"
                                        + (f", not {target.patient_id} as expected"
                                           if target.patient_id else "")
                                        + "; not processed")
                        break
                    paths += got
                    self.by_study.setdefault(target.study, []).extend(fetched.sources)
                    prog.patient_id = next(iter(arrived), None) or target.patient_id
                    prog.state = "retrieved" if not fetched.failed else "partial"
                    prog.message = fetched.message
                    break
                prog.state, prog.message = "failed", fetched.message
            self.ctx.publish(retrieval=[p.as_dict() for p in progress])
        self._wait_for_space(progress)
        if not paths:
            reasons = "; ".join(f"{p.study}: {p.message}" for p in progress)
            # a study refused as another patient's stays refused however often it is tried
            tried = [p for p in progress if not p.refused]
            if tried and (self.unreachable or any(
                    "cannot" in p.message or "refused" in p.message
                    or "unreachable" in p.message for p in tried)):
                raise RetrievalError(f"nothing retrieved ({reasons})")
            raise PermanentJobError(f"nothing retrieved ({reasons})")
        return paths

    def _wait_for_space(self, progress: list[Progress]) -> None:
        """DeferJob when instances did not come because the node's own disk is short (the
        reserve refused them, 0xA700, or the disk filled): the job ran on the slices that
        had come, half a CT made organ volumes sent to the PACS as a success. It waits for
        space as jobs do, and fetches the study again then."""
        missed = [p for p in progress if p.state in ("partial", "failed") and not p.refused]
        if not missed:
            return
        settings = self.node.settings
        why = short_of_space(settings, settings.studies_dir) or next(
            (p.message for p in missed if "No space left" in p.message
             or "free disk space is low" in p.message), None)
        if why:
            raise DeferJob(f"the disk of the studies is short of space ({why}): "
                           f"{sum(p.failed for p in missed)} instance(s) of the retrieval "
                           "were not kept; it is fetched again once there is room",
                           DISK_FULL_RETRY_S)

    def _fetch(self, src: dict[str, Any], t: Target) -> Fetched:
        """What one source gave for one target: stored paths, failures, a message."""
        if src["interface"] == "DICOMweb":
            return self._fetch_web(src, t)
        from dicom_node.scu import Query, QueryLevel

        source = self._dimse_source(src["name"])
        level = (QueryLevel.IMAGE if t.instances else
                 QueryLevel.SERIES if t.series else QueryLevel.STUDY)
        query = Query(level, study_instance_uid=t.study, series_instance_uid=t.series,
                      sop_instance_uid="\\".join(t.instances) or None)
        client = self.node.dicom_client()
        result = client.retrieve(source, query)
        got = [r.path for r in result.received]
        sources: list[Path | Dataset] = [r.header or r.path for r in result.received]
        message = result.message or ("" if got else "the source has no such study")
        if not result.ok and not got and "associat" in message:
            self.unreachable.append(f"{source.name}: {message}")
        elif not got:
            # PACS answer a C-MOVE of an unknown study in different ways (Orthanc: 0xC000
            # "unable to process"); a C-FIND tells a person what actually happened.
            found = client.find(source, Query(level, study_instance_uid=t.study,
                                              series_instance_uid=t.series,
                                              sop_instance_uid=query.sop_instance_uid))
            if found.ok and not found.matches:
                what = "instances" if t.instances else "series" if t.series else "study"
                message = f"the source has no such {what} (C-FIND found no match)"
        failed, uids = dimse_failures(result)
        return Fetched(got, failed, uids, message, sources)

    def _fetch_web(self, src: dict[str, Any], t: Target) -> Fetched:
        from dicom_node.dicomweb import DicomWebError, DicomWebNotFound, InstanceRef

        folder = self.ctx.work_dir / "retrieved"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with self._web_client(src) as client:
                # Scratch, moved into the studies at once without fsync like every
                # retrieved instance: a crash makes the job fetch them again.
                if t.instances:
                    assert t.series is not None
                    result = client.retrieve_instances(
                        [InstanceRef(t.study, t.series, s) for s in t.instances], folder,
                        durable=False)
                elif t.series:
                    result = client.retrieve_series(t.study, t.series, folder, durable=False)
                else:
                    result = client.retrieve_study(t.study, folder, durable=False)
        except DicomWebNotFound:
            return Fetched([], message="the source has no such study")
        except DicomWebError as exc:
            self.unreachable.append(f"{self._label(src)}: {exc}")
            return Fetched([], message=f"unreachable: {exc}")
        writer = self.node.instance_writer()
        placed: list[ReceivedInstance] = []
        failed = [o.sop_uid for o in result.failed]
        unusable: list[str] = []
        for outcome in result.succeeded:
            assert outcome.path is not None
            try:
                placed.append(writer.write(
                    outcome.path, called_ae=self.node.settings.dimse.ae_title,
                    calling_ae="DICOMWEB", association_id=0, source="retrieve",
                    durable=False, keep_header=True, record=False))
            except InvalidInput as exc:  # e.g. a part cut short: that instance failed
                failed.append(outcome.sop_uid)
                unusable.append(f"{outcome.sop_uid}: {exc}")
        writer.record(placed, durable=False)  # one commit, not one per instance
        stored = [r.path for r in placed]
        sources: list[Path | Dataset] = [r.header or r.path for r in placed]
        message = "" if stored else "the source has no such study"
        if unusable and not stored:
            message = f"nothing usable arrived ({len(unusable)} unreadable: {unusable[0]})"
        return Fetched(stored, len(failed), [u for u in failed if u], message, sources)


def _patient_of(source: Path | Dataset) -> str | None:
    """The Patient ID of an arrived instance (its header, else read from its file)."""
    if isinstance(source, Path):
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:
            source = pydicom.dcmread(source, stop_before_pixels=True,
                                     specific_tags=["PatientID"])
        except (OSError, InvalidDicomError):
            return None  # unreadable: the pipeline fails on it with the reason
    return dicom_string(source.get("PatientID"))


def dimse_failures(result: RetrieveResult) -> tuple[int, list[str]]:
    """How many instances of a C-MOVE/C-GET failed, and the UIDs of those named.

    The peer counts its failed sub-operations; ``failures`` names the instances it (or
    our own write) could name. They are the same instances, so the count is the larger
    of the two, not their sum.
    """
    uids = list(dict.fromkeys(f.sop_instance_uid for f in result.failures
                              if f.sop_instance_uid))
    return max(result.failed, len(uids)), uids
