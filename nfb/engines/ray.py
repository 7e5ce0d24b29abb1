"""--engine ray: one streaming Ray Data pipeline per run, vLLM replicas that live for the run.

    input files -> read (nfb's readers, one Ray task per file, global row numbers)
      -> prepare (map_batches: validate, chat template, tokenize, length checks, error rows;
         rows already done are skipped here)
      -> Ray Data LLM processor (`vLLMEngineProcessorConfig` + `build_processor`: `replicas`
         actors, each a vLLM engine, loaded once per run)
      -> parse (the processor's postprocess, in its workers)
      -> the driver: bookkeeping only (chunks in, rows resolved, checkpoint parts written by
         nfb's own PartWriter, so resume, error rows and the final merge are in-process's).

Each chunk of rows travels as its requests (one Ray row per request and sample); the first
request of a chunk carries the chunk's header (its input rows, row numbers, error rows), so
the driver never reads the input. A chunk whose rows all failed sends one 1-token request
(its output is ignored) to carry its header. Several samples (`--samples N`) are N requests
with seeds seed, seed+1, ... which is what vLLM does for `n=N` with a seed.
"""

from __future__ import annotations

import pickle
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from nfb.config import EngineConfig, RunConfig
from nfb.engines.base import Engine
from nfb.engines.vllm import engine_kwargs, sampling_kwargs
from nfb.errors import EngineDied, InputError, NfbError, UsageError

INSTALL = "pip install 'nfb[ray]'   (ray[data])"
ENGINE_CLASS = "vLLMEngineStageUDF"   # Ray Data LLM's engine actor (counted as engine loads)


def check_ray() -> None:
    """Fail fast (exit 2) when Ray Data LLM is not installed."""
    try:
        import ray  # noqa: F401
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig  # noqa: F401
    except ImportError:
        raise UsageError(f"--engine ray needs Ray Data: {INSTALL}") from None


# --- worker side: read, prepare, parse ------------------------------------------------------

_TOKENIZERS: dict[tuple, Any] = {}


def _tokenizer(model: str, revision: str | None, trust: bool):
    """One tokenizer per worker process and model (Ray reuses workers across tasks)."""
    key = (model, revision, trust)
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(model, revision=revision,
                                                         trust_remote_code=trust)
    return _TOKENIZERS[key]


def count_file(path: str) -> dict:
    """Rows of one input file, as `nfb.io.readers.count_rows` counts them, and its columns,
    as `nfb.io.readers.input_columns` reads them (Ray task: the driver never reads inputs)."""
    from nfb.io.readers import count_rows, input_columns
    n = count_rows([path])
    if n is None:
        raise UsageError("--engine ray cannot read stdin: pass files")
    return {"rows": n, "columns": input_columns([path])}


def read_unit(item: dict, batch_rows: int, max_line_bytes: int, limit: int | None
              ) -> Iterator[dict]:
    """The chunks of one input file, numbered from the file's first global row (Ray task)."""
    from nfb.io import jsonl
    from nfb.io.readers import _module, input_format

    path, row = item["path"], int(item["first_row"])
    if input_format(path) == "jsonl":
        chunks = jsonl.read_chunks(path, row, batch_rows, max_line_bytes)
    else:
        chunks = _module(path).read_chunks(path, row, batch_rows)
    for chunk in chunks:
        if limit is not None and chunk.first_row >= limit:
            return
        chunk.notes = []
        yield {"nfb_chunk": chunk.first_row, "nfb_data": pickle.dumps(chunk, protocol=5)}


REQUEST_SCHEMA = pa.schema([
    ("nfb_chunk", pa.int64()), ("nfb_j", pa.int32()), ("nfb_k", pa.int32()),
    ("nfb_n", pa.int32()), ("nfb_s", pa.int32()), ("nfb_dummy", pa.bool_()),
    ("nfb_head", pa.binary()), ("tokenized_prompt", pa.list_(pa.int32()))])


