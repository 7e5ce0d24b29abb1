"""What a task is to the pipeline: the conversation it sends, the columns it adds."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import pyarrow as pa

from nfb.engines.base import Engine, Request
from nfb.records import Conversation


class Task(Protocol):
    name: str
    prompt: str | None                 # extra instruction sent to the model (provenance)
    add_generation_prompt: bool

    def schema(self, prefix: str) -> pa.Schema:
        """The columns this task adds (without nfb_row/nfb_error)."""

    def messages(self, conv: Conversation) -> list[dict[str, str]]:
        """The chat the model sees for one row."""

    def prompt_budget(self, max_model_len: int) -> int:
        """Most prompt tokens a row may have."""

    def run(self, engine: Engine, requests: Iterable[Request],
            can_feed: Callable[[], bool]) -> Iterator[tuple[Any, dict]]:
        """(key, column values) per finished request."""

    def empty_values(self) -> dict:
        """Column values of an error row (all null)."""

    def settings(self) -> dict:
        """Task settings for the provenance metadata."""
