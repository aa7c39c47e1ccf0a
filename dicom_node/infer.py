"""``dicom-node infer``: run the pipelines on files, without a running node.

A file, a series folder or a tree of studies is read (headers only), grouped by
study, and each study goes through the pipelines that suit it (their series rules:
a CT study to the segmentation, a radiograph to the classifier), or through the one
``--model`` names. The results are written as the node writes a job's, under
``--out``: ``<out>/<pipeline>/<patient>/`` (a patient with several studies gets
``<out>/<pipeline>/<StudyUID>/<patient>/``). Nothing is stored, queued or sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.config import Settings
from dicom_node.errors import NodeError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from pipeline.io import SeriesError
    from pipeline.runner import RunOutput
    from pipeline.settings import PipelineSpec

DEFAULT_OUT = Path("dicom-node-results")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR's SOP class


class UsageError(NodeError):
    """The command line names something that does not exist (exit 2)."""


@dataclass
class Study:
    """The files of one study found under the given paths, with their headers."""

    uid: str
    headers: dict[Path, Dataset] = field(default_factory=dict)

    @property
    def patient_id(self) -> str:
        first = next(iter(self.headers.values()))
        return str(first.get("PatientID", "") or "").strip() or "(no Patient ID)"

    def folder_id(self) -> str | None:
        """What the results will be named by when the files' PatientID cannot name a
        folder (see :func:`pipeline.runner.folder_patient_id`), else None."""
        from pipeline.runner import folder_patient_id

        first_path, first = next(iter(self.headers.items()))
        return folder_patient_id(first, first_path)


@dataclass
class Outcome:
    """What one pipeline did with one study."""

    pipeline: str
    study: str
    out_dir: Path
    ok: bool
    summary: str
    result: dict[str, Any] = field(default_factory=dict)


def _files(paths: Sequence[Path]) -> Iterator[Path]:
    """Every regular file under ``paths``, hidden names (``.x``) left out, sorted. A
    DICOMDIR named by itself stands for its folder: a CD's files lie beside it."""
    for root in paths:
        if root.is_file() and root.name.upper() == "DICOMDIR":
            root = root.parent
        if root.is_file():
            yield root
            continue
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if not name.startswith("."):
                    yield Path(folder) / name


