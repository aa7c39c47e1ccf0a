"""Retention: delete received studies and job results after ``storage.retention_days``.

Off unless ``storage.retention_days`` is set. Every ``storage.retention_check_s`` a sweep
deletes, in a worker thread:

- the files of every study that received no instance for that many days and that
  nothing still needs (no job of the study that is not final, no instance still
  waiting to become a job), then its records; a later job naming it fails with
  "no longer on disk", and the same study sent again is stored afresh (also when
  dropped again into a drop folder that moves or deletes what it takes);
- the results folder (``<results_dir>/<job id>``) of every job that finished that long
  ago, then the job's record (its events, artifacts list and exports): the job table
  would otherwise grow for as long as the node runs. A batch's jobs go together, once
  all of them are that old. A drop folder's own output folder and every folder
  destination are the user's: never touched;
- the files of every drop folder's ``done/`` and ``failed/`` (a refused input with its
  ``.reason.txt``) put there that long ago, and the subfolders they leave empty: with
  ``on_done: move`` every dropped file would otherwise stay for good.

Nothing outside the studies and results folders and those two folders of each drop
folder is ever deleted: each path is resolved (links followed) and checked to lie inside
them first; in a drop folder no link is followed, and a link is never deleted. An
instance recorded at a path outside today's studies folder (the data directory was
moved: the store keeps absolute paths) is looked for at the same
``<StudyUID>/<SeriesUID>/<SOPUID>.dcm`` under it; a file that is left where it lies is
counted (``files_left``) and logged with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from dicom_node.config import Settings
from dicom_node.logs import get_logger
from dicom_node.store import InstanceRecord, Store, utcnow
from dicom_node.watch import DONE_DIR, FAILED_DIR

__all__ = ["SweepResult", "delete_drop_folder_files", "delete_results", "delete_study",
           "inputs_to_forget", "instance_file", "sweep"]

log = get_logger("retention")


@dataclass
class SweepResult:
    """What one sweep deleted."""

    studies: int = 0
    instances: int = 0
    bytes: int = 0
    results: int = 0
    jobs: int = 0  # job records
    left: int = 0  # files that could not be deleted (their records are gone)
    dropped: int = 0  # files in drop folders' done/ and failed/
    dropped_bytes: int = 0


def sweep(settings: Settings, store: Store, now: datetime | None = None,
          stop: threading.Event | None = None) -> SweepResult:
    """Delete what ``settings.storage.retention_days`` has expired; a no-op when unset.

    ``stop`` ends the sweep early, between two studies or two results folders (the node
    is stopping); the next sweep goes on from there.
    """
    days = settings.storage.retention_days
    done = SweepResult()
    if days is None:
        return done
    cutoff = (now or utcnow()) - timedelta(days=days)
    studies_root = settings.studies_dir.resolve()
    results_root = settings.results_dir.resolve()
    forget = inputs_to_forget(settings)
    own = files_owner(settings)
    # batch after batch, each going on where the last stopped (a keyset, not a rescan)
    for batch in store.expired_study_batches(cutoff, node_name=own):
        for study in batch:
            if _stopped(stop):
                break
            delete_study(store, study, studies_root, done, forget_inputs_of=forget)
        if _stopped(stop):
            break
    for expired in store.expired_job_batches(cutoff):
        if _stopped(stop):
            break
        for job_id in expired:
            delete_results(job_id, results_root, done)
        forgotten = store.forget_jobs(expired)
        done.jobs += forgotten
        if not forgotten:  # gone meanwhile (another node's sweep): nothing left to do
            break
    for watch in settings.watch:
        if _stopped(stop):
            break
        root = Path(os.path.realpath(settings.path(watch.path)))  # as the watcher does
        for sub in (DONE_DIR, FAILED_DIR):
            delete_drop_folder_files(root / sub, cutoff, done, watch=watch.name)
    if done.studies or done.results or done.jobs or done.dropped:
        log.info("retention sweep", older_than_days=days, studies=done.studies,
                 instances=done.instances, mb=round(done.bytes / 1e6, 1),
                 results_folders=done.results, jobs=done.jobs, files_left=done.left,
                 drop_folder_files=done.dropped,
                 drop_folder_mb=round(done.dropped_bytes / 1e6, 1))
    return done


def files_owner(settings: Settings) -> str | None:
    """The node whose received studies this node may delete, when others on the same
    database keep theirs on their own disks (PostgreSQL without storage.shared): its own
    name. None: every study's files are within reach (one machine, or shared storage)."""
    if settings.storage.shared or settings.database_url.startswith("sqlite"):
        return None
    return settings.node_name


