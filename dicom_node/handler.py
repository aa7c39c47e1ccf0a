"""The job handler the node runs by default: retrieval, the pipeline, then export.

- **retrieve** (ACR requests): resolve each query (study UIDs, PatientID or
  AccessionNumber) on the request's sources, then fetch with C-MOVE/C-GET or
  QIDO/WADO-RS; what arrives is stored like any received instance. Progress is
  published per study in the job's result.
- **run**: the job's instances, grouped by study, go through the configured
  pipeline; artifacts land in the job's own output folder, ``<job id>/`` under the
  node's results or under a drop folder's ``output`` (so no job ever writes over
  another's files: two studies of one patient both write ``<PatientID>_*.json``).
- **export**: artifacts go to the pipeline's destinations and the job's own.

Input that can never work (unknown pipeline, wrong modality, unreadable
pixels) fails the job at once with the reason; anything else is retried.
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.config import DestinationSettings, Settings
from dicom_node.errors import DeferJob, PermanentJobError
from dicom_node.export import DimseSender, Exporter
from dicom_node.scheduler import ExportOutcome, JobContext
from dicom_node.store import InstanceRecord, Job, JobState, Store, utcnow
from pipeline.types import Artifact

if TYPE_CHECKING:
    from collections.abc import Mapping

    from dicom_node.node import Node
    from pipeline.runner import PipelineRunner
    from pipeline.settings import PipelineSpec

class NodeHandler:
    """Runs a job's configured pipeline on its instances and sends the results on."""

    def __init__(self, node: Node) -> None:
        self.node = node

    @property
    def settings(self) -> Settings:
        return self.node.settings  # the live settings: runtime config changes apply

    @property
    def store(self) -> Store:
        assert self.node.store is not None
        return self.node.store

    @property
    def runner(self) -> PipelineRunner:
        if self.node.runner is None:
            raise PermanentJobError("the inference pipeline is not running on this node")
        return self.node.runner

    # -- retrieve ------------------------------------------------------------------------

    def needs_retrieval(self, job: Job) -> bool:
        return bool(job.input.get("retrieve"))

    def retrieve(self, ctx: JobContext) -> None:
        from dicom_node.retrieve import Retriever

        spec = ctx.job.input["retrieve"]
        retriever = Retriever(self.node, ctx)
        paths = retriever.run(spec.get("queries", []), spec.get("sources", []))
        ctx.data["paths"] = paths
        ctx.data["studies"] = retriever.by_study  # no need to read each file to group them

    # -- run -----------------------------------------------------------------------------

    def _input_paths(self, ctx: JobContext) -> list[Path]:
        if "paths" in ctx.data:
            return list(ctx.data["paths"])
        from dicom_node.retention import instance_file

        paths: list[Path] = []
        missing = 0
        studies = self.settings.studies_dir.resolve()
        for sop in ctx.job.input.get("instances", []):
            rec = self.store.get_instance(sop)
            # The store keeps absolute paths: after the data directory was moved, the
            # file is at the same place under the new studies folder.
            path = None if rec is None else (
                Path(rec.path) if Path(rec.path).exists() else instance_file(rec, studies))
            if path is None:
                missing += 1
                continue
            paths.append(path)
        if missing:
            ctx.log.warning("instances of the job are no longer on disk", missing=missing)
        return paths

    def output_dir(self, job: Job) -> Path:
        """The job's own results folder: ``<job id>/`` under the drop folder's ``output``
        (a watch job's ``output_dir``) or under the node's results folder. The pipeline
        writes ``<PatientID>/<PatientID>_*`` inside, so a folder shared by jobs would let
        a patient's second study overwrite the first's results."""
        return self._results_base(job) / job.id

    def _results_base(self, job: Job) -> Path:
        configured = job.input.get("output_dir")
        return Path(configured) if configured else self.settings.results_dir

    def run(self, ctx: JobContext) -> list[Artifact]:
        from pipeline.io import IncompleteSeriesError, InputError, series_misfit
        from pipeline.runner import PipelineError, result_summary

        job = ctx.job
        runner = self.runner
        try:
            runner.spec(job.pipeline)
        except PipelineError as exc:
            raise PermanentJobError(str(exc)) from None
        spec = runner.spec(job.pipeline)
        whole: SeriesRead | None = None
        if job.kind in PUSHED_KINDS and spec.series.min_instances > 1 \
                and "paths" not in ctx.data:
            gathered = self._whole_series(ctx)  # or DeferJob while the study arrives
            if isinstance(gathered, str):  # an earlier job's run read all of this group
                ctx.result.update(results=[], outcome=f"skipped: {gathered}")
                return []
            whole = gathered  # None: the store has none of its group (runs on its paths)
        paths = self._input_paths(ctx) if whole is None else whole.paths
        if not paths:
            raise PermanentJobError("none of the job's instances is available to run on")
        by_study: dict[str, list[Any]] = defaultdict(list)
        if "studies" in ctx.data:
            by_study.update(ctx.data["studies"])
        elif whole is not None:  # its headers were read to choose the series
            for source in whole.sources:
                by_study[_study_of(source)].append(source)
        else:
            # Each header is read here once, for the grouping, the series checks below
            # and the runner's own series selection; an unreadable file stays a path
            # (it fails later, in the pipeline, with a reason).
            for source in _headers(paths):
                by_study[_study_of(source)].append(source)
        out_dir = self.output_dir(job)
        _remove_partial_files(out_dir, ctx.log)
        produced: list[Artifact] = []
        results: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        many = len(by_study) > 1
        for study, files in by_study.items():
            ctx.check_cancelled()
            if job.kind in PUSHED_KINDS:
                reason = series_misfit(files, spec.series)
                if reason is not None:
                    why = self._why_skip(ctx, study, files, reason)  # or DeferJob, or fail
                    skipped.append({"study": study, "reason": why})
                    continue
            # Several studies of one patient would write the same file names: each gets
            # its own folder then (a single study keeps the plain layout).
            study_dir = out_dir / study_folder(study, len(results)) if many else out_dir
            try:
                out = runner.run(job.pipeline, files, study_dir, cancelled=ctx.cancelled)
            except IncompleteSeriesError as exc:
                hint = ""
                if job.kind in PUSHED_KINDS:  # made from the instances its group got
                    hint = (f"; or, once the missing instances are in, dicom-node jobs "
                            f"retry {job.id}")
                raise PermanentJobError(f"study {study}: {exc}{hint}") from None
            except (InputError, PipelineError, ValueError) as exc:
                raise PermanentJobError(f"study {study}: {exc}") from None
            except KeyError as exc:  # a model that failed to load
                raise PermanentJobError(str(exc).strip("'\"")) from None
            produced += out.artifacts
            _add_timings(ctx, out.timings)
            results.append({"study": study, **result_summary(out.result)})
        ctx.result["results"] = results
        if whole is not None:
            self._after_whole_series(ctx, whole, ran=bool(results))
        if skipped:
            ctx.result["skipped"] = skipped
            # the job's last word in its history (`dicom-node jobs show`)
            if not results and len(skipped) == 1:
                outcome = f"skipped: {skipped[0]['reason']}"
            else:
                outcome = f"skipped {len(skipped)} studies with no series for this pipeline"
                if results:
                    outcome += f"; ran on {len(results)}"
            ctx.result["outcome"] = outcome
        if results:
            ctx.result["output_dir"] = str(out_dir)
        return produced

    def _why_skip(self, ctx: JobContext, study: str, files: list[Any], reason: str) -> str:
        """Why a pushed study that no series of the job's pipeline suits (``reason``) is
        skipped. Raises DeferJob while the study may still be completed by another
        group, and PermanentJobError when nothing the intake runs reads it."""
        job = ctx.job
        if _another_reads(job, files, self.runner.pipelines):
            # An AE title or drop folder feeds every study to all its pipelines; a CT
            # study is no failure of the chest X-ray pipeline.
            ctx.log.info("study skipped: no series for this pipeline", study_uid=study)
            return reason
        if wait := self._arriving_for(job, study):
            # A scout sent in its own association before the axial series: what comes
            # next decides between a skip and a failure.
            raise DeferJob(f"study {study} is still arriving; this part: {reason}",
                           delay_s=wait)
        if self._rest_of_study_is_read(job, study, files):
            # A part of a study whose images came in another group: a scout, a CT's dose
            # report, a key object, the node's own results sent back.
            ctx.log.info("study skipped: a part no pipeline reads", study_uid=study)
            return f"the rest of the study came in another group; this part: {reason}"
        # Nothing this intake runs can read it (an SR, an RT plan, a modality no
        # pipeline takes): a failure a person should see, not a skip.
        raise PermanentJobError(f"study {study}: {reason}")

    def _rest_of_study_is_read(self, job: Job, study: str, files: list[Any]) -> bool:
        """Whether ``study`` with its instances that the node received in other groups
        suits a pipeline of the job's intake (its own included)."""
        from pipeline.io import series_misfit

        names = job.input.get("intake_pipelines") or [job.pipeline]
        specs = [spec for name in names if (spec := self.runner.pipelines.get(name))]
        # Only the headers a pipeline could take are read (a study's slices, not its SRs;
        # an instance recorded without a modality is read)
        wanted = {m.upper() for spec in specs for m in spec.series.modalities}
        if any(not spec.series.modalities for spec in specs):
            wanted = set()
        ours = set(job.input.get("instances", []))
        held = [Path(r.path) for r in self.store.instances_of(study)
                if r.sop_instance_uid not in ours
                and (not wanted or not r.modality or r.modality.upper() in wanted)
                and Path(r.path).is_file()]
        if not held:
            return False
        whole = [*files, *_headers(held)]
        return any(series_misfit(whole, spec.series) is None for spec in specs)

    def _arriving_for(self, job: Job, study: str) -> float:
        """How long to wait before ``study`` has been quiet for its intake's group
        timeout (a later group may still complete it); 0 when it has, or when the job
        has waited long enough."""
        last = self.store.study_last_received(study)
        if last is None or utcnow() - job.created_at > MAX_WAIT_FOR_STUDY:
            return 0.0
        quiet_s = float(job.input.get("group_timeout_s", 5.0))
        left = quiet_s - (utcnow() - last).total_seconds()
        return left + 0.5 if left > 0 else 0.0

    # -- a series that came in parts -----------------------------------------------------

    def _whole_series(self, ctx: JobContext) -> SeriesRead | str | None:
        """What a pushed job whose pipeline reads a series runs on: every instance of the
        series its group has part of that the node holds now and that came the same way
        (what ``jobs retry`` gathers), not only its group's part.

        Raises DeferJob while more of the study keeps arriving (its group may be one of
        several parts), and while another job of the study that read all of this group
        still runs. Returns the reason to skip when such a job already ran (its results
        are the series' results: a second set would conflict with them), else what to
        run on, recorded in the job's result (``read``) in one transaction with that
        decision, so that two parts' jobs never both run on the whole series. None when
        the store holds none of the group as having come that way."""
        from dicom_node.retention import instance_file

        job = ctx.job
        own = dict.fromkeys(str(u) for u in job.input.get("instances", []))
        # However each instance came: the store keeps only the last way of each (the same
        # series sent to two AE titles), and an instance is the same object either way.
        held = self.store.held_the_same_way(job, any_way=True)
        if not any(r.sop_instance_uid in own for r in held):
            return None  # none of its group is held: it runs on what it has
        # The series the pipeline reads of the study as held now (a scout, reformats, a
        # second axial series are not it): what the run reads, and what a claim is about.
        studies = self.settings.studies_dir.resolve()
        located = [(r, p) for r in held
                   if (p := r.path if r.path.exists() else instance_file(r, studies))]
        headers = dict(zip((r.sop_instance_uid for r, _ in located),
                           _headers([p for _, p in located]), strict=True))
        chosen = self._series_read(job, headers)
        if chosen is None:
            return None  # none suits the pipeline: the run says why, on the job's own
        series = {chosen}
        records = [r for r in held if r.series_instance_uid == chosen]
        self._wait_for_parts(job, records, own)

        read = [r.sop_instance_uid for r in records]
        covering: Job | None = None
        superseded: list[Job] = []
        partial: set[str] = set()  # of those, the jobs that read part of the series

        # An instance sent again after a run read it (a deliberate resend) is not
        # covered by that run: it was not what the run saw.
        own_latest = max((r.received_at for r in records if r.sop_instance_uid in own),
                         default=datetime.min.replace(tzinfo=UTC))  # none of it is ours

        def decide(others: list[Job]) -> dict[str, Any] | None:
            nonlocal covering, superseded
            mine = set(read)
            claims = [(o, set((o.result or {})["read"])) for o in others if _has_results(o)]
            # covered: an earlier run read the whole series as it is held now, after this
            # group's instances came (this group may hold none of it: reformats only)
            covering = next((o for o, saw in claims if mine <= saw
                             and _read_at(o) >= own_latest), None)
            if covering is not None:
                return None
            superseded = [o for o, saw in claims
                          if o.state is not JobState.RUNNING and saw & mine]
            partial.update(o.id for o, saw in claims if not mine <= saw)
            ctx.result.update(read=read, read_at=utcnow().isoformat())
            return dict(ctx.result)

        if not self.store.claim_for_group_job(job, decide):
            if covering is None:  # the lease was lost: another node has the job now
                raise DeferJob("the job's lease was lost while it chose its series",
                               delay_s=1.0)
            total = len(covering.result["read"]) if covering.result else 0
            if covering.state is JobState.RUNNING:
                raise DeferJob(f"job {covering.id} runs on the whole series now, all "
                               f"{len(own)} instance(s) of this group included",
                               delay_s=_COVERED_RECHECK_S)
            ctx.result["covered_by"] = covering.id
            ctx.log.info("group read by an earlier job's run on the whole series",
                         covered_by=covering.id)
            mine_in = sum(1 for u in own if u in set(read))
            if mine_in < len(own):  # parts of other series the pipeline does not read
                return (f"job {covering.id} ran on the whole series this pipeline reads "
                        f"({total} instances); {mine_in} of this group's {len(own)} "
                        "instance(s) are of it, the rest of series it does not read")
            return (f"all {len(own)} instance(s) of this group were read by job "
                    f"{covering.id}'s run on the whole series ({total} instances); its "
                    "results are this series' results")
        chosen_located = [(r, p) for r, p in located if r.series_instance_uid == chosen]
        paths = [p for _, p in chosen_located]
        sources = [headers[r.sop_instance_uid] for r, _ in chosen_located]
        from_group = sum(1 for u in read if u in own)
        missing = len(set(own) - {r.sop_instance_uid for r in held})
        if missing:
            ctx.log.warning("instances of the job are no longer held", missing=missing)
        return SeriesRead(paths=paths, sources=sources, read=read, series=sorted(series),
                          from_group=from_group, superseded=[o.id for o in superseded],
                          partial=[o.id for o in superseded if o.id in partial])

    def _series_read(self, job: Job, headers: Mapping[str, Any]) -> str | None:
        """The UID of the series the job's pipeline would choose among the instances'
        ``headers`` (its rules and ranking, as the run applies them), or None when none
        suits it."""
        from pipeline.io import InputError, select_series

        readable = [h for h in headers.values() if not isinstance(h, Path)]
        try:
            return str(select_series(readable, self.runner.spec(job.pipeline).series)
                       .series_instance_uid)
        except (InputError, ValueError):
            return None

    def _wait_for_parts(self, job: Job, records: list[InstanceRecord],
                        own: Mapping[str, None]) -> None:
        """Raise DeferJob while the job's study may still be arriving in other groups:
        something of it arrived after the job was made, or its series came in several
        groups lately (a modality that sends one instance per association), until the
        study has been quiet for the intake's group timeout; at most
        MAX_WAIT_FOR_STUDY after the job was made. A study sent in one go waits not."""
        now = utcnow()
        if now - job.created_at > MAX_WAIT_FOR_STUDY:
            return
        quiet = timedelta(seconds=float(job.input.get("group_timeout_s", 5.0)))
        last = self.store.study_last_received(job.input.get("study_instance_uid", ""))
        arrived_after = last is not None and last > job.created_at
        in_parts = any(r.sop_instance_uid not in own and r.received_at > job.created_at - quiet
                       for r in records)
        if not (arrived_after or in_parts):
            return
        left = (max(last or job.created_at, job.created_at) + quiet - now).total_seconds()
        if left > 0:
            raise DeferJob(f"study {job.input.get('study_instance_uid')} is still arriving "
                           "in other groups; this job runs on the whole series once it has "
                           f"been quiet for {quiet.total_seconds():g} s", delay_s=left + 0.5)

    def _after_whole_series(self, ctx: JobContext, whole: SeriesRead, *, ran: bool) -> None:
        """Once the pipeline ran on ``whole``: raise DeferJob (its results are dropped)
        when more of the series arrived meanwhile, else say what it ran on and which
        earlier results it supersedes."""
        job = ctx.job
        if not ran:
            ctx.result.pop("read", None)
            ctx.result.pop("read_at", None)
            return
        now_held = self.store.held_the_same_way(job, whole.series, any_way=True)
        more = {r.sop_instance_uid for r in now_held} - set(whole.read)
        if more and utcnow() - job.created_at <= MAX_WAIT_FOR_STUDY:
            for key in ("read", "read_at", "results"):
                ctx.result.pop(key, None)
            ctx.publish()
            quiet_s = float(job.input.get("group_timeout_s", 5.0))
            raise DeferJob(f"{len(more)} more instance(s) of the series arrived while it "
                           "ran; it runs again on the whole series, its results of this "
                           "run are not sent", delay_s=quiet_s + 0.5)
        others = len(whole.read) - whole.from_group
        ctx.result["whole_series"] = {
            "series": whole.series, "instances": len(whole.read),
            "from_group": whole.from_group, "from_other_groups": others,
            **({"supersedes": whole.superseded} if whole.superseded else {})}
        if not others and not whole.superseded:
            return
        outcome = (f"ran on {len(whole.read)} instances of the series: {whole.from_group} "
                   f"from this group, {others} received in other groups")
        if whole.superseded:
            ids = ", ".join(whole.superseded)
            made = ("made from part of it" if set(whole.partial) == set(whole.superseded)
                    else "made before some of its instances came again"
                    if not whole.partial else "made from part of it, or before some of "
                    "its instances came again")
            outcome += (f"; supersedes the result of job {ids} for this series ({made} "
                        "and already sent on; it cannot be unsent)")
            for old in whole.superseded:
                with contextlib.suppress(Exception):  # a note; the run stands without it
                    self.store.note(old, f"superseded: job {job.id} ran on the whole "
                                         f"series ({len(whole.read)} instances)")
        ctx.result["outcome"] = outcome

    # -- export --------------------------------------------------------------------------

    def export(self, ctx: JobContext, artifacts: list[Artifact]) -> list[ExportOutcome]:
        job = ctx.job
        names: list[str] = []
        spec = self.runner.pipelines.get(job.pipeline)
        if spec is not None:
            names += spec.destinations
        extra: list[DestinationSettings] = []
        for i, d in enumerate(job.input.get("destinations", [])):
            if isinstance(d, str):
                names.append(d)
            elif d.get("name"):
                names.append(d["name"])
            elif d.get("interface") == "DICOMweb":
                extra.append(_dicomweb_destination(f"request-output-{i}", d))
        if not names and not extra:
            return []
        # Folder destinations mirror the results: <job id>/<patient>/..., from the node's
        # own results folder or a drop folder's output alike.
        exporter = Exporter(
            self.settings, {"dimse": DimseSender(self.node.dicom_client(), ctx.cancelled)},
            base=self._results_base(job), log=ctx.log)
        # Each destination's outcome is recorded as it settles, and what a DIMSE peer
        # acknowledges as it comes: a crash later in the pass sends none of it again.
        return exporter.export(names, artifacts, ctx.cancelled, extra, ctx.exported,
                               on_outcome=ctx.export_settled, on_progress=ctx.export_progress)


