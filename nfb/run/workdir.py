"""The work directory beside an output: fingerprint, checkpoint parts, resume.

`OUT.nfb/` holds `state.json` (fingerprint and settings of the run), `part-*.parquet` files
of finished rows, and the marker `.nfb-workdir`, which says nfb made the folder: nfb never
deletes a folder without it (a user's own `OUT.nfb` is refused, never removed), and a damaged
`state.json` stops the run with one line instead of discarding the checkpoint. A run with the
same fingerprint picks up where the parts end; a run with another fingerprint is refused
unless it asks to overwrite, or unless the directory holds no finished part (a failed start:
nothing would be lost), which is replaced.

Safe against a kill at any instant: a new directory is made whole under a temporary name
and renamed into place; the output is renamed into place first (the commit point), then the
work directory is renamed away (`.OUT.nfb.trash-PID`, atomic) and only then deleted, its
marker last. A half-deleted work directory is therefore never taken for a run to resume;
leftover trash is deleted by the next `open`/`remove`.

The caller holds the output's lock (`nfb.io.outputs.OutputLock`) while it uses the work
directory, so no two processes ever write one.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from nfb.io.outputs import temp_path

STATE = "state.json"
ENGINE_FILE = "engine.json"   # the pipeline's record of a running engine's processes
MARKER = ".nfb-workdir"       # nfb made this folder (and may delete it)
MARKER_TEXT = (b"This folder is an nfb work directory (the checkpoint of an unfinished run). "
               b"nfb deletes it when the run finishes.\n")


from nfb.errors import ResumeError  # noqa: E402,F401


def workdir_for(output: str) -> Path:
    from nfb.io import storage

    if storage.is_url(output):   # a store output's work stays local (see nfb.io.storage)
        return storage.local_home(output) / (os.path.basename(output) + ".nfb")
    p = Path(os.path.realpath(output)) if os.path.islink(output) else Path(output)
    return p.with_name(p.name + ".nfb")


def _owned(path: Path) -> bool:
    """Whether nfb made `path`: its marker, or (nfb 0.x before the marker) a state.json that
    nfb wrote."""
    if not path.is_dir() or path.is_symlink():
        return False
    if (path / MARKER).is_file():
        return True
    try:
        old = orjson.loads((path / STATE).read_bytes())
        return isinstance(old, dict) and "fingerprint" in old and "started" in old
    except (OSError, ValueError):
        return False


def _rmtree_marker_last(path: Path) -> None:
    """Delete a folder nfb made, its marker last: a kill midway leaves a folder still
    marked as nfb's, which the next run deletes."""
    try:
        children = list(path.iterdir())
    except OSError:
        return
    for c in children:
        if c.name == MARKER:
            continue
        if c.is_dir() and not c.is_symlink():
            shutil.rmtree(c, ignore_errors=True)
        else:
            try:
                c.unlink()
            except OSError:
                pass
    try:
        (path / MARKER).unlink(missing_ok=True)
        path.rmdir()
    except OSError:
        pass


