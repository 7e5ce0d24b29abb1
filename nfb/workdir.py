"""The work directory beside an output: fingerprint, checkpoint parts, resume.

`OUT.nfb/` holds `state.json` (fingerprint and settings of the run) and `part-*.parquet`
files of finished rows. A run with the same fingerprint picks up where the parts end; a run
with another fingerprint is refused unless it asks to overwrite, or unless the directory
holds no finished part (a failed start: nothing would be lost), which is replaced.

Safe against a kill at any instant: the output is renamed into place first (the commit
point), then the work directory is renamed away (`.OUT.nfb.trash-PID`, atomic) and only
then deleted. A half-deleted work directory is therefore never taken for a run to resume;
leftover trash is deleted by the next `open`/`remove`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq

STATE = "state.json"
ENGINE_FILE = "engine.json"   # the pipeline's record of a running engine's processes


from nfb.errors import ResumeError  # noqa: E402,F401


def workdir_for(output: str) -> Path:
    from nfb.io import storage

    if storage.is_url(output):   # a store output's work stays local (see nfb.io.storage)
        return storage.local_home(output) / (os.path.basename(output) + ".nfb")
    p = Path(output)
    return p.with_name(p.name + ".nfb")


class WorkDir:
    def __init__(self, output: str):
        self.path = workdir_for(output)
        self.output = output

    @property
    def exists(self) -> bool:
        return (self.path / STATE).exists()

    def state(self) -> dict | None:
        try:
            return orjson.loads((self.path / STATE).read_bytes())
        except (OSError, ValueError):
            return None

    def open(self, fingerprint: str, state: dict, overwrite: bool) -> None:
        """Start or resume: create the directory, or check that it is this run's.

        Replaced (not refused) when `overwrite`, when it has no readable state, or when it
        holds no finished part. The record of a leftover engine survives a replacement."""
        self.remove_trash()
        if self.path.exists():
            old = self.state()
            if overwrite or old is None or (old.get("fingerprint") != fingerprint
                                            and not self.parts()):
                engine = self._read_engine_file()
                self.remove()
                self.path.mkdir(parents=True, exist_ok=True)
                if engine is not None:
                    (self.path / ENGINE_FILE).write_bytes(engine)
            elif old.get("fingerprint") != fingerprint:
                raise ResumeError(
                    f"{self.path} holds an unfinished run with other settings "
                    f"(model {old.get('model')!r}, started {old.get('started')}). Run that "
                    "command again to finish it, or add --overwrite to start this one over.")
            else:
                return
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{STATE}.tmp"
        tmp.write_bytes(orjson.dumps({"fingerprint": fingerprint, **state},
                                     option=orjson.OPT_INDENT_2))
        os.replace(tmp, self.path / STATE)

    def parts(self) -> list[Path]:
        """Finished parts in row order (temporary files of an interrupted write are ignored)."""
        return sorted(self.path.glob("part-*.parquet"))

    def done_rows(self, row_column: str) -> np.ndarray:
        """A boolean mask: done[r] is True when row r is in a finished part."""
        rows = [pq.read_table(p, columns=[row_column]).column(0).to_numpy()
                for p in self.parts()]
        if not rows:
            return np.zeros(0, dtype=bool)
        allrows = np.concatenate(rows)
        done = np.zeros(int(allrows.max()) + 1 if len(allrows) else 0, dtype=bool)
        done[allrows] = True
        return done

    def clean_temporaries(self) -> None:
        for p in self.path.glob(".*.tmp"):
            p.unlink(missing_ok=True)

    def record_engine(self, pids: list[tuple[int, float]]) -> None:
        """Record the running engine's processes (pid, start time), for a later run to stop
        them if this one is killed."""
        tmp = self.path / f".{ENGINE_FILE}.tmp"
        tmp.write_bytes(orjson.dumps({"pids": pids}))
        os.replace(tmp, self.path / ENGINE_FILE)

    def engine_pids(self) -> list[tuple[int, float]]:
        """The processes a killed run recorded (empty when none or unreadable)."""
        raw = self._read_engine_file()
        try:
            pids = orjson.loads(raw).get("pids") or [] if raw else []
            return [(int(p), float(t)) for p, t in pids]
        except (ValueError, TypeError, AttributeError):
            return []

    def forget_engine(self) -> None:
        (self.path / ENGINE_FILE).unlink(missing_ok=True)

    def _read_engine_file(self) -> bytes | None:
        try:
            return (self.path / ENGINE_FILE).read_bytes()
        except OSError:
            return None

    def _trash(self) -> list[Path]:
        return sorted(self.path.parent.glob(f".{self.path.name}.trash-*"))

    def remove_trash(self) -> None:
        """Delete what an earlier, killed `remove` left behind."""
        for p in self._trash():
            shutil.rmtree(p, ignore_errors=True)

    def remove(self) -> None:
        """Remove the directory: first renamed away in one atomic step, then deleted."""
        if self.path.exists():
            trash = self.path.with_name(f".{self.path.name}.trash-{os.getpid()}")
            shutil.rmtree(trash, ignore_errors=True)
            try:
                os.replace(self.path, trash)
            except OSError:
                shutil.rmtree(self.path, ignore_errors=True)
        self.remove_trash()
        from nfb.io import storage
        if storage.is_url(self.output):
            storage.tidy_home(self.output)