class Prepare:
    """map_batches: chunks in, one row per request out (validate, template, tokenize)."""

    def __init__(self, cfg: RunConfig, task, done_ref, budget: int, samples: int,
                 preparer: Callable[..., Any]):
        self.cfg, self.task, self.budget, self.samples = cfg, task, budget, samples
        self.done_ref = done_ref
        self.make_preparer = preparer   # the run's ChunkPreparer (nfb.run.feed), handed in
        self._preparer = None

    def _prep(self):
        if self._preparer is None:
            import ray

            e = self.cfg.engine
            done = self.done_ref if isinstance(self.done_ref, np.ndarray) \
                else ray.get(self.done_ref)
            self._preparer = self.make_preparer(
                self.cfg, self.task, _tokenizer(e.model, e.revision, e.trust_remote_code),
                done, self.budget)
        return self._preparer

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = {f.name: [] for f in REQUEST_SCHEMA}

        def add(first, j, k, n, s, dummy, head, ids):
            for name, v in zip(cols, (first, j, k, n, s, dummy, head, ids)):
                cols[name].append(v)

        for data in batch.column("nfb_data").to_pylist():
            chunk = pickle.loads(data)
            prep = self._prep().prepare(chunk)
            if prep is None:   # every row of the chunk is done (resume) or not selected
                continue
            counts = [(j, len(toks)) for j, toks in prep.requests]
            head = pickle.dumps((prep.pending, prep.failed, prep.truncated, counts),
                                protocol=5)
            first = chunk.first_row
            if not prep.requests:
                add(first, -1, 0, 0, 0, True, head, [0])
                continue
            for j, toks in prep.requests:
                for k, ids in enumerate(toks):
                    for s in range(self.samples):
                        add(first, j, k, len(toks), s, False, head, list(ids))
                        head = b""
        return pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in REQUEST_SCHEMA})


def _preprocess(params: dict | None, samples: int):
    """The processor's preprocess: each row's sampling (or pooling) parameters."""
    def pre(row: dict) -> dict:
        if params is None:
            return row | {"pooling_params": {"use_activation": False}}
        p = dict(params)
        if row["nfb_dummy"]:
            p["max_tokens"] = 1
            p.pop("structured_outputs", None)
        if p.get("seed") is not None:
            p["seed"] = int(p["seed"]) + int(row["nfb_s"])
        else:
            p.pop("seed", None)
        return row | {"sampling_params": p}
    return pre


def ray_sample(text: str, logprobs) -> Any:
    """Ray Data LLM's output as the in-process engine's `Sample` (nfb.engines.vllm._sample):
    the text and the top-k log-probabilities of its last tokens. The engine stage gives one
    {token id: {"logprob", "rank", "decoded_token"}} per generated token."""
    from nfb.engines.base import tail_sample

    return tail_sample(text, logprobs, lambda lp: lp["logprob"])


def _gather(refs: list, what: str) -> list:
    """`ray.get(refs)`, its failures as nfb's one-line errors: a task's own nfb error (an
    unreadable input: exit 1, as in-process) as it was raised on the worker, anything else
    (a worker lost, an unexpected exception) as an InputError naming `what` (Ray's own text
    is the worker's whole traceback)."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayError as e:   # a RayTaskError carries the worker's exception
        cause = getattr(e, "cause", None)
        if isinstance(cause, NfbError):
            raise cause from None
        raise InputError(f"{what} failed on a Ray worker: {_why(e)}") from None


def _why(e: BaseException) -> str:
    """One line for a failure that came from Ray: the worker's own exception (Ray's text of
    a failed task is the worker's whole traceback, and Ray Data wraps a stage's exception in
    its UserCodeException), else the first line of Ray's."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, NfbError):
        return " ".join(str(cause).split())[:300]
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    for line in text.splitlines():   # the first exception in the text is the root cause
        m = _EXC_LINE.match(line.strip())
        if m and not m.group(1).startswith("ray."):
            name, msg = m.group(1), " ".join(m.group(2).split())[:300]
            return msg if name.startswith("nfb.") else f"{name.rsplit('.', 1)[-1]}: {msg}"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    why = cause if isinstance(cause, BaseException) else e
    first = " ".join(str(why).split("\n", 1)[0].split()) or (lines[0] if lines else "")
    return f"{type(why).__name__}: {first[:300]}"


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Died|Exit|Interrupt|Warning)):"
                       r" (.+)$")