# A pushed part no pipeline reads waits at most this long for the rest of its study.
MAX_WAIT_FOR_STUDY = timedelta(minutes=10)

# How soon a job whose group another job's running whole-series run read looks again.
_COVERED_RECHECK_S = 2.0


@dataclass(frozen=True)
class SeriesRead:
    """What a pushed job runs on: the whole of the series its group has part of."""

    paths: list[Path]
    sources: list[Any]  # each path's header (the path when unreadable), read once
    read: list[str]  # SOP Instance UIDs, in the order they arrived
    series: list[str]
    from_group: int  # how many of ``read`` the job's own group brought
    superseded: list[str] = field(default_factory=list)  # earlier runs on this series
    partial: list[str] = field(default_factory=list)  # of those, runs on part of it


def _read_at(job: Job) -> datetime:
    """When ``job`` recorded the instances its run read (the epoch when it did not say)."""
    try:
        return datetime.fromisoformat(str((job.result or {}).get("read_at")))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


def _has_results(job: Job) -> bool:
    """Whether ``job`` ran on the whole of a series as held then and has, or is making,
    results from it: running, exporting, done, or waiting for an export pass."""
    if not job.result or not isinstance(job.result.get("read"), list):
        return False
    return (job.state in (JobState.RUNNING, JobState.EXPORTING, JobState.SUCCEEDED)
            or (job.state is JobState.QUEUED and "artifacts" in job.result))