class WorkDir:
    def __init__(self, output: str):
        self.path = workdir_for(output)
        self.output = output

    @property
    def exists(self) -> bool:
        return (self.path / STATE).exists()

    @property
    def owned(self) -> bool:
        return _owned(self.path)

    def state(self) -> dict | None:
        try:
            return orjson.loads((self.path / STATE).read_bytes())
        except (OSError, ValueError):
            return None

    def _read_state(self) -> tuple[dict | None, str | None]:
        """(state, None); (None, None) when there is none; (None, why) when damaged."""
        try:
            raw = (self.path / STATE).read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError as e:
            return None, e.strerror or str(e)
        try:
            old = orjson.loads(raw)
        except ValueError:
            return None, "not valid JSON"
        if not isinstance(old, dict) or not isinstance(old.get("fingerprint"), str):
            return None, "no fingerprint in it"
        return old, None

    def open(self, fingerprint: str, state: dict, overwrite: bool,
             describe=None) -> None:
        """Start or resume: create the directory, or check that it is this run's.

        Replaced (not refused) when `overwrite`, or when it holds no finished part. The
        record of a leftover engine survives a replacement. A folder nfb did not make is
        refused (never deleted), and so is a damaged state.json (unless `overwrite`).
        `describe(old_state)` says why another run's fingerprint differs (default: "other
        settings")."""
        self.remove_trash()
        if self.path.exists() or self.path.is_symlink():
            if not self.owned:
                raise ResumeError(
                    f"{self.path} exists and was not made by nfb (no {MARKER} marker in it); "
                    "nfb keeps a run's checkpoint there and never deletes a folder it did not "
                    "make: move it away, or choose another output")
            old, damaged = self._read_state()
            if damaged and not overwrite:
                raise ResumeError(
                    f"{self.path / STATE} is damaged ({damaged}), so the unfinished run in "
                    f"{self.path} cannot be resumed; add --overwrite to discard it and start "
                    f"over, or delete {self.path}")
            same = old is not None and old.get("fingerprint") == fingerprint
            if not overwrite and old is not None and not same and self.parts():
                why = describe(old) if describe else None
                raise ResumeError(
                    f"{self.path} holds an unfinished run "
                    f"{why or 'with other settings'} "
                    f"(model {old.get('model')!r}, started {old.get('started')}). Run that "
                    "command again to finish it, or add --overwrite to start this one over.")
            if same and not overwrite:
                if not (self.path / MARKER).exists():   # made by an nfb before the marker
                    (self.path / MARKER).write_bytes(MARKER_TEXT)
                return
            self._create(fingerprint, state, engine=self._read_engine_file())
            return
        self._create(fingerprint, state, engine=None)

    def _create(self, fingerprint: str, state: dict, engine: bytes | None) -> None:
        """Make the directory whole under a temporary name, then rename it into place
        (replacing the old one, which is first renamed away and deleted)."""
        new = self.path.with_name(f".{self.path.name}.new-{os.getpid()}-"
                                  f"{secrets.token_hex(4)}")
        new.mkdir(parents=True)
        try:
            (new / MARKER).write_bytes(MARKER_TEXT)
            (new / STATE).write_bytes(orjson.dumps({"fingerprint": fingerprint, **state},
                                                   option=orjson.OPT_INDENT_2))
            if engine is not None:
                (new / ENGINE_FILE).write_bytes(engine)
            self.remove(keep=new)
            os.replace(new, self.path)
        except BaseException:
            _rmtree_marker_last(new)
            raise

    def parts(self) -> list[Path]:
        """Finished parts in row order (temporary files of an interrupted write are ignored)."""
        return sorted(self.path.glob("part-*.parquet"))

    def part_rows(self, row_column: str) -> list[tuple[Path, np.ndarray]]:
        """Each finished part with its row numbers."""
        return [(p, pq.read_table(p, columns=[row_column]).column(0).to_numpy())
                for p in self.parts()]

    def drop_damaged_parts(self, row_column: str) -> list[str]:
        """Delete parts whose footer or row numbers cannot be read (a lost part costs only
        its rows, which the run does again); returns their names."""
        dropped = []
        for p in self.parts():
            try:
                pf = pq.ParquetFile(p)
                rows = pf.read(columns=[row_column]).column(0)
                if len(rows) != pf.metadata.num_rows or rows.null_count:
                    raise ValueError("row numbers missing")
            except (OSError, ValueError, KeyError, pa.ArrowException):
                p.unlink(missing_ok=True)
                dropped.append(p.name)
        return dropped

    def done_rows(self, row_column: str) -> np.ndarray:
        """A boolean mask: done[r] is True when row r is in a finished part."""
        rows = [r for _, r in self.part_rows(row_column)]
        if not rows:
            return np.zeros(0, dtype=bool)
        allrows = np.concatenate(rows)
        done = np.zeros(int(allrows.max()) + 1 if len(allrows) else 0, dtype=bool)
        done[allrows] = True
        return done

    def clean_temporaries(self) -> None:
        for pattern in (".*.tmp", ".*.tmp-*"):
            for p in self.path.glob(pattern):
                p.unlink(missing_ok=True)

    def record_engine(self, pids: list[tuple[int, float]]) -> None:
        """Record the running engine's processes (pid, start time), for a later run to stop
        them if this one is killed."""
        tmp = temp_path(self.path / ENGINE_FILE)
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
        return sorted([*self.path.parent.glob(f".{self.path.name}.trash-*"),
                       *self.path.parent.glob(f".{self.path.name}.new-*")])

    def remove_trash(self, keep: Path | None = None) -> None:
        """Delete what an earlier, killed `remove` or `open` left behind (only folders nfb
        marked as its own)."""
        for p in self._trash():
            if p != keep and _owned(p):
                _rmtree_marker_last(p)

    def remove(self, keep: Path | None = None) -> None:
        """Remove the directory, if nfb made it: first renamed away in one atomic step, then
        deleted. A folder nfb did not make is left alone."""
        if self.path.exists() and self.owned:
            trash = self.path.with_name(f".{self.path.name}.trash-{os.getpid()}")
            if _owned(trash):
                _rmtree_marker_last(trash)
            try:
                os.replace(self.path, trash)
            except OSError:
                _rmtree_marker_last(self.path)
        self.remove_trash(keep)
        from nfb.io import storage
        if storage.is_url(self.output):
            storage.tidy_home(self.output)
