"""Data parallel on one node: N engine replicas, each a process with devices of its own.

vLLM's offline `LLM` refuses `data_parallel_size > 1`; its own answer (the data-parallel
offline example) is one process per replica, each with its own `CUDA_VISIBLE_DEVICES`. A
`ReplicaSet` does that behind the Engine protocol, so the pipeline stays as it is: one reader
and tokenizer pool feed it, the collector puts results in input order.

- Each replica is a child process (multiprocessing "spawn") that starts one engine (by
  default `VLLMEngine`; any "module:callable" factory) with its own devices: a group of
  `-tp` GPUs (`CUDA_VISIBLE_DEVICES`), or on a CPU its own cores
  (`VLLM_CPU_OMP_THREADS_BIND`, e.g. "0|1" split into "0" and "1").
- Requests travel as token ids over a pipe, results come back as texts or head values; the
  messages are nfb's own (ints, strings, floats), nothing else is unpickled.
- A request goes to the replica with the fewest outstanding tokens (prompt plus the output
  budget), not round robin, and each replica holds at most `--max-in-flight` requests, so a
  slow replica gets less and the tail does not wait on one replica holding most rows. The
  requests of one row (keys equal but for their last element: several responses) go to one
  replica, whose prefix cache then serves their shared prompt.
- Faults: a replica that dies (its engine killed, stalled, or the replica process itself)
  has its unfinished requests queued again; with `--engine-restarts` that replica restarts
  while the others go on, without it the stream raises `EngineDied` (the pipeline saves the
  finished rows and stops in one line). A replica that cannot load stops the start in one
  line before any row is scored. nfb's guardian records every replica's processes, and each
  replica dies with nfb (parent-death signal; its own engine's guardian then cleans up).
"""

from __future__ import annotations

import glob
import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from nfb.config import EngineConfig, SamplingConfig
from nfb.engines.base import Engine, Request
from nfb.errors import EngineDied, ModelError, UsageError

DEFAULT_REPLICA = "nfb.engines.vllm:VLLMEngine"
ENV_INDEX = "NFB_REPLICA"            # set in each replica: its index (0-based)


# --- devices: how many replicas, and the environment of each --------------------------------

def _cpu_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return list(range(os.cpu_count() or 1))


def _span(cores: list[int]) -> str:
    if cores == list(range(cores[0], cores[-1] + 1)) and len(cores) > 1:
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def _has_nvidia() -> bool:
    """Cheap: no NVIDIA device node means no GPU (vLLM's platform probe costs seconds)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def visible_gpus() -> list[str] | None:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES entries), or None on a CPU."""
    if not _has_nvidia():
        return None
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return None
    count = current_platform.device_count()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [x.strip() for x in env.split(",") if x.strip()][:count]
    return [str(i) for i in range(count)]


def plan_replicas(requested: int | None, tp: int, gpus: list[str] | None,
                  cores: list[int], bind: str | None) -> list[dict[str, str]]:
    """The environment of each replica (its length is the replica count).

    `requested` None is `auto`: on GPUs as many replicas as the visible GPUs hold at `tp`,
    on a CPU one. One replica changes nothing (the engine runs as without -dp). A request
    for more devices than are visible is a UsageError (exit 2, before anything loads).
    """
    if gpus is not None:
        n = requested or max(1, len(gpus) // tp)
        if n == 1:
            return [{}]
        if n * tp > len(gpus):
            raise UsageError(
                f"--data-parallel {n} with -tp {tp} needs {n * tp} GPUs, but {len(gpus)} "
                f"{'is' if len(gpus) == 1 else 'are'} visible: lower --data-parallel (or "
                "leave it at auto)")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * tp:(i + 1) * tp])}
                for i in range(n)]
    n = requested or 1
    if n == 1:
        return [{}]
    workers = n * tp
    if bind and bind not in ("auto", "nobind"):
        groups = [g.strip() for g in bind.split("|")]
        if len(groups) != workers:
            raise UsageError(
                f"VLLM_CPU_OMP_THREADS_BIND={bind!r} names {len(groups)} core list(s); "
                f"--data-parallel {n} with -tp {tp} needs {workers}, one per worker "
                "(separated by '|')")
    elif bind == "nobind":
        return [{"VLLM_CPU_OMP_THREADS_BIND": "nobind"} for _ in range(n)]
    else:
        if workers > len(cores):
            raise UsageError(
                f"--data-parallel {n} with -tp {tp} needs {workers} CPU cores (each replica's "
                f"workers bind cores of their own), but this machine has {len(cores)}: lower "
                "--data-parallel")
        per = len(cores) // workers
        groups = [_span(cores[k * per:(k + 1) * per]) for k in range(workers)]
    return [{"VLLM_CPU_OMP_THREADS_BIND": "|".join(groups[i * tp:(i + 1) * tp])}
            for i in range(n)]


