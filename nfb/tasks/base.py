"""What a task is to the run: the contract every task subclasses.

A task builds what the model sees and parses what comes back; it never touches an engine (the
run drives it) or a data file. Building a task (`nfb.run.setup`) reads the model's config and
tokenizer once; the task itself is pure.

The run calls only what is declared here. A task overrides the abstract methods and whichever
hooks it needs; the defaults are "nothing to check, nothing to note, nothing to count".
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

import pyarrow as pa

from nfb.config import SamplingConfig
from nfb.prompts import Prompt
from nfb.records import Conversation


class Task:
    name: str = ""                       # "feedback" | "score" | "judge"
    runner: str = ""                     # the vLLM runner it needs: "generate" | "pooling"
    sampling: SamplingConfig | None = None   # generate: how to sample; pooling: None
    context_limit: int | None = None     # the model card's context, when it states one

    # input fields a row's prompts need beyond its conversation (e.g. a per-row principle):
    # when set, `prompts` gets the row (`row=`) and `check_row` checks it first
    row_fields: tuple[str, ...] = ()
    # how many requests one conversation makes (one prompt per request)
    requests_per_conversation: int = 1
    # its requests repeat a row's conversation (e.g. one per principle): the engine caches
    # the shared prefix
    shares_prefixes: bool = False
    # note code -> the one line that explains it (`row_notes` codes, said once per run)
    note_texts: dict[str, str] = {}

    # The counts the run keeps of the task's values, by the summary's name for them: "values"
    # counts rows per value (a dict in the summary), "rows" counts rows (a number). Every
    # task's summary has the same keys; a task that tallies nothing leaves them at zero.
    counts: dict[str, str] = {"levels": "values", "unreadable": "rows"}
    # the value keys `tally` reads (resume reads only these columns back); () counts nothing
    tallied: tuple[str, ...] = ()

    # --- what every task defines ---------------------------------------------------------

    def schema(self, prefix: str) -> pa.Schema:
        """The columns this task adds (without nfb_row/nfb_error)."""
        raise NotImplementedError

    def prompts(self, conv: Conversation, row: dict | None = None) -> list[Prompt]:
        """What the model sees for one row (one request per prompt); `row` when row_fields."""
        raise NotImplementedError

    def prompt_budget(self, max_model_len: int) -> int:
        """Most prompt tokens a request may have."""
        raise NotImplementedError

    def parse(self, outputs: list[Any]) -> dict:
        """Column values of one row from its requests' outputs (texts or head values)."""
        raise NotImplementedError

    def empty_values(self) -> dict:
        """Column values of an error row (all null)."""
        raise NotImplementedError

    def settings(self) -> dict:
        """Resolved settings: fingerprinted, and written to the provenance."""
        raise NotImplementedError

    # --- hooks, with their defaults ------------------------------------------------------

    def check_row(self, row: dict) -> str | None:
        """Why a row's `row_fields` cannot be used (an error reason), else None."""
        return None

    def check_conversation(self, conv: Conversation) -> str | None:
        """Why a conversation cannot be scored by this task (an error reason), else None."""
        return None

    def check_tokenizer(self, tokenizer) -> None:
        """Once the tokenizer is known: raise UsageError if it cannot serve this task."""
        return None

    def row_notes(self, conv: Conversation) -> tuple[str, ...]:
        """Codes of what the task changed on purpose in this row's input (see note_texts)."""
        return ()

    def tally(self, values: dict) -> Iterable[tuple[str, Hashable | None]]:
        """(count name, value) for each count one row's values add to; None for "rows"."""
        return ()