def scan(paths: Sequence[Path], progress: bool = True,
         ) -> tuple[list[Study], list[Path], list[tuple[Path, Path]]]:
    """Group the DICOM files under ``paths`` by study; also return the files that are not
    DICOM (or cannot be read), and the copies left out: (copy, the file read instead)
    for each file whose SOP Instance UID an earlier file has."""
    from tqdm import tqdm

    from pipeline.io import InputError, read_dataset

    for p in paths:
        if not p.exists():
            raise UsageError(f"{p}: no such file or folder")
    studies: dict[str, Study] = {}
    skipped: list[Path] = []
    seen: dict[str, Path] = {}  # SOP Instance UID -> the file read first
    duplicates: list[tuple[Path, Path]] = []
    files = list(dict.fromkeys(_files(paths)))
    for path in tqdm(files, desc="reading headers", unit="file", disable=not progress,
                     leave=False):
        try:
            with warnings.catch_warnings():  # pydicom's guesses about a file that is not DICOM
                warnings.simplefilter("ignore")
                ds = read_dataset(path, stop_before_pixels=True)
        except InputError:
            skipped.append(path)
            continue
        if str(ds.get("SOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
            continue  # the DICOMDIR itself: the files it lists are read where they lie
        sop = str(ds.get("SOPInstanceUID", "") or "")
        if sop and sop in seen:  # a second copy of a folder, a link to the same files
            duplicates.append((path, seen[sop]))
            continue
        seen[sop] = path
        uid = str(ds.get("StudyInstanceUID", "") or "") or "unknown"
        studies.setdefault(uid, Study(uid)).headers[path] = ds
    return list(studies.values()), skipped, duplicates


def with_model_file(settings: Settings, name: str) -> tuple[Settings, str]:
    """``settings`` with a model and a pipeline for the bundle folder or TorchScript
    file ``name`` points to, and the pipeline's name; as they were when ``name`` is a
    configured pipeline or model, or no such file. The task and the modality come from
    the model's metadata; every output the task has is written."""
    from pipeline.bundle import BundleError, describe
    from pipeline.settings import ModelSpec, PipelineSpec, SeriesRules, Task

    path = Path(name).expanduser()
    configured = {p.name for p in settings.pipelines} | {p.model for p in settings.pipelines}
    if name in configured or not path.exists():
        return settings, name
    # A configured model's own files (the shipped demo bundles): its pipelines, with
    # their rules, rather than the same model loaded a second time under its name.
    for spec in settings.models:
        if settings.model_path(spec).resolve() == path.resolve() and spec.name in configured:
            return settings, spec.name
    try:
        task, modality = describe(path)
    except BundleError as exc:
        raise UsageError(f"--model {name}: {exc}") from None
    stem = path.resolve().name.removesuffix(path.suffix) if path.is_file() else \
        path.resolve().name
    label = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).lstrip("._-")
    label = label or "model"
    taken = {m.name for m in settings.models} | {p.name for p in settings.pipelines}
    base, n = label, 2
    while label in taken:  # another model of that name is configured
        label, n = f"{base}-{n}", n + 1
    # A radiograph model takes both kinds of radiograph: CR and DX images are the same
    # pictures from different detectors, and metadata names one of them.
    modalities = (["CR", "DX"] if modality in ("CR", "DX") else [modality] if modality
                  else [])
    model = ModelSpec(name=label, path=path.resolve())
    pipeline = PipelineSpec(name=label, model=label, task=Task(task),
                            series=SeriesRules(modalities=modalities))
    return settings.model_copy(update={
        "models": [*settings.models, model],
        "pipelines": [p for p in settings.pipelines if p.name != label] + [pipeline]}), label


def choose(settings: Settings, name: str | None) -> list[PipelineSpec]:
    """The pipelines ``--model`` names (a pipeline, or every pipeline of a model), or all."""
    pipelines = list(settings.pipelines)
    if not pipelines:
        raise UsageError("no pipelines are configured (see `pipelines:` in configs/node.yaml)")
    if name is None:
        return pipelines
    chosen = [p for p in pipelines if p.name == name] or [p for p in pipelines
                                                          if p.model == name]
    if not chosen:
        known = sorted({p.name for p in pipelines} | {p.model for p in pipelines})
        raise UsageError(f"--model {name!r}: no such pipeline or model; configured: "
                         f"{', '.join(known)}")
    return chosen


def _describe(out: RunOutput) -> tuple[str, dict[str, Any]]:
    """One line for a person, and the result as JSON."""
    from pipeline.runner import result_summary

    summary = result_summary(out.result)
    if "findings" in summary:
        present = sorted((f for f in summary["findings"] if f["presence"]),
                         key=lambda f: -f["confidence"])
        found = ", ".join(f"{f['name']} {f['confidence']:.2f}" for f in present)
        return summary["result"] + (f": {found}" if found else ""), summary
    text = ", ".join(f"{s['name']} {s['volume_ml']:.0f} mL" for s in summary["segments"])
    return text or "nothing found", summary


def run_infer(settings: Settings, paths: Sequence[Path], model: str | None, out: Path,
              device: str | None = None, as_json: bool = False,
              progress: bool | None = None) -> int:
    """The ``infer`` command; returns the exit code (0 all ran, 1 a failure or nothing
    to run). Raises UsageError for a bad ``--model`` or path."""
    with _warnings_as_lines():  # pydicom's about odd values, wherever a header is read
        return _run_infer(settings, paths, model, out, device, as_json, progress)


def _run_infer(settings: Settings, paths: Sequence[Path], model: str | None, out: Path,
               device: str | None, as_json: bool, progress: bool | None) -> int:
    from tqdm import tqdm

    from dicom_node.handler import study_folder
    from pipeline.engine import device_problem
    from pipeline.io import InputError, series_refusal
    from pipeline.runner import NotEnoughMemory, PipelineError, PipelineRunner

    show = sys.stderr.isatty() if progress is None else progress
    if model is not None:  # a bundle folder or model file given by its path
        settings, model = with_model_file(settings, model)
    specs = choose(settings, model)
    if device and (problem := device_problem(device)):  # not a failure per study
        raise UsageError(f"--device {device}: {problem}")
    try:  # before any model loads: a bad --out is the command line's fault
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"--out {out}: a file, not a folder") from None
    except OSError as exc:
        raise UsageError(f"--out {out}: {exc.strerror or exc}") from None
    studies, not_dicom, copies = scan(paths, show)
    say = (lambda text: print(text, file=sys.stderr)) if as_json else print
    if not_dicom:
        example = ", ".join(str(p) for p in not_dicom[:3])
        say(f"skipped {len(not_dicom)} file(s) that are not DICOM or cannot be read "
            f"({example}{', ...' if len(not_dicom) > 3 else ''})")
    if copies:
        copy, first = copies[0]
        say(f"skipped {len(copies)} file(s) holding an instance already read (same SOP "
            f"Instance UID: {copy} is {first}{', ...' if len(copies) > 1 else ''})")
    if not studies:
        say(f"no DICOM files under {', '.join(str(p) for p in paths)}")
        return 1

    # Which pipeline runs which study: the named one always (it explains a misfit),
    # otherwise every pipeline whose series rules accept one of the study's series.
    tasks: list[tuple[Study, PipelineSpec]] = []
    unsuited: list[Study] = []
    for study in studies:
        headers = {str(p): ds for p, ds in study.headers.items()}
        misfits = ({} if model is not None
                   else {s.name: series_refusal(headers, s.series) for s in specs})
        fits = [s for s in specs if misfits.get(s.name) is None]
        if fits:
            tasks += [(study, s) for s in fits]
            continue
        unsuited.append(study)
        say(f"study {study.uid} (patient {study.patient_id}, {len(study.headers)} file(s)): "
            f"no series suits {' or '.join(s.name for s in specs)}; nothing run")
        for line in _why_unsuited(headers, specs, misfits):
            say(f"    {line}")
    if not tasks:
        return 1

    wanted = {s.model for _, s in tasks}
    models = [m.model_copy(update={"device": device}) if device else m
              for m in settings.models if m.name in wanted]
    runner = PipelineRunner(models, [s for _, s in tasks], settings.model_path)
    say(f"loading {', '.join(sorted(wanted))} ...")
    runner.start()
    outcomes: list[Outcome] = []
    # Results go in per-patient folders (seed 001's layout); only a patient with several
    # studies for one pipeline gets a folder per study above them, so nothing is overwritten.
    folder_ids = {study.uid: study.folder_id() for study, _ in tasks}
    per_patient: dict[tuple[str, str], int] = defaultdict(int)
    for study, spec in tasks:
        per_patient[(spec.name, folder_ids[study.uid] or study.patient_id)] += 1
    with contextlib.closing(runner):
        bar = tqdm(tasks, desc="running", unit="study", disable=not show)
        for study, spec in bar:
            bar.set_postfix_str(spec.name)
            base = out / spec.name
            folder_id = folder_ids[study.uid]
            out_dir = base / study_folder(study.uid, len(outcomes)) \
                if per_patient[(spec.name, folder_id or study.patient_id)] > 1 else base
            try:
                ran = runner.run(spec.name, list(study.headers), out_dir)
            except (InputError, PipelineError, NotEnoughMemory, ValueError, KeyError) as exc:
                message = str(exc).strip("'\"")
            except Exception as exc:  # a bug must not end the run of the other studies
                message = f"internal error: {type(exc).__name__}: {exc}"
            else:
                message = ""
            if message:
                outcomes.append(Outcome(spec.name, study.uid, out_dir, False, message))
                tqdm.write(f"FAILED  {spec.name}  study {study.uid} (patient "
                           f"{study.patient_id}): {message}", file=sys.stderr)
                continue
            text, result = _describe(ran)
            folder = _common_folder([a.path for a in ran.artifacts]) or out_dir
            outcomes.append(Outcome(spec.name, study.uid, folder, True, text, result))
            who = study.patient_id if folder_id is None else \
                f"{study.patient_id}, results named {folder_id}"
            line = (f"{spec.name}  study {study.uid} (patient {who}): {text}\n"
                    + "".join(f"    note: {n}\n" for n in result.get("notes", []))
                    + f"    results in {folder}")
            tqdm.write(line, file=sys.stderr if as_json else sys.stdout)
    failed = [o for o in outcomes if not o.ok]
    if as_json:
        print(json.dumps({"out": str(out), "results": [
            {"pipeline": o.pipeline, "study": o.study, "ok": o.ok, "output_dir": str(o.out_dir),
             **(o.result if o.ok else {"error": o.summary})} for o in outcomes],
            "skipped_files": [str(p) for p in not_dicom],
            "unsuited_studies": [s.uid for s in unsuited]}, indent=2))
    else:
        print(f"{len(outcomes) - len(failed)} result(s) under {out.resolve()}"
              + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


def _why_unsuited(headers: Mapping[str, Any], specs: Sequence[PipelineSpec],
                  misfits: Mapping[str, SeriesError | None]) -> list[str]:
    """What keeps a study from the pipelines: the refused series of a modality one
    takes (too few images, a scout, another body part), or else that none takes the
    study's modalities."""
    lines = [f"{name}: {reason}" for name, exc in misfits.items() if exc is not None
             for reason in exc.near[:3]]
    if lines or not misfits:
        return lines
    found = sorted({str(ds.get("Modality", "") or "?").upper() for ds in headers.values()})
    takes = "; ".join(f"{s.name} takes {', '.join(s.series.modalities) or 'any'}"
                      for s in specs)
    return [f"no pipeline takes {', '.join(found)} ({takes})"]


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Python warnings (pydicom's about odd values in a file) as one line each, between
    the progress bar's updates, instead of a source path, a line number and the line
    of library code that warned."""
    from tqdm import tqdm

    def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        tqdm.write(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _common_folder(paths: list[Path]) -> Path | None:
    """The deepest folder holding every artifact (the patient's folder, as seed 001 lays
    them out), or None when there are none."""
    if not paths:
        return None
    return Path(os.path.commonpath([p.parent for p in paths]))