def resolve_data_parallel(value: int | str | None, tp: int, backend: str) -> int:
    """--data-parallel as a replica count ("auto" resolved); exit 2 when it cannot be met."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        requested = None
    else:
        try:
            requested = int(value)
        except (TypeError, ValueError):
            raise UsageError(f"--data-parallel {value!r}: give a number of replicas, or "
                             "auto") from None
        if requested < 1:
            raise UsageError("--data-parallel must be at least 1 (or auto)")
    if backend == "ray":
        if requested not in (None, 1):
            raise UsageError("--data-parallel is for the in-process engine; with --engine "
                             "ray use --replicas")
        return 1
    if requested == 1:
        return 1
    envs = plan_replicas(requested, tp, visible_gpus(), _cpu_cores(),
                         os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))
    return len(envs)


def replica_envs(cfg: EngineConfig) -> list[dict[str, str]]:
    return plan_replicas(cfg.data_parallel, cfg.tensor_parallel_size, visible_gpus(),
                         _cpu_cores(), os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))


# --- balancing (pure) -----------------------------------------------------------------------

def group_of(key: Any) -> Any:
    """Requests of one row: keys that differ only in their last element (the pipeline's
    (chunk, row, request) keys)."""
    return key[:-1] if isinstance(key, tuple) and len(key) > 1 else key


class Balancer:
    """Which replica takes the next request: the one with the fewest outstanding tokens
    among those with room in their window; the requests of one row stay together."""

    def __init__(self, replicas: int, window: int):
        self.window = max(1, window)
        self.load = [0] * replicas          # outstanding tokens per replica
        self.count = [0] * replicas         # outstanding requests per replica
        self.usable = [True] * replicas     # alive and loaded
        self._last: tuple[Any, int] | None = None

    def pick(self, group: Any) -> int | None:
        if self._last is not None and self._last[0] == group and self.usable[self._last[1]]:
            return self._last[1]
        free = [i for i, ok in enumerate(self.usable) if ok and self.count[i] < self.window]
        if not free:
            return None
        return min(free, key=lambda i: (self.load[i], self.count[i], i))

    def has_room(self) -> bool:
        return any(ok and c < self.window for ok, c in zip(self.usable, self.count))

    def sent(self, replica: int, group: Any, cost: int) -> None:
        self.load[replica] += cost
        self.count[replica] += 1
        self._last = (group, replica)

    def done(self, replica: int, cost: int) -> None:
        self.load[replica] -= cost
        self.count[replica] -= 1

    def down(self, replica: int) -> None:
        self.usable[replica] = False
        self.load[replica] = self.count[replica] = 0
        if self._last is not None and self._last[1] == replica:
            self._last = None

    def up(self, replica: int) -> None:
        self.usable[replica] = True


# --- the replica process --------------------------------------------------------------------

def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (nfb) dies, even by kill -9."""
    import signal

    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _factory(spec: str) -> Callable[[EngineConfig, str], Any]:
    import importlib

    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _replica_main(conn) -> None:
    """A replica: read its settings, start the engine, then serve sessions ("run" ... "end")
    until "close"."""
    import queue
    import signal
    import sys
    import threading

    init = conn.recv()
    os.environ.update(init["env"])
    os.environ[ENV_INDEX] = str(init["index"])
    _die_with_parent()
    if os.getppid() != init["parent"]:   # nfb died before the line above took effect
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is nfb's to handle
    os.dup2(2, 1)                                    # stdout may be nfb's data (-o -)
    # nfb's own import path, in its order (as multiprocessing's spawn does), so a replica
    # imports what nfb imports (a site's engine factory, a test's stub)
    sys.path[:] = [*init["path"], *(p for p in sys.path if p not in init["path"])]
    from nfb.logs import quiet_engine_logs, verbose

    if not verbose():
        quiet_engine_logs()
    try:
        engine = _factory(init["spec"])(init["cfg"], init["runner"])
    except BaseException as e:  # noqa: BLE001 - reported to nfb in one line
        from nfb.errors import NfbError

        conn.send(("failed", str(e) if isinstance(e, NfbError) else
                   f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"))
        return
    pids = engine.pids() if callable(getattr(engine, "pids", None)) else []
    conn.send(("ready", int(engine.max_model_len), [(int(p), float(t)) for p, t in pids]))

    inbox: queue.Queue = queue.Queue()

    def receive() -> None:
        try:
            while True:
                inbox.put(conn.recv())
        except (EOFError, OSError):
            inbox.put(("gone",))
    threading.Thread(target=receive, name="nfb-replica-recv", daemon=True).start()

    msg = inbox.get()
    try:
        while msg[0] not in ("close", "gone"):
            if msg[0] == "run":
                msg = _session(engine, msg, inbox, conn) or inbox.get()
            else:           # what an aborted session's nfb sent late: nothing to do
                msg = inbox.get()
    except EngineDied as e:
        _send(conn, ("died", str(e)))
    except Exception as e:  # noqa: BLE001
        _send(conn, ("died", f"the engine failed: {' '.join(str(e).split())[:300]}"))
    finally:
        try:
            engine.close()
        except Exception:  # noqa: BLE001
            pass


def _send(conn, msg) -> None:
    try:
        conn.send(msg)
    except (OSError, ValueError):
        pass


def _session(engine, msg, inbox, conn):
    """One stream: requests from the inbox until "end" (or "abort"); returns the message
    that ended it when that is for the outer loop ("run", "close", "gone"), else None."""
    _, kind, sampling = msg
    state: dict[str, Any] = {"out": 0, "stop": None}   # "out": in the engine, not yet back

    def requests() -> Iterator[Request]:
        while True:
            item = inbox.get()
            if item[0] == "add":
                state["out"] += 1
                yield item[1], item[2]
            else:
                state["stop"] = item
                return

    def can_feed() -> bool:
        if not inbox.empty():
            return True
        if state["out"] == 0:   # idle: wait a little for work rather than spin
            deadline = time.monotonic() + 0.1
            while time.monotonic() < deadline:
                if not inbox.empty():
                    return True
                time.sleep(0.002)
        return False

    if kind == "generate":
        stream = engine.generate(requests(), sampling, can_feed)
    else:
        stream = engine.classify(requests(), can_feed)
    try:
        for rid, value in stream:
            state["out"] -= 1
            conn.send(("out", rid, value))
            if state["stop"] is not None and state["stop"][0] != "end":
                break          # aborted, closed, or a new session: drop the rest
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    stop = state["stop"]
    return stop if stop is not None and stop[0] in ("run", "close", "gone") else None


# --- the parent's side ----------------------------------------------------------------------

@dataclass
class _Replica:
    index: int
    env: dict[str, str]
    proc: Any = None
    conn: Any = None
    ready: bool = False
    alive: bool = False
    eof: bool = False
    pids: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class _Request:
    key: Any
    ids: list[int]
    group: Any
    cost: int
    replica: int = -1


class ReplicaSet(Engine):
    """The Engine protocol over N replica processes (see the module's docstring)."""

    def __init__(self, cfg: EngineConfig, runner: str, replica: str = DEFAULT_REPLICA,
                 envs: list[dict[str, str]] | None = None):
        from nfb.engines.guard import Guardian

        self.cfg = cfg
        self.runner = runner
        self.spec = replica
        envs = envs if envs is not None else replica_envs(cfg)
        self.data_parallel = len(envs)
        self.restarts_left = cfg.engine_restarts
        self.restarts_used = 0
        self._note: Callable[[str], None] = lambda _m: None
        self._rids = itertools.count()
        self._closed = False
        self.guardian = Guardian()
        self.replicas = [_Replica(i, env) for i, env in enumerate(envs)]
        self.served = [0] * len(envs)          # results returned per replica
        self.max_model_len = 0
        self.tokenizer = None
        try:
            for r in self.replicas:
                self._spawn(r)
            self.tokenizer = _load_tokenizer(cfg)
            self._wait_ready()
        except BaseException:
            self._kill_all()
            raise

    # --- starting ----------------------------------------------------------------------------
    def _spawn(self, r: _Replica) -> None:
        """Start replica `r` as `python -m nfb.engines.replicas FD` (not multiprocessing's
        spawn, which would import the caller's main module again in every replica)."""
        import socket
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        import psutil

        mine, theirs = socket.socketpair()
        r.proc = subprocess.Popen(
            [sys.executable, "-m", "nfb.engines.replicas", str(theirs.fileno())],
            stdin=subprocess.DEVNULL, pass_fds=[theirs.fileno()], close_fds=True)
        theirs.close()
        r.conn = Connection(mine.detach())
        r.ready, r.alive, r.eof, r.pids = False, True, False, []
        try:
            self.guardian.add(r.proc.pid, psutil.Process(r.proc.pid).create_time())
        except psutil.Error:
            pass
        sub = replace(self.cfg, data_parallel=1, engine_restarts=0)
        self._send(r, {"index": r.index, "env": r.env, "cfg": sub, "runner": self.runner,
                       "spec": self.spec, "path": list(sys.path), "parent": os.getpid()})

    def _wait_ready(self) -> None:
        from multiprocessing.connection import wait

        while not all(r.ready for r in self.replicas):
            waiting = [r for r in self.replicas if not r.ready]
            wait([r.conn for r in waiting], timeout=1.0)
            for r in waiting:
                msg = self._poll(r)
                if msg is None:
                    if self._ended(r):
                        raise ModelError(self._who(r, "could not start") + ": " +
                                         self._exit_text(r))
                    continue
                if msg[0] == "failed":
                    raise ModelError(f"{self._who(r, 'could not start')}: {msg[1]}")
                if msg[0] == "ready":
                    self._ready(r, msg)

    def _ready(self, r: _Replica, msg) -> None:
        _, max_len, pids = msg
        r.ready = True
        r.pids = list(pids)
        for pid, ctime in pids:
            self.guardian.add(pid, ctime)
        if self.max_model_len and max_len != self.max_model_len:
            raise ModelError(f"the replicas disagree on the context length ({max_len} vs "
                             f"{self.max_model_len}); run with --data-parallel 1")
        self.max_model_len = max_len

    def _poll(self, r: _Replica):
        """The next message from `r`, or None (none yet, or its end of the pipe closed)."""
        if r.eof:
            return None
        try:
            if r.conn.poll():
                return r.conn.recv()
        except (EOFError, OSError):
            r.eof = True
        return None

    def _ended(self, r: _Replica) -> bool:
        """Has the replica process exited? Once its pipe closed, it is about to."""
        if r.eof:
            try:
                r.proc.wait(timeout=10.0)
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: still running
                pass
        return r.proc.poll() is not None

    def _who(self, r: _Replica, what: str) -> str:
        return f"replica {r.index + 1} of {len(self.replicas)} {what}"

    def _exit_text(self, r: _Replica) -> str:
        from nfb.engines.diagnose import death

        return death(r.proc.pid, r.proc.poll()).replace("vLLM engine process",
                                                          "replica process")

    # --- the Engine protocol ----------------------------------------------------------------
    def set_note(self, note: Callable[[str], None]) -> None:
        """Where to say that a replica restarts (the pipeline's progress notes)."""
        self._note = note

    def pids(self) -> list[tuple[int, float]]:
        return list(self.guardian.records.items())

    def generate(self, requests: Iterable[Request], sampling: SamplingConfig,
                 can_feed: Callable[[], bool]) -> Iterator[tuple[Any, list[str]]]:
        out = sampling.max_tokens * sampling.samples
        return self._stream("generate", sampling, requests, can_feed, out)

    def classify(self, requests: Iterable[Request],
                 can_feed: Callable[[], bool]) -> Iterator[tuple[Any, list[float]]]:
        return self._stream("classify", None, requests, can_feed, 0)

    def _stream(self, kind: str, sampling, requests: Iterable[Request],
                can_feed: Callable[[], bool], out_tokens: int) -> Iterator[tuple[Any, Any]]:
        from multiprocessing.connection import wait

        if self._closed:
            raise EngineDied("the replicas were shut down")
        bal = Balancer(len(self.replicas), self.cfg.max_in_flight)
        session = ("run", kind, sampling)
        for r in self.replicas:
            bal.usable[r.index] = r.alive and r.ready
            if r.alive:
                self._send(r, session)
        source = iter(requests)
        exhausted = False
        queued: deque[_Request] = deque()      # pulled or re-queued, not yet sent
        pending: dict[int, _Request] = {}      # sent, result not back
        finished = False
        try:
            while True:
                # feed: re-queued requests first, then new ones while the pipeline allows
                while True:
                    if not queued:
                        if exhausted or not bal.has_room() or not can_feed():
                            break
                        try:
                            key, ids = next(source)
                        except StopIteration:
                            exhausted = True
                            break
                        queued.append(_Request(key, ids, group_of(key), len(ids) + out_tokens))
                    req = queued[0]
                    i = bal.pick(req.group)
                    if i is None:
                        break
                    queued.popleft()
                    rid = next(self._rids)
                    req.replica = i
                    pending[rid] = req
                    bal.sent(i, req.group, req.cost)
                    if not self._send(self.replicas[i], ("add", rid, req.ids)):
                        self._lost(self.replicas[i], "its pipe closed", bal, pending, queued,
                                   session)
                if exhausted and not queued and not pending:
                    finished = True
                    return
                live = [r for r in self.replicas if r.alive]
                if not live:
                    raise EngineDied("no replica is left")
                wait([r.conn for r in live], timeout=0.5)
                for r in live:
                    while r.alive:
                        msg = self._poll(r)
                        if msg is None:
                            if self._ended(r):
                                self._lost(r, self._exit_text(r), bal, pending, queued,
                                           session)
                            break
                        tag = msg[0]
                        if tag == "out":
                            req = pending.get(msg[1])
                            if req is not None and req.replica == r.index:
                                del pending[msg[1]]
                                bal.done(r.index, req.cost)
                                self.served[r.index] += 1
                                yield req.key, msg[2]
                        elif tag == "died":
                            self._lost(r, msg[1], bal, pending, queued, session)
                        elif tag == "ready":      # a restarted replica
                            self._ready(r, msg)
                            bal.up(r.index)
                            self._note(f"{self._who(r, 'is back')}")
                        elif tag == "failed":
                            raise EngineDied(f"{self._who(r, 'could not restart')}: {msg[1]}")
        finally:
            end = ("end",) if finished else ("abort",)
            for r in self.replicas:
                if r.alive:
                    self._send(r, end)

    def _lost(self, r: _Replica, why: str, bal: Balancer, pending: dict[int, _Request],
              queued: deque[_Request], session) -> None:
        """Replica `r` died: queue its unfinished requests again (oldest first, ahead of
        new rows), then restart it, or stop the run when no restart is left."""
        from nfb.engines.guard import kill_processes

        r.alive = r.ready = False
        bal.down(r.index)
        lost = sorted((rid for rid, q in pending.items() if q.replica == r.index),
                      reverse=True)
        for rid in lost:
            queued.appendleft(pending.pop(rid))
        kill_processes([*r.pids, *self._proc_record(r)], grace=1.0)
        try:
            r.conn.close()
        except OSError:
            pass
        if self.restarts_left <= 0:
            raise EngineDied(f"{self._who(r, 'died')}: {why}")
        self.restarts_left -= 1
        self.restarts_used += 1
        self._note(f"{self._who(r, 'died')}: {why}; its {len(lost)} unfinished request(s) go "
                   f"to the other replicas; restarting the replica ({self.restarts_left} "
                   "restart(s) left)")
        self._spawn(r)
        self._send(r, session)   # queued in its pipe: served once it has loaded

    def _proc_record(self, r: _Replica) -> list[tuple[int, float]]:
        ctime = self.guardian.records.get(r.proc.pid) if r.proc is not None else None
        return [(r.proc.pid, ctime)] if ctime is not None else []

    def _send(self, r: _Replica, msg) -> bool:
        try:
            r.conn.send(msg)
            return True
        except (OSError, ValueError, BrokenPipeError):
            return False

    # --- shutting down ----------------------------------------------------------------------
    def _kill_all(self) -> None:
        from nfb.engines.guard import kill_processes

        for r in self.replicas:
            if r.conn is not None:
                self._send(r, ("close",))
        kill_processes(list(self.guardian.records.items()), grace=1.0)
        self.guardian.release()
        self._closed = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        from nfb.engines.guard import kill_processes

        for r in self.replicas:
            if r.alive:
                self._send(r, ("close",))
        deadline = time.monotonic() + 30.0
        for r in self.replicas:
            if r.proc is not None:
                try:
                    r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: killed below
                    pass
        # whatever did not stop by itself (a dead replica's engine): stop it now
        kill_processes(list(self.guardian.records.items()), grace=2.0)
        self.guardian.release()


def _load_tokenizer(cfg: EngineConfig):
    """The tokenizer the replicas' engines load (vLLM's loader), for nfb's own rendering;
    vLLM's import-time notices go to a log, not the user's terminal."""
    from nfb.logs import CapturedStderr, verbose

    log = None if verbose() else CapturedStderr()
    try:
        if log is not None:
            with log:
                return _tokenizer(cfg)
        return _tokenizer(cfg)
    except Exception as e:  # noqa: BLE001 - a missing or broken tokenizer
        raise ModelError(f"the tokenizer of {cfg.model} could not be loaded: "
                         f"{' '.join(str(e).split())[:300]}") from None
    finally:
        if log is not None:
            log.remove()


def _tokenizer(cfg: EngineConfig):
    try:
        from vllm.tokenizers import get_tokenizer
    except ImportError:   # replicas of an engine without vLLM (a site's own)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(cfg.model, revision=cfg.revision,
                                             trust_remote_code=cfg.trust_remote_code)
    return get_tokenizer(cfg.model, revision=cfg.revision,
                         trust_remote_code=cfg.trust_remote_code)


if __name__ == "__main__":
    import sys
    from multiprocessing.connection import Connection

    _replica_main(Connection(int(sys.argv[1])))
