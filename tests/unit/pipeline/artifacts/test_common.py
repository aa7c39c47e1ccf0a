from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.artifacts import validate_patient_id
from pipeline.artifacts._common import (
    PRIVATE_SCHEME,
    concept_for_name,
    patient_dir,
    person_name,
)


@pytest.mark.parametrize("pid", ["PAT001", "12345", "Müller-01", "a.b_c", "A B"])
def test_valid_patient_ids(pid: str) -> None:
    assert validate_patient_id(pid) == pid


@pytest.mark.parametrize(
    "pid",
    [
        "",
        "   ",
        ".",
        "..",
        "../etc",
        "a/b",
        "a\\b",
        "a..b",
        "x\x00y",
        "x\ny",
        "x\ty",
        "C:",
        "a*b",
        " lead",
        "trail ",
    ],
)
def test_invalid_patient_ids_raise_naming_the_value(pid: str) -> None:
    with pytest.raises(ValueError, match="Invalid patient_id") as info:
        validate_patient_id(pid)
    assert repr(pid) in str(info.value)


def test_patient_dir_creates_folder(tmp_path: Path) -> None:
    folder = patient_dir(tmp_path, "PAT001")
    assert folder == tmp_path / "PAT001" and folder.is_dir()
    with pytest.raises(ValueError):
        patient_dir(tmp_path, "../escape")
    assert not (tmp_path.parent / "escape").exists()


def test_concept_for_name_uses_snomed_when_known() -> None:
    code = concept_for_name("Pleural Effusion")
    assert (code.scheme_designator, code.value) == ("SCT", "60046008")
    assert concept_for_name("liver").value == "10200004"


def test_concept_for_name_falls_back_to_private_scheme() -> None:
    code = concept_for_name("Pleural Thickening")
    assert code.scheme_designator == PRIVATE_SCHEME
    assert code.meaning == "Pleural Thickening"
    long = concept_for_name("A very long structure name that exceeds sixteen")
    assert len(long.value) <= 16
    assert long != concept_for_name("A very long structure name that exceeds sixteen!")


@pytest.mark.parametrize(
    ("pn", "expected"),
    [
        ("Doe^John", "John Doe"),
        ("Doe^John^Q^Dr^Jr", "Dr John Q Doe Jr"),
        ("John Doe", "John Doe"),
        ("", ""),
        ("Yamada^Tarou=山田^太郎", "Tarou Yamada"),
    ],
)
def test_person_name(pn: str, expected: str) -> None:
    assert person_name(pn) == expected


def test_atomic_path_gives_concurrent_writers_their_own_temp_files(tmp_path: Path) -> None:
    import threading

    from pipeline.artifacts._common import atomic_path

    target = tmp_path / "p_predictions.json"
    barrier = threading.Barrier(8)
    temps: list[Path] = []

    def write(i: int) -> None:
        with atomic_path(target) as tmp:
            temps.append(tmp)
            tmp.write_text(str(i) * 1000)
            barrier.wait()  # every writer holds its temp file open at once
    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(temps)) == 8
    body = target.read_text()
    assert len(body) == 1000 and len(set(body)) == 1  # one writer's whole file, not a mix
    assert [p.name for p in tmp_path.iterdir()] == ["p_predictions.json"]
