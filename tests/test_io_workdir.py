"""The work directory: failed starts never block, removal is atomic."""

from __future__ import annotations

import pyarrow as pa
import pytest

from nfb.errors import ResumeError
from nfb.io.writers import atomic_parquet
from nfb.run.workdir import ENGINE_FILE, WorkDir


def test_a_workdir_without_finished_parts_is_replaced_by_other_settings(tmp_path):
    wd = WorkDir(str(tmp_path / "out.parquet"))
    wd.open("fp-A", {"model": "a"}, overwrite=False)
    (wd.path / ENGINE_FILE).write_bytes(b'{"pids": []}')   # a failed start's record
    wd.open("fp-B", {"model": "b"}, overwrite=False)       # the corrected command
    assert wd.state()["fingerprint"] == "fp-B"
    assert (wd.path / ENGINE_FILE).read_bytes() == b'{"pids": []}'


def test_a_workdir_with_finished_parts_is_kept_and_refused(tmp_path):
    wd = WorkDir(str(tmp_path / "out.parquet"))
    wd.open("fp-A", {"model": "a"}, overwrite=False)
    atomic_parquet(pa.table({"nfb_row": [0, 1]}), wd.path / "part-000000000000.parquet")
    with pytest.raises(ResumeError, match="other settings"):
        wd.open("fp-B", {"model": "b"}, overwrite=False)
    wd.open("fp-A", {"model": "a"}, overwrite=False)       # the same command resumes
    assert list(wd.done_rows("nfb_row")) == [True, True]


def test_remove_is_atomic_and_leftovers_are_cleaned(tmp_path):
    wd = WorkDir(str(tmp_path / "out.parquet"))
    wd.open("fp-A", {}, overwrite=False)
    atomic_parquet(pa.table({"nfb_row": [0]}), wd.path / "part-000000000000.parquet")
    # a kill in the middle of deleting: the trash is half gone, the work dir is gone
    trash = wd.path.with_name(f".{wd.path.name}.trash-123")
    wd.path.rename(trash)
    assert not wd.exists and wd.state() is None
    wd.open("fp-A", {}, overwrite=False)                    # a fresh start, trash removed
    assert not trash.exists() and wd.parts() == []
    wd.remove()
    assert not wd.path.exists()
    assert list(tmp_path.iterdir()) == []
