"""What the pipeline needs from an engine.

An engine holds a loaded model and its tokenizer, takes requests as prompt token ids (the
pipeline renders and length-checks them), and streams results back as they finish while the
caller keeps feeding it. Engines know nothing of files or tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from nfb.config import SamplingConfig

# (caller's key, prompt token ids); the requests of one row have tuple keys that differ only
# in their last element (the pipeline's (chunk, row, request)): replicas keep them together
Request = tuple[Any, list[int]]


class Engine:
    """The engine contract. nfb's engines subclass it; the defaults are those of one engine
    in this process, and an engine overrides what it does differently.

    Required: `max_model_len`, `tokenizer`, and `generate` or `classify` for the runners it
    serves. The rest (replicas, restarts an engine does itself, its processes, cluster
    counts, running the whole row pipeline itself) are declared here once, so the run reads
    them instead of probing an engine's shape.
    """

    max_model_len: int
    tokenizer: Any                       # a Hugging Face tokenizer (chat template, encode)
    data_parallel: int = 1               # model replicas behind this engine (-dp, Ray)
    restarts_used: int = 0               # engine restarts the engine did itself (replicas)
    run_counts: dict | None = None       # cluster counts for the summary (Ray)
    streams_rows: bool = False           # True: `stream_rows` runs the row pipeline (Ray)

    def generate(self, requests: Iterable[Request], sampling: SamplingConfig,
                 can_feed: Callable[[], bool]) -> Iterator[tuple[Any, list[str]]]:
        """(key, generated texts) as each request finishes; pulls requests lazily."""
        raise NotImplementedError(f"{type(self).__name__} does not generate")

    def classify(self, requests: Iterable[Request],
                 can_feed: Callable[[], bool]) -> Iterator[tuple[Any, list[float]]]:
        """(key, raw head outputs) as each request finishes; pulls requests lazily."""
        raise NotImplementedError(f"{type(self).__name__} does not classify")

    def stream_rows(self, cfg, task, collector, done, sink, poll_total, *, budget: int,
                    preparer, check_columns=None, set_total=None) -> None:
        """Read, prepare, score and collect every row not done (`streams_rows` engines; the
        engine's workers read the inputs, so it checks their columns and gives the total)."""
        raise NotImplementedError(f"{type(self).__name__} does not stream rows")

    def pids(self) -> list[tuple[int, float]]:
        """(pid, start time) of the engine's processes: a killed run's leftovers are stopped
        by the next run."""
        return []

    def merge_counts(self, engines: list[Engine]) -> dict:
        """The run's `run_counts` over every engine it started (a restart starts another):
        by default the last engine's; an engine with counts to add up overrides it."""
        return dict(engines[-1].run_counts or {})

    def set_note(self, note: Callable[[str], None]) -> None:
        """Where to say something mid-run (e.g. that a replica restarts)."""

    def close(self) -> None:
        pass


class Plugged(Engine):
    """An engine plugged in through `register_engine` that does not subclass `Engine`:
    its own methods, and the contract's defaults for what it lacks."""

    def __init__(self, inner: Any):
        self.inner = inner

    # read from the engine each time (a replica set counts its restarts as they happen)
    data_parallel = property(lambda self: getattr(self.inner, "data_parallel", 1))
    restarts_used = property(lambda self: getattr(self.inner, "restarts_used", 0))
    run_counts = property(lambda self: getattr(self.inner, "run_counts", None))
    # an engine of its own with a `stream_rows` method (and no `streams_rows`) streams rows
    streams_rows = property(lambda self: bool(getattr(
        self.inner, "streams_rows", callable(getattr(self.inner, "stream_rows", None)))))

    def __getattr__(self, name: str):       # tokenizer, max_model_len, the engine's own
        return getattr(self.inner, name)

    def generate(self, requests, sampling, can_feed):
        return self.inner.generate(requests, sampling, can_feed)

    def classify(self, requests, can_feed):
        return self.inner.classify(requests, can_feed)

    def stream_rows(self, *args, **kwargs) -> None:
        self.inner.stream_rows(*args, **kwargs)

    def pids(self) -> list[tuple[int, float]]:
        return self.inner.pids() if callable(getattr(self.inner, "pids", None)) else []

    def merge_counts(self, engines: list[Engine]) -> dict:
        if callable(getattr(self.inner, "merge_counts", None)):
            return self.inner.merge_counts(engines)
        return super().merge_counts(engines)

    def set_note(self, note: Callable[[str], None]) -> None:
        if callable(getattr(self.inner, "set_note", None)):
            self.inner.set_note(note)

    def close(self) -> None:
        self.inner.close()


@dataclass(frozen=True)
class Sample:
    """One generated sample with the top-k log-probabilities of its last tokens (what
    `generate` yields per sample when `SamplingConfig.logprobs` is set)."""

    text: str
    # one {token id: log-probability} per position, for the last LOGPROB_TAIL generated
    # tokens (the sampled token is always among them)
    tail: tuple[dict[int, float], ...]


LOGPROB_TAIL = 4


def tail_sample(text: str, positions, logprob: Callable[[Any], float]) -> Sample:
    """A `Sample` from an engine's per-token log-probabilities (one {token id: entry} per
    generated token, `logprob(entry)` its value): the last LOGPROB_TAIL positions kept."""
    tail = list(positions if positions is not None else [])[-LOGPROB_TAIL:]
    return Sample(text, tuple({int(t): float(logprob(e)) for t, e in pos.items()
                               if e is not None} for pos in tail))
