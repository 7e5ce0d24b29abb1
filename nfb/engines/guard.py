"""No orphan engine: a small guardian process kills the engine's processes if nfb dies.

vLLM runs its engine core (and, with tensor parallelism, its workers) in child processes.
When nfb is killed with SIGKILL (the OOM killer, a watchdog, `kill -9`), nothing in nfb runs
any more, and those children are re-parented to init and keep their memory (on a GPU, 90% of
it), so the resume that nfb promises would fail. Linux's parent-death signal only helps for
the direct child and cannot be set from outside vLLM's spawned processes, so nfb starts this
guardian in its own session (a group kill does not reach it) and tells it the pid and start
time of every engine process. The guardian waits on its stdin: at EOF without a "release"
line, nfb is gone, and it kills each recorded process that is still the same process (pid and
start time match), children first.

The second line of defence is `engine.json` in the work directory (see
`nfb.run.pipeline.stop_leftover_engine`): the next run of the same command stops a leftover engine
of a killed run before it loads (only the user's own vLLM/nfb processes: `kill_processes`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time


def _same(pid: int, create_time: float):
    import psutil

    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - create_time) < 0.01:
            return p
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    return None


# what an engine process's command line holds: vLLM's process titles (VLLM::EngineCore,
# VLLM::Worker), Python's multiprocessing children, torch's compile workers, Ray's workers,
# and nfb itself (a forked engine keeps nfb's command line)
_ENGINE_WORDS = re.compile(r"vllm|multiprocessing[.-](spawn|fork|resource_tracker)|"
                           r"compile_worker|\bray::|/ray/|(^|[\s/])nfb(\s|$)|-m\s+nfb\b",
                           re.IGNORECASE)


def is_engine_process(p) -> bool:
    """Whether `p` (a psutil.Process) belongs to the current user and its command line is
    vLLM's, nfb's or one of their helpers' (never, say, an unrelated `sleep`)."""
    import psutil

    try:
        if p.uids().real != os.getuid():
            return False
        cmd = " ".join(p.cmdline()) or p.name()
    except (psutil.Error, OSError, AttributeError):
        return False
    return bool(_ENGINE_WORDS.search(cmd))


def kill_processes(records: list[tuple[int, float]], grace: float = 2.0,
                   verify: bool = True) -> int:
    """Kill the processes (and their children) whose pid and start time still match.

    With `verify` (a record read from a file, such as `engine.json`, which anyone who can
    write the work directory can forge), only processes of the current user whose command
    line is an engine's are killed, each child checked on its own. The guardian, whose
    records come from nfb over a pipe, kills what nfb told it."""
    import psutil

    procs = []
    for pid, ctime in records:
        p = _same(pid, ctime)
        if p is None or p.pid in (os.getpid(), os.getppid()):
            continue
        if verify and not is_engine_process(p):
            continue
        try:
            kids = p.children(recursive=True)
        except psutil.Error:
            kids = []
        procs.extend(k for k in kids if not verify or is_engine_process(k))
        procs.append(p)
    seen = {}
    for p in procs:
        seen[p.pid] = p
    procs = list(seen.values())
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)
    return len(procs)


class Guardian:
    """The parent's handle on the guardian process."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nfb.engines.guard"], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            close_fds=True)
        self.records: dict[int, float] = {}

    def add(self, pid: int, create_time: float) -> None:
        if pid in self.records or self.proc.stdin is None:
            return
        self.records[pid] = create_time
        try:
            self.proc.stdin.write(f"{pid} {create_time!r}\n".encode())
            self.proc.stdin.flush()
        except (OSError, ValueError):   # released meanwhile
            pass

    def release(self) -> None:
        """nfb shut the engine down itself: the guardian exits without killing anything."""
        if self.proc.stdin is None:
            return
        try:
            self.proc.stdin.write(b"release\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.stdin = None
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def snapshot_children(since: float, exclude: set[int] = frozenset()
                      ) -> list[tuple[int, float]]:
    """(pid, start time) of this process's descendants started at or after `since`, except
    `exclude` (the children that existed before the engine started)."""
    import psutil

    out = []
    try:
        for c in psutil.Process().children(recursive=True):
            if c.pid in exclude:
                continue
            try:
                ct = c.create_time()
            except psutil.Error:
                continue
            if ct >= since - 1.0:
                out.append((c.pid, ct))
    except psutil.Error:
        pass
    return out


def main() -> None:
    """Collect records from stdin; kill them when nfb is gone. nfb is gone when stdin ends
    without "release", or when this process's parent changes: vLLM forks its engine on GPUs,
    and a forked engine holds a copy of the pipe's write end, so EOF alone never comes."""
    import threading

    parent = os.getppid()
    records: list[tuple[int, float]] = []
    released = threading.Event()
    ended = threading.Event()

    def read() -> None:
        for line in sys.stdin.buffer:
            line = line.strip()
            if line == b"release":
                released.set()
                return
            try:
                pid, ctime = line.split()
                records.append((int(pid), float(ctime)))
            except ValueError:
                continue
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    while not released.is_set():
        if ended.is_set() or os.getppid() != parent:
            time.sleep(0.2)
            if released.is_set():
                return
            kill_processes(list(records), verify=False)
            return
        time.sleep(0.25)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    main()