def _postprocess(task, generate: bool, samples: int, logprobs: bool = False):
    """The processor's postprocess: parse in the worker when a row is one request and one
    sample (else the driver gathers the row's outputs and parses them)."""
    def post(row: dict) -> dict:
        if row["nfb_dummy"]:
            out = b""
        else:
            if not generate:
                value = [float(x) for x in np.asarray(row["embeddings"]).reshape(-1)]
            elif logprobs:
                value = [ray_sample(str(row["generated_text"]), row.get("logprobs"))]
            else:
                value = [str(row["generated_text"])]
            if row["nfb_n"] == 1 and samples == 1:
                out = pickle.dumps((True, task.parse([value])), protocol=5)
            else:
                out = pickle.dumps((False, value[0] if generate else value), protocol=5)
        return {"nfb_chunk": row["nfb_chunk"], "nfb_j": row["nfb_j"], "nfb_k": row["nfb_k"],
                "nfb_s": row["nfb_s"], "nfb_head": row["nfb_head"], "nfb_out": out}
    return post


# --- the engine (driver side) ---------------------------------------------------------------

def _track_executors(ds) -> list:
    """The streaming executors that run `ds` (filled as Ray Data creates them): Ray Data
    keeps its own reference (`Dataset._current_executor`) only once a first block has come
    out, which a replica that stalls from the start never gives."""
    found: list = []
    create = getattr(ds, "_create_executor", None)
    if callable(create):
        def tracked():
            executor = create()
            found.append(executor)
            return executor
        ds._create_executor = tracked
    return found


def _stop_execution(ds, executors: list) -> None:
    """Stop the dataset's streaming execution now, its engine actors included (a stalled or
    interrupted run; a no-op once it has finished): else its replicas would keep their GPUs
    from the engine a restart starts. Ray Data does this itself when the dataset is garbage
    collected (`Dataset.__del__`), which a driver thread blocked on a stalled replica delays."""
    for executor in [*executors, getattr(ds, "_current_executor", None)]:
        if executor is not None:
            try:
                executor.shutdown(force=True)
            except Exception:  # noqa: BLE001 - best effort: the run is stopping anyway
                pass


SUMMED = ("engine_loads", "scoring_seconds", "load_seconds", "driver_cpu_seconds",
          "bookkeeping_cpu_seconds")


def merged_counts(engines: list) -> dict:
    """The run's counts over every engine it started (a restart after a stalled or lost
    cluster starts another): loads and seconds added up, rows per second per replica over
    all of them."""
    out: dict = {}
    for e in engines:
        out.update({k: v for k, v in e.run_counts.items() if k not in SUMMED})
        for k in SUMMED:
            if k in e.run_counts:
                out[k] = round(out.get(k, 0) + e.run_counts[k], 3)
    rows = sum(getattr(e, "rows_scored", 0) for e in engines)
    seconds = sum(e.run_counts.get("scoring_seconds", 0.0) for e in engines)
    replicas = max(1, int(out.get("replicas", 1) or 1))
    out["rows_per_s_per_replica"] = round(rows / seconds / replicas, 3) if seconds > 0 else 0.0
    return out


