"""Export routing and passes (folder destinations are real; a failing sender is a real class)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

from dicom_node.config import DestinationSettings, Settings
from dicom_node.export import DICOM_MEDIA_TYPE, Exporter, SendResult
from dicom_node.store import EXPORT_FAILED, EXPORT_RETRYING, EXPORT_SUCCEEDED, ExportRecord
from pipeline.types import Artifact


class FlakySender:
    """Refuses the first ``failures`` attempts, as a PACS that is restarting would."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[list[Path]] = []

    def send(self, dest: DestinationSettings, files: list[Path]) -> SendResult:
        self.calls.append(list(files))
        if len(self.calls) <= self.failures:
            raise ConnectionRefusedError(f"{dest.host}:{dest.port} refused the connection")
        return SendResult(sent=len(files))


def settings(tmp_path: Path) -> Settings:
    return Settings.model_validate({
        "storage": {"data_dir": str(tmp_path)},
        "destinations": [
            {"name": "out", "type": "folder", "path": "exported"},
            {"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1",
             "port": 1, "retry": {"max_attempts": 3, "backoff_s": 0.01}},
        ],
    })


def artifacts(tmp_path: Path) -> list[Artifact]:
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "a.dcm").write_bytes(b"DICM")
    return [Artifact("json", tmp_path / "a.json", "application/json"),
            Artifact("sr", tmp_path / "a.dcm", DICOM_MEDIA_TYPE, "1.2.3")]


def test_folder_gets_every_file_and_dimse_only_dicom(tmp_path: Path) -> None:
    flaky = FlakySender(failures=0)
    ex = Exporter(settings(tmp_path), {"dimse": flaky})
    out = ex.export(["out", "pacs"], artifacts(tmp_path))
    assert [(o.destination, o.ok, o.sent) for o in out] == [("out", True, 2), ("pacs", True, 1)]
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["a.dcm", "a.json"]
    assert flaky.calls == [[tmp_path / "a.dcm"]]


def _record(name: str, state: str, attempts: int) -> ExportRecord:
    return ExportRecord("job", name, state, attempts, 0, None, datetime.now(UTC))


def test_a_pass_tries_each_destination_once_and_asks_for_another_with_backoff(
        tmp_path: Path) -> None:
    """No waiting in a pass: a refused destination's outcome says when to try again
    (its backoff for that attempt), and a later pass counts on from the recorded one."""
    flaky = FlakySender(failures=2)
    ex = Exporter(settings(tmp_path), {"dimse": flaky})
    first = ex.export(["pacs", "out"], artifacts(tmp_path))
    assert [(o.destination, o.ok, o.attempts, o.retry_in_s) for o in first] == [
        ("pacs", False, 1, 0.01), ("out", True, 1, None)]
    assert "refused the connection (attempt 1 of 3)" in (first[0].message or "")
    assert len(flaky.calls) == 1  # once a pass, however many attempts are left
    second = ex.export(["pacs", "out"], artifacts(tmp_path),
                       earlier={"pacs": _record("pacs", EXPORT_RETRYING, 1),
                                "out": _record("out", EXPORT_SUCCEEDED, 1)})
    assert [(o.destination, o.ok, o.attempts, o.retry_in_s, o.recorded) for o in second] == [
        ("out", True, 1, None, True), ("pacs", False, 2, 0.02, False)]
    third = ex.export(["pacs"], artifacts(tmp_path),
                      earlier={"pacs": _record("pacs", EXPORT_RETRYING, 2)})
    assert [(o.ok, o.attempts) for o in third] == [(True, 3)]
    assert len(flaky.calls) == 3


def test_gives_up_with_the_reason(tmp_path: Path) -> None:
    ex = Exporter(settings(tmp_path), {"dimse": FlakySender(failures=99)})
    (o,) = ex.export(["pacs"], artifacts(tmp_path),
                     earlier={"pacs": _record("pacs", EXPORT_RETRYING, 2)})
    assert not o.ok and o.attempts == 3 and o.retry_in_s is None
    assert "refused the connection" in (o.message or "") and "after 3 attempts" in (o.message or "")


def test_a_settled_destination_is_not_sent_to_again(tmp_path: Path) -> None:
    flaky = FlakySender(failures=0)
    ex = Exporter(settings(tmp_path), {"dimse": flaky})
    out = ex.export(["pacs", "out"], artifacts(tmp_path),
                    earlier={"pacs": _record("pacs", EXPORT_SUCCEEDED, 4),
                             "out": _record("out", EXPORT_FAILED, 3)})
    assert [(o.destination, o.ok, o.recorded) for o in out] == [("pacs", True, True),
                                                                ("out", False, True)]
    assert flaky.calls == [] and not (tmp_path / "exported").exists()


def test_a_cancel_stops_the_pass_between_destinations(tmp_path: Path) -> None:
    cancelled = threading.Event()

    class CancellingSender(FlakySender):
        def send(self, dest: DestinationSettings, files: list[Path]) -> SendResult:
            cancelled.set()  # `jobs cancel` while this destination is being sent to
            return super().send(dest, files)

    ex = Exporter(settings(tmp_path), {"dimse": CancellingSender(failures=0)})
    out = ex.export(["pacs", "out"], artifacts(tmp_path), cancelled)
    assert [o.destination for o in out] == ["pacs"]
    assert not (tmp_path / "exported").exists()  # the next destination got nothing


