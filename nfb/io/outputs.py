"""Output safety: one process per output, temporary names of one process, never over an input.

- `OutputLock(output)`: an advisory lock (`fcntl.flock`) on `.NAME.nfb-lock` beside the
  output, held for the whole run or verb. A second nfb process on the same output is refused
  at once with one line naming the holder's pid and command (`OutputBusy`, exit 2). The lock
  dies with its process (a kill leaves no stale lock); the file is removed on release.
- `temp_path(path)`: `.NAME.tmp-PID-RANDOM` beside `path`: two processes (or two writes of
  one) never share a temporary file.
- `check_not_input(output, inputs)`: an output may never be (or replace) an input, with or
  without --overwrite (paths resolved: symlinks, `./a` and `a`, hard links).
- `guarded(output, inputs)`: the three together for a verb's output; an OSError while
  writing (disk full, read-only folder) becomes one line (`OutputError`, exit 1), and the
  old output, if any, is left as it was.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shlex
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson

from nfb.errors import OutputBusy, OutputError, UsageError

STDOUT = "-"
LOCK_SUFFIX = ".nfb-lock"


def temp_path(path: str | os.PathLike) -> Path:
    """A temporary name beside `path`, unique to this process and call."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _url(path: str | os.PathLike) -> bool:
    from nfb.io.storage import is_url

    return is_url(path)


def local_stand_in(output: str | os.PathLike) -> Path:
    """Where this machine keeps what belongs beside `output`: the output itself, or for a
    store URL the same name in the URL's local work home (a lock or a temporary file never
    goes to the store)."""
    if _url(output):
        from nfb.io.storage import local_home

        return local_home(str(output)) / os.path.basename(str(output).rstrip("/"))
    if os.path.islink(output):   # one output, whatever name it is reached by
        return Path(os.path.realpath(output))
    return Path(output)


def lock_path(output: str | os.PathLike) -> Path:
    p = local_stand_in(output)
    return p.with_name(f".{p.name}{LOCK_SUFFIX}")


def describe(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _holder_text(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0)
        who = orjson.loads(raw) if raw else {}
        pid, cmd = who.get("pid"), who.get("command")
    except (OSError, ValueError, AttributeError):
        return "another nfb process"
    if not pid:
        return "another nfb process"
    return f"nfb process {pid}" + (f" ({cmd})" if cmd else "")


class OutputLock:
    """An advisory lock on one output (see the module's docstring)."""

    def __init__(self, output: str | os.PathLike):
        self.output = str(output)
        self.path = lock_path(output)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        for _ in range(100):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise UsageError(f"{self.output}: cannot write there ({describe(e)}); choose "
                                 "another output, or a folder you can write to") from None
            try:
                import fcntl
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_text(fd)
                os.close(fd)
                raise OutputBusy(f"{self.output} is being written by {holder}; wait for it to "
                                 "finish, or choose another output") from None
            except (OSError, ImportError):   # no locks here (some network file systems)
                pass
            try:   # the holder we waited for may have removed the file: lock the live one
                if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            try:
                cmd = shlex.join(sys.argv)[:300]
                os.ftruncate(fd, 0)
                os.pwrite(fd, orjson.dumps({"pid": os.getpid(), "command": cmd}), 0)
            except OSError:
                pass
            self._fd = fd
            return self
        raise OutputBusy(f"{self.output}: its lock file keeps changing; is another nfb "
                         "process starting on it?")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clean_stale_temps(output: str | os.PathLike) -> None:
    """Remove temporary files of `output` (and its sidecar) left by killed writers; call it
    only while holding the output's lock."""
    p = local_stand_in(output)
    pattern = re.compile(rf"^\.{re.escape(p.name)}(\.nfb\.json)?\.tmp(-\d+-[0-9a-f]{{8}})?$")
    try:
        names = os.listdir(p.parent if str(p.parent) else ".")
    except OSError:
        return
    for name in names:
        if pattern.match(name):
            try:
                (p.parent / name).unlink()
            except OSError:
                pass


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    if _url(a) or _url(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` is `folder` or lies under it (paths resolved)."""
    if _url(path) or _url(folder):
        p, f = str(path).rstrip("/"), str(folder).rstrip("/")
        return p == f or p.startswith(f + "/")
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def check_not_input(output: str, inputs: Iterable[str], what: str = "an input") -> None:
    """Refuse (exit 2) an output that is one of `inputs`, whatever --overwrite says."""
    if output == STDOUT:
        return
    for f in inputs:
        if f != STDOUT and same_file(f, output):
            raise UsageError(f"the output {output} is also {what} ({f}); nfb never writes "
                             "over its input: choose another output")


def check_not_source(output: str | os.PathLike, sources: dict[str, str | os.PathLike]) -> None:
    """Refuse (exit 2) an output directory that is a source, or holds one (replacing it
    would delete the source), whatever --overwrite says. `sources`: what -> path; paths
    that do not exist (a hub id) are skipped."""
    for what, src in sources.items():
        if src is None or not os.path.exists(src):
            continue
        if inside(src, output):
            raise UsageError(f"the output {os.fspath(output)} is {what} or holds it "
                             f"({os.fspath(src)}); nfb never writes over its source: choose "
                             "another output")


@contextmanager
def guarded(output: str, inputs: Iterable[str] = ()) -> Iterator[None]:
    """A verb's output: never an input, locked while written, a failed write one line."""
    output = os.fspath(output)
    check_not_input(output, inputs)
    if output == STDOUT:
        yield
        return
    with OutputLock(output):
        clean_stale_temps(output)
        try:
            yield
        except OSError as e:
            raise write_error(e, output) from None


def _writing(path: str, output: str) -> bool:
    """Whether a failed operation on `path` was a write of `output` (beside it, or in its
    work directory), not a read of an input."""
    here = os.path.dirname(os.path.realpath(output))
    p = os.path.realpath(path)
    parent = os.path.dirname(p)
    return parent == here or inside(p, os.path.realpath(output) + ".nfb") \
        or inside(p, output) or (os.path.dirname(parent) == here and os.path.basename(
            parent).startswith(f".{os.path.basename(output)}."))   # a temporary folder


def write_error(e: OSError, output: str, saved: str = "") -> OutputError:
    """One line for a failed write (or read): what failed and what to do next."""
    where = os.fsdecode(e.filename) if e.filename else output
    if e.filename and not _writing(where, output):
        return OutputError(f"{where}: {describe(e)}{saved}")
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free some space and run the same command again"
    else:
        hint = "choose another output, or a folder you can write to"
    return OutputError(f"cannot write {where}: {describe(e)}{saved}; {hint}")