class RayEngine(Engine):
    """The Ray backend: `stream_rows` runs the whole row pipeline on the cluster."""

    streams_rows = True

    def merge_counts(self, engines: list[Engine]) -> dict:
        return merged_counts(engines)

    def __init__(self, cfg: EngineConfig, runner: str):
        import ray
        from transformers import AutoTokenizer

        from nfb.models.modelinfo import read_model_info

        self.cfg = cfg
        self.runner = runner
        self.data_parallel = cfg.replicas
        self.run_counts: dict = {"engine": "ray", "replicas": cfg.replicas, "engine_loads": 0,
                                 "rows_per_s_per_replica": 0.0}
        self.rows_scored = 0   # rows its last pipeline finished (for merged_counts)
        self._own_ray = not ray.is_initialized() and cfg.ray_address is None
        if not ray.is_initialized():
            import logging

            from nfb.logs import verbose
            ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True,
                     logging_level=logging.INFO if verbose() else logging.ERROR)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # nfb draws its own
        from nfb.logs import verbose
        if not verbose():  # Ray Data's INFO lines (plans, "execution finished") are not nfb's
            import logging
            for name in ("ray", "ray.data", "ray._private"):
                logging.getLogger(name).setLevel(logging.ERROR)
            ctx.print_on_execution_start = False
        self.tokenizer = AutoTokenizer.from_pretrained(
            cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        info = read_model_info(cfg.model, cfg.revision, cfg.trust_remote_code)
        self.max_model_len: int = cfg.max_model_len or info.max_position_embeddings or 4096
        kwargs = engine_kwargs(cfg, runner)
        kwargs["max_model_len"] = self.max_model_len
        self.engine_kwargs = kwargs
        self.gpus = ray.cluster_resources().get("GPU", 0)
        # a cluster without GPUs (CPU vLLM, tests): half a logical CPU per tensor-parallel
        # worker, so that nfb's CPU stages find room beside the engines on small nodes
        self.placement = None if self.gpus else {
            "bundles": [{"CPU": 0.5} for _ in range(cfg.tensor_parallel_size)]}
        self._job = ray.get_runtime_context().get_job_id()
        self._actors_before = set(self._engine_actors())

    # engine loads: Ray Data LLM's engine actors of this job, and their restarts
    def _engine_actors(self) -> dict[str, int]:
        import ray
        try:
            table = ray._private.state.actors()
        except Exception:  # noqa: BLE001 - counts are informative; never fail a run on them
            return {}
        return {aid: int(a.get("NumRestarts", 0) or 0) for aid, a in table.items()
                if ENGINE_CLASS in str(a.get("ActorClassName", ""))
                and str(a.get("JobID", "")) == str(self._job)}

    def engine_loads(self) -> int:
        return sum(1 + r for aid, r in self._engine_actors().items()
                   if aid not in self._actors_before)

    def _units(self, cfg: RunConfig, done: np.ndarray,
               check_columns: Callable[[list[str]], None] | None = None,
               set_total: Callable[[int], None] | None = None) -> list[dict]:
        """One read unit per input file, with its first global row; files already done, or
        past --limit, are left out. Ray tasks count each file's rows and read its columns,
        which `check_columns` checks (nfb's column clash: exit 2) before any model loads;
        `set_total` gets the rows of all files (the progress bar's total)."""
        import ray

        files = list(cfg.inputs)
        if "-" in files:   # stdin is the driver's: the workers cannot read it
            raise UsageError("--engine ray reads input files on the workers: pass files, "
                             "not '-' (stdin)")
        fn = ray.remote(num_cpus=0.25, max_retries=3)(count_file)
        found = _gather([fn.remote(f) for f in files], "reading the inputs")
        if check_columns is not None:   # every file's columns, in first-seen order
            check_columns(list(dict.fromkeys(c for f in found for c in f["columns"])))
        if set_total is not None:
            set_total(sum(f["rows"] for f in found))
        units, row = [], 0
        for f, n in zip(files, (f["rows"] for f in found)):
            first, row = row, row + n
            if cfg.limit is not None and first >= cfg.limit:
                break
            if n > 0 and first + n <= len(done) and bool(done[first:first + n].all()):
                continue   # finished in an earlier run: not read at all
            units.append({"path": f, "first_row": first})
        return units

    def _dataset(self, cfg: RunConfig, task, done: np.ndarray, budget: int,
                 preparer: Callable[..., Any],
                 check_columns: Callable[[list[str]], None] | None = None,
                 set_total: Callable[[int], None] | None = None):
        import ray
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig

        generate = task.runner == "generate"
        samples = task.sampling.samples if generate else 1
        params = sampling_kwargs(task.sampling) if generate else None
        units = self._units(cfg, done, check_columns, set_total)
        if not units:
            return None
        # tokenizing is the CPU work: a core per prepare task on a GPU cluster; reading is
        # lighter, and its different resources keep Ray Data from fusing the two stages, so
        # the chunks of one file are prepared by many workers at once
        cpus = 1 if self.gpus else 0.25
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        ds = ds.flat_map(read_unit, fn_kwargs=dict(batch_rows=cfg.batch_rows,
                                                   max_line_bytes=cfg.max_line_bytes,
                                                   limit=cfg.limit), num_cpus=cpus / 2)
        ds = ds.map_batches(Prepare(cfg, task, ray.put(done), budget, samples, preparer),
                            batch_size=1, batch_format="pyarrow", num_cpus=cpus)
        config = vLLMEngineProcessorConfig(
            model_source=self.cfg.model,
            task_type="generate" if generate else "classify",
            engine_kwargs=self.engine_kwargs,
            # a fixed pool (an int lets Ray Data autoscale from 1): loads == replicas
            concurrency=(self.cfg.replicas, self.cfg.replicas),
            batch_size=min(256, max(1, self.cfg.max_in_flight)),
            placement_group_config=self.placement,
            log_engine_metrics=False,
            chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        )
        small = {"num_cpus": 0.1 if not self.gpus else 0.25}
        logprobs = bool(params and params.get("logprobs"))   # the Principle GenRM reads them
        processor = build_processor(config, preprocess=_preprocess(params, samples),
                                    postprocess=_postprocess(task, generate, samples, logprobs),
                                    preprocess_map_kwargs=small, postprocess_map_kwargs=small)
        return processor(ds)

    def stream_rows(self, cfg: RunConfig, task, collector, done: np.ndarray, sink,
                    poll_total: Callable[[], None], *, budget: int,
                    preparer: Callable[..., Any],
                    check_columns: Callable[[list[str]], None] | None = None,
                    set_total: Callable[[int], None] | None = None) -> None:
        """Run every row not yet done through the cluster; write finished chunks in order
        through `collector` (the pipeline's, with its PartWriter). The run hands in the
        prompt budget and its chunk preparer (`preparer(cfg, task, tokenizer, done, budget)`
        with `.prepare(chunk)`), which Ray's CPU workers run, and its column check
        (`check_columns(input columns)`, exit 2 on a clash) and `set_total(rows)`, which
        the workers' counts feed: the driver reads no input."""
        samples = task.sampling.samples if task.runner == "generate" else 1
        t0, cpu0, own0 = time.monotonic(), time.process_time(), time.thread_time()
        new_before = collector.result.new_rows
        ds = self._dataset(cfg, task, done, budget, preparer, check_columns, set_total)
        chunks: dict[int, tuple] = {}          # chunk -> (pending, {j: outputs})
        early: dict[int, list] = {}            # outputs that came before their chunk's header
        resolved: set[tuple[int, int]] = set()   # rows resolved, of chunks still open
        finished: set[int] = set()               # chunks complete (one number per chunk)

        def take(c: int, j: int, k: int, s: int, out: bytes) -> None:
            if (c, j) in resolved:
                return   # a retried request seen twice (Ray retries): counted once
            p, outs, counts = chunks[c]
            parsed, value = pickle.loads(out)
            if parsed:
                resolved.add((c, j))
                collector.resolve(p, j, value)
                return
            slots = outs.setdefault(j, [[None] * samples for _ in range(counts[j])])
            slots[k][s] = value
            if all(v is not None for req in slots for v in req):
                resolved.add((c, j))
                del outs[j]
                gen = task.runner == "generate"
                collector.resolve(p, j, task.parse([list(req) if gen else req[0]
                                                    for req in slots]))

        self._t_loaded = None   # when every replica had loaded (set by _batches)
        try:
            for batch in self._batches(ds, cfg.engine.stall_timeout, self._loaded):
                cols = {n: batch.column(n).to_pylist()
                        for n in ("nfb_chunk", "nfb_j", "nfb_k", "nfb_s", "nfb_head", "nfb_out")}
                for c, j, k, s, head, out in zip(*cols.values()):
                    if c in finished:
                        continue   # a retried request of a chunk already written
                    if head and c not in chunks:
                        p, failed, truncated, counts = pickle.loads(head)
                        p.truncated = truncated
                        chunks[c] = (p, {}, dict(counts))
                        for jj, reason in failed:
                            collector.fail(p, jj, reason)
                        collector.add(p)
                        for item in early.pop(c, []):
                            take(c, *item)
                    if j < 0:
                        continue   # a chunk's carrier request: no row of its own
                    if c in chunks:
                        take(c, j, k, s, out)
                    else:
                        early.setdefault(c, []).append((j, k, s, out))
                for c in [c for c, (p, _o, _n) in chunks.items() if p.remaining == 0]:
                    rows = len(chunks.pop(c)[0].rows)
                    finished.add(c)
                    resolved.difference_update({(c, j) for j in range(rows)})
                if sink is not None:
                    sink.maybe_flush()
                poll_total()
        except BaseException:
            collector.save_finished(sink)
            raise
        finally:
            end = time.monotonic()
            loaded = self._t_loaded if self._t_loaded is not None else t0
            collector.result.load_seconds += loaded - t0
            seconds = end - loaded   # scoring, not loading
            rows = collector.result.new_rows - new_before
            self.rows_scored = rows   # this call's, as the counts beside it
            self.run_counts.update(
                engine_loads=self.engine_loads(), scoring_seconds=round(seconds, 3),
                load_seconds=round(loaded - t0, 3),
                # the driver process (Ray Data's executor threads included), and of it
                # nfb's bookkeeping (this thread: chunks in, rows resolved, parts written)
                driver_cpu_seconds=round(time.process_time() - cpu0, 3),
                bookkeeping_cpu_seconds=round(time.thread_time() - own0, 3),
                rows_per_s_per_replica=round(rows / seconds / max(1, self.cfg.replicas), 3)
                if seconds > 0 else 0.0)
        collector.drain()
        if collector.queue or early:
            from nfb.errors import RunError
            raise RunError("internal error: rows left unfinished")

    def _loaded(self) -> bool:
        """Every replica of this run has loaded (its engine actor is alive)."""
        import ray
        try:
            table = ray._private.state.actors()
        except Exception:  # noqa: BLE001 - then the watchdog waits for a first result
            return False
        alive = [a for aid, a in table.items() if aid not in self._actors_before
                 and ENGINE_CLASS in str(a.get("ActorClassName", ""))
                 and str(a.get("JobID", "")) == str(self._job) and a.get("State") == "ALIVE"]
        return len(alive) >= self.cfg.replicas

    def _batches(self, ds, stall_timeout: float, loaded: Callable[[], bool]
                 ) -> Iterator[pa.Table]:
        """The result batches, pulled by a thread so that the stall watchdog can see a
        cluster that stopped returning rows: no batch for `stall_timeout` seconds once the
        replicas have loaded (loading a large model takes minutes, as in-process)."""
        if ds is None:
            return
        q: queue.Queue = queue.Queue(maxsize=8)
        stop = threading.Event()
        executors = _track_executors(ds)

        def put(item) -> bool:
            """Hand `item` to the driver's loop; False once nobody reads any more."""
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def pull() -> None:
            try:
                for b in ds.iter_batches(batch_size=None, batch_format="pyarrow",
                                         prefetch_batches=2):
                    if not put(b):
                        return
                last: Any = None   # the end
            except BaseException as e:  # noqa: BLE001 - handed to the driver's loop
                last = e
            put(last)

        threading.Thread(target=pull, name="nfb-ray-results", daemon=True).start()
        since: float | None = None   # the watchdog's clock: from the replicas' load on
        try:
            while True:
                if since is None and loaded():
                    since = self._t_loaded = time.monotonic()
                try:
                    item = q.get(timeout=0.25 if since is None else 1.0)
                except queue.Empty:
                    if since is not None and time.monotonic() - since > stall_timeout:
                        raise EngineDied(f"no result from the Ray replicas for "
                                         f"{stall_timeout:g} s (a stalled replica; see "
                                         "--stall-timeout)") from None
                    continue
                if since is not None:
                    since = time.monotonic()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise EngineDied(f"the Ray pipeline failed: {_why(item)}") from None
                yield item
        finally:
            stop.set()
            _stop_execution(ds, executors)

    def close(self) -> None:
        import ray

        if self._own_ray and ray.is_initialized():  # a local instance this run started
            ray.shutdown()

