"""A retrieval whose instances did not come because the node's own disk is short."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from dicom_node.errors import DeferJob
from dicom_node.retrieve import Progress, Retriever
from tests.support.node import node_settings


def _retriever(tmp_path: Path, reserve_mb: int) -> Retriever:
    retriever = Retriever.__new__(Retriever)  # only the node's settings are read here
    retriever.node = SimpleNamespace(  # type: ignore[assignment]
        settings=node_settings(tmp_path / "data", min_free_mb=reserve_mb))
    return retriever


def test_a_retrieval_cut_short_by_the_nodes_own_disk_waits_for_space(tmp_path: Path) -> None:
    """39 of 80 slices came (the reserve refused the rest): the job segmented half a CT
    and sent its organ volumes to the PACS as a success. It waits for space now."""
    partial = [Progress("1.2.3", state="partial", received=39, failed=41,
                        message="partial (C-MOVE finished with status 0xB000)")]
    with pytest.raises(DeferJob, match=r"short of space .*: 41 instance\(s\) of the "
                                       r"retrieval were not kept"):
        _retriever(tmp_path, 10**9)._wait_for_space(partial)  # never that much free
    # with room on the disk, a partial retrieval is the PACS's doing: it runs as before
    _retriever(tmp_path, 0)._wait_for_space(partial)
    # a disk that filled with the reserve off says so in the message
    full = [Progress("1.2.3", state="partial", received=2, failed=3,
                     message="3 failed: [Errno 28] No space left on device")]
    with pytest.raises(DeferJob):
        _retriever(tmp_path, 0)._wait_for_space(full)
    # everything came: nothing to wait for, however full the disk
    _retriever(tmp_path, 10**9)._wait_for_space([Progress("1.2.3", state="retrieved")])