def test_unknown_destination_and_missing_sender(tmp_path: Path) -> None:
    ex = Exporter(settings(tmp_path))
    out = ex.export(["nowhere", "pacs"], artifacts(tmp_path))
    assert [o.ok for o in out] == [False, False]
    assert "no such destination" in (out[0].message or "")


def test_folder_keeps_the_layout_under_base(tmp_path: Path) -> None:
    """Two jobs' results for one patient carry the same file names: under ``base`` each
    keeps its own folder in the destination instead of overwriting the other's."""
    results = tmp_path / "results"
    made: list[Artifact] = []
    for job, body in (("job-1", b"first study"), ("job-2", b"second study")):
        f = results / job / "P1" / "P1_sr.dcm"
        f.parent.mkdir(parents=True)
        f.write_bytes(body)
        made.append(Artifact("sr", f, DICOM_MEDIA_TYPE))
    outside = tmp_path / "elsewhere" / "note.json"
    outside.parent.mkdir()
    outside.write_text("{}")
    made.append(Artifact("json", outside, "application/json"))
    ex = Exporter(settings(tmp_path), base=results)
    (o,) = ex.export(["out"], made)
    assert o.ok and o.sent == 3
    out = tmp_path / "exported"
    assert (out / "job-1" / "P1" / "P1_sr.dcm").read_bytes() == b"first study"
    assert (out / "job-2" / "P1" / "P1_sr.dcm").read_bytes() == b"second study"
    assert (out / "note.json").read_text() == "{}"  # not under base: by its name
    assert not list(out.rglob(".export-*"))  # no temporary file left behind


def test_folder_reports_a_file_it_cannot_place(tmp_path: Path) -> None:
    results = tmp_path / "results"
    f = results / "job-1" / "P1" / "P1_sr.dcm"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"x")
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "job-1").write_text("a file where a folder should be")
    ex = Exporter(settings(tmp_path), base=results)
    (o,) = ex.export(["out"], [Artifact("sr", f, DICOM_MEDIA_TYPE)])
    assert not o.ok and o.sent == 0 and "P1_sr.dcm" in (o.message or "")


def test_each_outcome_is_reported_before_the_next_destination_is_tried(
        tmp_path: Path) -> None:
    """A pass reported its outcomes only when it ended, so a node that died later in the
    pass had no record of the destinations already done."""
    seen: list[str] = []

    class Watching(FlakySender):
        def send(self, dest: DestinationSettings, files: list[Path]) -> SendResult:
            seen.append(f"send {dest.name}")
            return super().send(dest, files)

    ex = Exporter(settings(tmp_path), {"dimse": Watching(failures=1)})
    out = ex.export(["out", "pacs"], artifacts(tmp_path),
                    on_outcome=lambda o: seen.append(f"settled {o.destination} {o.ok}"),
                    on_progress=lambda p: seen.append(f"{p.state} {p.destination}"))
    assert seen == ["pending out", "pending pacs", "sending out", "settled out True",
                    "sending pacs", "send pacs", "settled pacs False"]
    assert [o.destination for o in out] == ["out", "pacs"]


def test_a_destination_a_cancel_cuts_short_is_not_a_failed_attempt(tmp_path: Path) -> None:
    """`jobs cancel` or a stopping node while a destination is sent to: what it took is
    kept as progress (its attempts unchanged), not recorded as an attempt that failed
    (at its last attempt, that failed it for good)."""
    cancelled = threading.Event()
    progress: list[tuple[str, int]] = []

    class CutShort(FlakySender):
        def send(self, dest: DestinationSettings, files: list[Path]) -> SendResult:
            cancelled.set()
            return SendResult(failed=[(files[0], "cancelled")])

    ex = Exporter(settings(tmp_path), {"dimse": CutShort(failures=0)})
    out = ex.export(["pacs", "out"], artifacts(tmp_path), cancelled,
                    earlier={"pacs": _record("pacs", EXPORT_RETRYING, 2)},
                    on_progress=lambda p: progress.append((p.state, p.attempts)))
    assert out == []  # no outcome for it, and the next destination was not tried
    assert progress == [("pending", 0), ("sending", 2), ("retrying", 2)]
    assert not (tmp_path / "exported").exists()


def test_each_acknowledgement_is_recorded_as_it_comes() -> None:
    """In batches, the last answers waited for the next one to be recorded: while the
    next object waited on a slow peer (when a crash is likely) they were in memory only,
    and were sent again after a restart."""
    from dicom_node.export import _Progress
    from dicom_node.scheduler import ExportProgress

    seen: list[ExportProgress] = []
    progress = _Progress("slow", 0, frozenset({"1.1"}), seen.append)
    progress.acknowledged("1.2")
    progress.acknowledged("1.3")
    assert [(p.state, p.sent, sorted(p.acknowledged)) for p in seen] == [
        ("sending", 2, ["1.1", "1.2"]), ("sending", 3, ["1.1", "1.2", "1.3"])]
