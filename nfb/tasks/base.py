"""What a task is to the pipeline. A task builds what the model sees and parses what comes
back; it never touches an engine (the pipeline drives it) or a data file. Building a task
(`nfb.run.setup`) reads the model's config and tokenizer once; the task itself is pure."""

from __future__ import annotations

from typing import Any, Protocol

import pyarrow as pa

from nfb.config import SamplingConfig
from nfb.prompts import Prompt
from nfb.records import Conversation


class Task(Protocol):
    name: str                          # "feedback" | "score"
    runner: str                        # the vLLM runner it needs: "generate" | "pooling"
    sampling: SamplingConfig | None    # generate: how to sample; pooling: None

    def schema(self, prefix: str) -> pa.Schema:
        """The columns this task adds (without nfb_row/nfb_error)."""

    def prompts(self, conv: Conversation) -> list[Prompt]:
        """What the model sees for one row (one request per prompt)."""

    def prompt_budget(self, max_model_len: int) -> int:
        """Most prompt tokens a request may have."""

    def parse(self, outputs: list[Any]) -> dict:
        """Column values of one row from its requests' outputs (texts or head values)."""

    def empty_values(self) -> dict:
        """Column values of an error row (all null)."""

    def settings(self) -> dict:
        """Resolved settings: fingerprinted, and written to the provenance."""
