"""The free-space reserve: bytes and inodes, on a real small filesystem."""

from __future__ import annotations

from pathlib import Path

from dicom_node.config import Settings, StorageSettings
from dicom_node.disk import MIN_FREE_INODES, disk_health, short_of_space
from tests.support.disk import small_disk


def _settings(data: Path, reserve_mb: int) -> Settings:
    return Settings(storage=StorageSettings(data_dir=data, min_free_mb=reserve_mb))


def test_a_disk_out_of_inodes_is_short_of_space(tmp_path: Path) -> None:
    """A disk of many small instances ran out of inodes with bytes to spare: every
    instance was refused (0xA700) while /health read "ok" and new associations were
    taken."""
    with small_disk(tmp_path / "disk", 40, inodes=MIN_FREE_INODES + 200) as disk:
        data = disk / "data"
        data.mkdir()
        settings = _settings(data, 1)
        assert short_of_space(settings, data) is None
        assert disk_health(settings)["ok"] is True
        files = 0
        while disk_health(settings)["studies_free_inodes"] >= MIN_FREE_INODES:
            (data / f"i{files}").touch()
            files += 1
        why = short_of_space(settings, data)
        assert why is not None and why.endswith(f"inodes (files) free, under {MIN_FREE_INODES}")
        health = disk_health(settings)
        assert health["ok"] is False and health["studies_free_mb"] > 30  # bytes to spare
        # the reserve off (0) turns the whole check off, inodes too
        assert short_of_space(_settings(data, 0), data) is None
        assert disk_health(_settings(data, 0))["ok"] is True