# Jobs made by the assembler for whatever arrived, as opposed to requests naming a pipeline.
PUSHED_KINDS = frozenset({"dimse", "watch", "stow"})


def _another_reads(job: Job, sources: list[Any], pipelines: Mapping[str, PipelineSpec]) -> bool:
    """Whether another pipeline the job's intake feeds can read the study (True for jobs
    queued before intakes named their pipelines: they keep skipping)."""
    from pipeline.io import series_misfit

    intake = job.input.get("intake_pipelines")
    if intake is None:
        return True
    return any(series_misfit(sources, spec.series) is None
               for name in intake if name != job.pipeline
               and (spec := pipelines.get(name)) is not None)


def _remove_partial_files(out_dir: Path, log: Any) -> None:
    """Remove the temporary files (``.<name>.<pid>.<hex>.part``, see
    pipeline.artifacts._common.atomic_path) an earlier attempt of this job left in its own
    results folder when the node died mid-write: nothing else removed them, and one can
    be as large as a SEG. The folder is the job's alone, and one attempt runs at a time."""
    if not out_dir.is_dir():
        return
    left = [p for p in out_dir.rglob(".*.part") if p.is_file()]
    for path in left:
        path.unlink(missing_ok=True)
    if left:
        log.info("removed partial result files an interrupted attempt left", files=len(left))