def delete_study(store: Store, study: str, studies_root: Path, done: SweepResult, *,
                 forget_inputs_of: Collection[str] = ()) -> None:
    """Delete a study's instance files (those inside ``studies_root``, see
    :func:`instance_file`), then its records; adds what it did to ``done``. A file that
    cannot or may not be deleted is logged with the reason and counted in ``done.left``;
    the records go anyway. ``forget_inputs_of``: see :func:`inputs_to_forget`."""
    for rec in store.instances_of(study):
        path = instance_file(rec, studies_root)
        if path is None:
            if os.path.lexists(rec.path):  # still there, and not ours to delete
                done.left += 1
                log.warning("instance file not deleted", path=str(rec.path),
                            reason="outside the studies folder", study_uid=study,
                            sop_instance_uid=rec.sop_instance_uid)
            continue
        try:
            size = path.stat().st_size
            path.unlink()
            done.bytes += size
        except FileNotFoundError:
            pass
        except OSError as exc:
            # Forgotten anyway, so that one stubborn file cannot stall every
            # later sweep; the log names it for a person to remove.
            done.left += 1
            log.warning("instance file not deleted", path=str(path),
                        reason=exc.strerror or type(exc).__name__, study_uid=study,
                        sop_instance_uid=rec.sop_instance_uid)
        _prune(path.parent, studies_root)
    done.instances += store.forget_study(study, forget_inputs_of=forget_inputs_of)
    done.studies += 1


def instance_file(rec: InstanceRecord, studies_root: Path) -> Path | None:
    """Where ``rec``'s file lies inside ``studies_root`` (resolved), or None.

    The store keeps absolute paths: after the data directory was moved, a path names the
    old place. Such a path whose tail is the node's own layout,
    ``<StudyUID>/<SeriesUID>/<SOPUID>.dcm`` of this very record, stands for the file at
    that tail under ``studies_root`` when one is there.
    """
    stored = Path(rec.path)
    if (found := _inside(stored, studies_root)) is not None:
        return found
    tail = (rec.study_instance_uid, rec.series_instance_uid, f"{rec.sop_instance_uid}.dcm")
    if stored.parts[-3:] != tail:
        return None
    moved = _inside(studies_root.joinpath(*tail), studies_root)
    return moved if moved is not None and moved.is_file() else None


def inputs_to_forget(settings: Settings) -> list[str]:
    """The drop folders whose content-hash records go with a deleted study.

    Those that move or delete what they took: a file found there later is a new drop,
    to be taken in again. A ``keep`` folder still holds the very files it took, and
    forgetting them would import the deleted study again at the next start.
    """
    return [w.name for w in settings.watch if w.on_done != "keep"]


def delete_results(job_id: str, results_root: Path, done: SweepResult) -> None:
    """Delete a job's results folder (``<results_root>/<job id>``), if it has one."""
    if not _is_uuid(job_id):
        return
    folder = _inside(results_root / job_id, results_root)
    if folder is None or not folder.is_dir():
        return
    shutil.rmtree(folder, ignore_errors=True)
    done.results += 1


REASON_SUFFIX = ".reason.txt"


def delete_drop_folder_files(folder: Path, cutoff: datetime, done: SweepResult, *,
                             watch: str = "") -> None:
    """Delete the regular files under ``folder`` (a drop folder's ``done/`` or
    ``failed/``) put there before ``cutoff``, then the subfolders left empty (not
    ``folder``); adds them to ``done.dropped``.

    A file's age is the later of its mtime and ctime: the move into ``done/`` is a
    rename, which keeps the dropped file's own mtime (a copy made with ``cp -p`` may be
    years old) and sets its ctime. A ``<name>.reason.txt`` goes with ``<name>`` when
    that is there. ``folder`` itself must not be a link; no link under it is followed or
    deleted (every step goes through a directory descriptor, so a folder swapped for a
    link meanwhile leads nowhere else). A file that cannot be deleted is logged without
    its name (a dropped file may be named after a patient) and tried again next sweep.
    """
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return
    except OSError:  # none yet (nothing was moved there), or the drop folder is gone
        return
    oldest = cutoff.timestamp()
    for _, dirs, files, fd in os.fwalk(folder, topdown=False, follow_symlinks=False):
        ages: dict[str, tuple[float, int]] = {}  # name: (put there, size)
        for name in files:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                ages[name] = (max(st.st_mtime, st.st_ctime), st.st_size)
        for name, (changed, size) in ages.items():
            owner = name.removesuffix(REASON_SUFFIX) if name.endswith(REASON_SUFFIX) else None
            if owner is not None and owner in ages:
                changed = ages[owner][0]  # a refused input's reason stays and goes with it
            if changed >= oldest:
                continue
            try:
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("drop folder file not deleted", watch=watch, folder=folder.name,
                            reason=exc.strerror or type(exc).__name__)
                continue
            done.dropped += 1
            done.dropped_bytes += size
        for name in dirs:  # bottom-up: their own content was dealt with already
            with contextlib.suppress(OSError):  # not empty (or gone): stays
                os.rmdir(name, dir_fd=fd)


def _stopped(stop: threading.Event | None) -> bool:
    return stop is not None and stop.is_set()


def _inside(path: Path, root: Path) -> Path | None:
    """``path`` resolved, if it lies strictly inside ``root``; else None."""
    try:
        resolved = path.resolve()
    except OSError:
        return None
    if resolved == root or not resolved.is_relative_to(root):
        return None
    return resolved


def _prune(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``root`` while empty."""
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone by another hand): stop here
            return
        folder = folder.parent


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False
