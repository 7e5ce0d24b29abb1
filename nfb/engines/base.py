"""What the pipeline needs from an engine.

An engine turns conversations into prompt token ids (with the model's chat template, so
lengths are checked on exactly what the model will see), and streams results back as they
finish while the caller keeps feeding it. Engines know nothing of files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from nfb.config import SamplingConfig

Request = tuple[Any, list[int]]          # (caller's key, prompt token ids)


class Engine(Protocol):
    max_model_len: int

    def encode_chats(self, conversations: list[list[dict[str, str]]],
                     add_generation_prompt: bool) -> list[list[int]]:
        """Token ids of each conversation rendered with the chat template."""

    def generate(self, requests: Iterable[Request], sampling: SamplingConfig,
                 can_feed: Callable[[], bool]) -> Iterator[tuple[Any, list[str]]]:
        """(key, generated texts) as each request finishes; pulls requests lazily."""

    def classify(self, requests: Iterable[Request],
                 can_feed: Callable[[], bool]) -> Iterator[tuple[Any, list[float]]]:
        """(key, raw head outputs) as each request finishes; pulls requests lazily."""

    def close(self) -> None: ...


class ModelInfo(Protocol):
    """What `score` needs to know about the heads before it runs."""

    num_heads: int
    id2label: dict | None