def _add_timings(ctx: JobContext, timings: dict[str, float]) -> None:
    """Sum the pipeline's load/compute/write seconds over the job's studies."""
    total = ctx.result.setdefault("timings", {})
    for key, seconds in timings.items():
        total[key] = round(total.get(key, 0.0) + seconds, 4)


def _headers(paths: list[Path]) -> list[Any]:
    """Each file's header (without pixels), or its path when it cannot be read."""
    from pipeline.io import InputError, read_dataset

    out: list[Any] = []
    for path in paths:
        try:
            out.append(read_dataset(path, stop_before_pixels=True))
        except InputError:
            out.append(path)
    return out


def _study_of(source: Any) -> str:
    """The study of a header from :func:`_headers` ("unknown" for an unreadable file)."""
    return str(getattr(source, "StudyInstanceUID", "") or "") or "unknown"


def study_folder(study: str, index: int) -> str:
    """A folder name for one of a job's studies: its UID, or a numbered name for a UID
    that is not one (an unreadable study, named "unknown")."""
    if re.fullmatch(r"[0-9]+(\.[0-9]+)*", study) and len(study) <= 64:
        return study
    return f"study-{index + 1}"


def _dicomweb_destination(name: str, d: dict[str, Any]) -> DestinationSettings:
    """An ACR request's DICOMweb output (already checked against the configuration)."""
    auth = str(d.get("authType") or "None").lower()
    credentials = d.get("authId")
    if auth == "basic" and credentials and ":" not in credentials:
        # Clara sends base64("user:password")
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            credentials = base64.b64decode(credentials).decode("utf-8")
    return DestinationSettings.model_validate({
        "name": name, "type": "dicomweb", "url": d["uri"],
        "auth": auth if auth in ("basic", "bearer") else "none", "credentials": credentials})


def create_handler(node: Node) -> NodeHandler:
    return NodeHandler(node)

