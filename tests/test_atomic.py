"""atomic_write: readers see the old file or the new one, never half of one."""

import pytest

from odis_core.atomic import atomic_write


def test_success_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write("new")
        assert path.read_text() == "old"  # not visible before the rename
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_an_error_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"last good")
    with pytest.raises(RuntimeError), atomic_write(path) as handle:
        handle.write(b"half")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"last good"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
