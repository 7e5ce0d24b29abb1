"""What the pipeline needs from an engine.

An engine holds a loaded model and its tokenizer, takes requests as prompt token ids (the
pipeline renders and length-checks them), and streams results back as they finish while the
caller keeps feeding it. Engines know nothing of files or tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from nfb.config import SamplingConfig

# (caller's key, prompt token ids); the requests of one row have tuple keys that differ only
# in their last element (the pipeline's (chunk, row, request)): replicas keep them together
Request = tuple[Any, list[int]]


class Engine(Protocol):
    max_model_len: int
    tokenizer: Any                       # a Hugging Face tokenizer (chat template, encode)

    def generate(self, requests: Iterable[Request], sampling: SamplingConfig,
                 can_feed: Callable[[], bool]) -> Iterator[tuple[Any, list[str]]]:
        """(key, generated texts) as each request finishes; pulls requests lazily."""

    def classify(self, requests: Iterable[Request],
                 can_feed: Callable[[], bool]) -> Iterator[tuple[Any, list[float]]]:
        """(key, raw head outputs) as each request finishes; pulls requests lazily."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Sample:
    """One generated sample with the top-k log-probabilities of its last tokens (what
    `generate` yields per sample when `SamplingConfig.logprobs` is set)."""

    text: str
    # one {token id: log-probability} per position, for the last LOGPROB_TAIL generated
    # tokens (the sampled token is always among them)
    tail: tuple[dict[int, float], ...]


LOGPROB_TAIL = 4
