"""vLLM in-process: tensor parallel, fed continuously with a bounded window in flight.

Requests go straight to `LLM.llm_engine` (add_request / step) as token ids that nfb
rendered and length-checked itself, so no row is tokenized twice and the engine never
waits for a batch boundary: as one request finishes, the next one is added.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from nfb.config import EngineConfig, SamplingConfig
from nfb.engines.base import Engine, Request

# vLLM logs to stdout by default; nfb keeps stdout for data.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


class _DropRawPromptNotice(logging.Filter):
    """nfb hands vLLM token ids it rendered and length-checked itself, on purpose; vLLM 0.32
    warns that raw prompts are deprecated in favour of its Renderer, which would tokenize
    every row a second time. The notice says nothing to an nfb user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Passing raw prompts to InputProcessor" not in record.getMessage()


logging.getLogger("vllm.v1.engine.input_processor").addFilter(_DropRawPromptNotice())


def on_cpu() -> bool:
    from vllm.platforms import current_platform
    return current_platform.is_cpu()


def _cpu_thread_binding(tp: int) -> str:
    cores = list(range(os.cpu_count() or 1))
    per = max(1, len(cores) // tp)
    groups = [cores[i * per:(i + 1) * per] or cores[-1:] for i in range(tp)]
    return "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


def sampling_kwargs(sampling: SamplingConfig) -> dict[str, Any]:
    """SamplingParams arguments for a feedback run (shared by the in-process and Ray engines)."""
    kwargs: dict[str, Any] = dict(temperature=sampling.temperature, top_p=sampling.top_p,
                                  max_tokens=sampling.max_tokens, seed=sampling.seed)
    if sampling.regex:
        kwargs["structured_outputs"] = {"regex": sampling.regex}
    if sampling.logprobs:
        # vLLM's default logprobs_mode is raw_logprobs: from the model's logits before any
        # temperature or top-k/top-p, as NeMo-RL's principle GenRM environment reads them
        kwargs["logprobs"] = sampling.logprobs
    return kwargs


def _sample(completion) -> Any:
    """A vLLM completion as a `Sample`: its text and the top-k log-probabilities of its last
    tokens."""
    from nfb.engines.base import tail_sample

    return tail_sample(completion.text, completion.logprobs, lambda lp: lp.logprob)


def memory_fraction(cfg: EngineConfig) -> float:
    """--gpu-memory-utilization, or its default: 0.9 on a GPU, 0.2 on a CPU (where vLLM sizes
    the KV cache from RAM)."""
    if cfg.gpu_memory_utilization is not None:
        return cfg.gpu_memory_utilization
    return 0.2 if on_cpu() else 0.9


def eager(cfg: EngineConfig) -> bool:
    """--enforce-eager, or its default: eager on a CPU, where vLLM's torch.compile costs more
    than it saves (about 90 CPU-seconds of every start on 2 cores: vLLM 0.32's CPU build
    cannot load its own compile cache), while the demo model scores within a few seconds of
    the compiled speed; on a GPU, vLLM's default (compiled, CUDA graphs)."""
    return cfg.enforce_eager if cfg.enforce_eager is not None else on_cpu()


def check_cpu_kv_cache() -> None:
    """On a CPU, a fixed KV cache (VLLM_CPU_KVCACHE_SPACE, GiB) larger than the machine's
    memory can never start: say so before vLLM spends ~30 s spawning its engine and worker
    processes only to fail in the worker. (A size under the total but over what is free is
    left to vLLM's own check, which knows its NUMA node; nfb.engines.diagnose names it.)"""
    import psutil

    try:
        want = int(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 0)
    except ValueError:
        return                      # vLLM's own error says what is wrong with it
    total = psutil.virtual_memory().total / 2**30
    if want > total and on_cpu():
        from nfb.errors import ModelError

        raise ModelError(
            f"not enough memory for the KV cache: VLLM_CPU_KVCACHE_SPACE asks for {want:,} GiB, "
            f"more than this machine's {total:.1f} GiB; lower VLLM_CPU_KVCACHE_SPACE (GiB of "
            "KV cache vLLM reserves on a CPU)")


def engine_kwargs(cfg: EngineConfig, runner: str) -> dict:
    """vLLM engine arguments for `cfg` (shared by the in-process and Ray engines)."""
    kwargs: dict[str, Any] = dict(
        revision=cfg.revision, tensor_parallel_size=cfg.tensor_parallel_size, dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        gpu_memory_utilization=memory_fraction(cfg), enforce_eager=eager(cfg))
    if cfg.enable_prefix_caching is not None:
        kwargs["enable_prefix_caching"] = cfg.enable_prefix_caching
    if cfg.max_model_len:
        kwargs["max_model_len"] = cfg.max_model_len
    if runner == "generate" and on_cpu():
        # vLLM's CPU worker cannot rewind a seeded request's generator when a prompt's
        # prefill is split over steps ("CPU Generator does not use offset"); whole
        # prefills avoid it. GPUs keep chunked prefill.
        kwargs["enable_chunked_prefill"] = False
    if cfg.hf_overrides:
        kwargs["hf_overrides"] = dict(cfg.hf_overrides)
    return kwargs


class VLLMEngine(Engine):
    """One vLLM `LLM` for a run: 'generate' for feedback, 'pooling' for score.

    Faults: the engine's processes are registered with a guardian (nfb.engines.guard) so they
    never outlive nfb; a watchdog thread notices within a second when the engine process
    dies, or when no request finishes for `stall_timeout` seconds, and turns the hang vLLM
    would otherwise wait in into `EngineDied` with the cause in one line. A failed start
    becomes `ModelError` with the cause read from the engine's own output.
    """

    def __init__(self, cfg: EngineConfig, runner: str):
        if cfg.tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ \
                and on_cpu():
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_thread_binding(cfg.tensor_parallel_size)
        import time

        from nfb.engines.guard import Guardian, snapshot_children
        from nfb.logs import CapturedStderr, verbose

        check_cpu_kv_cache()
        self.cfg = cfg
        self.runner = runner
        self.llm = None
        self._dead: str | None = None
        self._closing = False
        self._last_progress = time.monotonic()
        self._busy = False
        self.guardian = Guardian()
        self.log = None if verbose() else CapturedStderr()
        started = time.time()
        before = {pid for pid, _ in snapshot_children(0.0)} | {self.guardian.proc.pid}
        watcher_stop = threading.Event()

        def watch_load() -> None:  # register engine processes while they appear
            while not watcher_stop.wait(0.5):
                for pid, ctime in snapshot_children(started, before):
                    self.guardian.add(pid, ctime)
        loader = threading.Thread(target=watch_load, name="nfb-load-watch", daemon=True)
        loader.start()
        try:
            from vllm import LLM

            kwargs = engine_kwargs(cfg, runner)
            if self.log is not None:
                with self.log:
                    self.llm = LLM(model=cfg.model, runner=runner, **kwargs)
            else:
                self.llm = LLM(model=cfg.model, runner=runner, **kwargs)
        except KeyboardInterrupt:
            watcher_stop.set()
            loader.join()
            self._abandon()
            raise
        except Exception as e:  # noqa: BLE001 - vLLM raises many kinds
            from nfb.engines.diagnose import load_failure
            from nfb.errors import ModelError

            watcher_stop.set()
            loader.join()
            message = load_failure(e, self.log.text() if self.log else "")
            self._abandon()
            raise ModelError(message) from None
        finally:
            watcher_stop.set()
        loader.join()
        for pid, ctime in snapshot_children(started, before):
            self.guardian.add(pid, ctime)
        self.engine = self.llm.llm_engine
        self.tokenizer = self.llm.get_tokenizer()
        mc = self.llm.llm_engine.model_config
        self.max_model_len: int = mc.max_model_len
        self._ids = itertools.count()
        self._watchdog = threading.Thread(target=self._watch, name="nfb-engine-watch",
                                          daemon=True)
        self._watchdog.start()

    def pids(self) -> list[tuple[int, float]]:
        """(pid, start time) of the engine's processes (recorded for leftovers)."""
        return list(self.guardian.records.items())

    # --- faults --------------------------------------------------------------------------
    def _procs(self) -> list:
        client = getattr(self.engine, "engine_core", None)
        mgr = getattr(getattr(client, "resources", None), "engine_manager", None)
        return list(getattr(mgr, "processes", None) or [])

    def _wake(self) -> None:
        """Unblock a step() waiting for output from an engine that will never answer."""
        client = getattr(self.engine, "engine_core", None)
        q = getattr(client, "outputs_queue", None)
        if q is not None:
            try:
                from vllm.v1.engine.exceptions import EngineDeadError
                q.put_nowait(EngineDeadError())
            except Exception:  # noqa: BLE001
                pass

    def _watch(self) -> None:
        import time

        from nfb.engines.diagnose import death

        while not self._closing and self._dead is None:
            time.sleep(0.5)
            if self._closing:
                return
            for proc in self._procs():
                if proc.exitcode is not None:
                    self._dead = death(proc.pid, proc.exitcode)
            client = getattr(self.engine, "engine_core", None)
            resources = getattr(client, "resources", None)
            if self._dead is None and getattr(resources, "engine_dead", False):
                self._dead = death(None, None)
            if self._dead is None and self._busy and \
                    time.monotonic() - self._last_progress > self.cfg.stall_timeout:
                self._dead = (f"the engine made no progress for {self.cfg.stall_timeout:g} s "
                              "(stalled; see --stall-timeout)")
            if self._dead is not None:
                self._wake()
                return

    def _died(self, e: Exception):
        """The EngineDied that an engine call's failure `e` stands for."""
        import time

        from nfb.errors import EngineDied

        if self._dead is None:
            time.sleep(1.0)   # let the watchdog see a dead process, for the message
        return EngineDied(self._dead or f"the engine failed: {e!s:.300}")

    def _add(self, rid: str, prompt, params) -> None:
        try:
            self.engine.add_request(rid, prompt, params)
        except Exception as e:  # noqa: BLE001 - vLLM's EngineDeadError and kin
            raise self._died(e) from None

    def _step(self):
        from nfb.errors import EngineDied

        if self._dead is not None:
            raise EngineDied(self._dead)
        try:
            outs = self.engine.step()
        except Exception as e:  # noqa: BLE001
            raise self._died(e) from None
        if self._dead is not None:
            raise EngineDied(self._dead)
        return outs

    # --- streaming -----------------------------------------------------------------------
    def _stream(self, requests: Iterable[Request], params: Any,
                can_feed: Callable[[], bool]) -> Iterator[tuple[Any, Any]]:
        import time

        from vllm.inputs import TokensPrompt

        engine = self.engine
        window = max(1, self.cfg.max_in_flight)
        inflight: dict[str, Any] = {}
        source = iter(requests)
        exhausted = False
        try:
            while True:
                while not exhausted and len(inflight) < window and can_feed():
                    self._busy = False        # waiting for input is no engine stall
                    try:
                        key, ids = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    finally:
                        self._last_progress = time.monotonic()
                    rid = f"nfb-{next(self._ids)}"
                    self._add(rid, TokensPrompt(prompt_token_ids=ids), params)
                    inflight[rid] = key
                if not inflight:
                    self._busy = False
                    if exhausted:
                        return
                    continue  # the caller drained its buffer; feed again
                if not self._busy:
                    self._busy = True
                    self._last_progress = time.monotonic()
                for out in self._step():
                    if out.finished:
                        self._last_progress = time.monotonic()
                        yield inflight.pop(out.request_id), out
        finally:
            self._busy = False
            if inflight and self._dead is None:  # interrupted: leave the engine clean
                try:
                    engine.abort_request(list(inflight))
                except Exception:  # noqa: BLE001 - best effort during shutdown
                    pass

    def generate(self, requests: Iterable[Request], sampling: SamplingConfig,
                 can_feed: Callable[[], bool]) -> Iterator[tuple[Any, list[str]]]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        kwargs = sampling_kwargs(sampling)
        if "structured_outputs" in kwargs:
            kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
        params = SamplingParams(n=sampling.samples, output_kind=RequestOutputKind.FINAL_ONLY,
                                **kwargs)
        for key, out in self._stream(requests, params, can_feed):
            outs = sorted(out.outputs, key=lambda c: c.index)
            if sampling.logprobs:
                yield key, [_sample(c) for c in outs]
            else:
                yield key, [c.text for c in outs]

    def classify(self, requests: Iterable[Request],
                 can_feed: Callable[[], bool]) -> Iterator[tuple[Any, list[float]]]:
        from vllm import PoolingParams

        # raw head outputs: no softmax/sigmoid on regression heads
        params = PoolingParams(task="classify", use_activation=False)
        for key, out in self._stream(requests, params, can_feed):
            yield key, [float(x) for x in out.outputs.data.float().tolist()]

    def _abandon(self) -> None:
        """A failed or interrupted start: kill what was spawned, keep no log."""
        from nfb.engines.guard import kill_processes

        kill_processes(list(self.guardian.records.items()), grace=1.0)
        self.guardian.release()
        if self.log is not None:
            self.log.remove()

    def close(self) -> None:
        self._closing = True
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass
        from nfb.engines.guard import kill_processes

        # whatever the shutdown left (a dead engine's workers): stop it now
        kill_processes(list(self.guardian.records.items()), grace=2.0)
        self.guardian.release()
        if self.log is not None:
            self.log.remove()
