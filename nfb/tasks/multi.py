"""Several responses per row: each is judged or scored on its own, in one pass.

`--response-field chosen --response-field rejected` gives per-response columns
(`chosen_reward`, `rejected_reward`, `chosen_feedback_level`, ...), so RewardBench- and
HH-RLHF-shaped data need no reshaping. `--responses-field responses` (a list per row, as in
UltraFeedback) gives list columns aligned with it (`responses_reward`, ...). The responses of
a row share the prompt, so the engine's prefix cache serves the shared part once.
"""

from __future__ import annotations

import pyarrow as pa

from nfb.prompts import Prompt
from nfb.records import Conversation
from nfb.tasks.base import Task


class MultiResponse(Task):
    """Wraps a one-response task (feedback or score) for rows with several responses."""

    def __init__(self, inner, names: tuple[str, ...] = (), list_field: str | None = None):
        if bool(names) == bool(list_field):
            raise ValueError("give response field names or one list field")
        self.inner = inner
        self.names = tuple(names)
        self.list_field = list_field
        self.name = inner.name
        self.runner = inner.runner
        self.sampling = inner.sampling
        self.per_response = inner.requests_per_conversation

    def schema(self, prefix: str) -> pa.Schema:
        inner = self.inner.schema("")
        if self.list_field:
            return pa.schema([pa.field(f"{prefix}{self.list_field}_{f.name}", pa.list_(f.type))
                              for f in inner])
        return pa.schema([pa.field(f"{prefix}{n}_{f.name}", f.type)
                          for n in self.names for f in inner])

    @property
    def row_fields(self) -> tuple[str, ...]:
        return self.inner.row_fields

    def check_row(self, row: dict) -> str | None:
        return self.inner.check_row(row)

    @property
    def note_texts(self) -> dict[str, str]:
        return self.inner.note_texts

    def row_notes(self, conv: Conversation) -> tuple[str, ...]:
        """The inner task's notes, once a row (its responses share the conversation)."""
        return self.inner.row_notes(conv)

    def prompts(self, conv: Conversation, row: dict | None = None) -> list[Prompt]:
        out: list[Prompt] = []
        for response in conv.alternatives or (conv.response,):
            one = conv.with_response(response)
            got = self.inner.prompts(one, row=row) if self.row_fields else self.inner.prompts(one)
            assert len(got) == self.per_response
            out.extend(got)
        return out

    def prompt_budget(self, max_model_len: int) -> int:
        return self.inner.prompt_budget(max_model_len)

    def _each(self, outputs: list) -> list[dict]:
        k = self.per_response
        return [self.inner.parse(outputs[i:i + k]) for i in range(0, len(outputs), k)]

    def parse(self, outputs: list) -> dict:
        values = self._each(outputs)
        if self.list_field:
            keys = self.inner.schema("").names
            return {f"{self.list_field}_{key}": [v[key] for v in values] for key in keys}
        return {f"{n}_{key}": value for n, v in zip(self.names, values, strict=True)
                for key, value in v.items()}

    def empty_values(self) -> dict:
        if self.list_field:
            return {f"{self.list_field}_{key}": None for key in self.inner.schema("").names}
        empty = self.inner.empty_values()
        return {f"{n}_{key}": value for n in self.names for key, value in empty.items()}

    @property
    def tallied(self) -> tuple[str, ...]:
        """The inner task's tallied values, under each response's column."""
        fields = (self.list_field,) if self.list_field else self.names
        return tuple(f"{n}_{key}" for n in fields for key in self.inner.tallied)

    def tally(self, values: dict):
        """The inner task's tally of each response's values."""
        keys = self.inner.tallied
        if not keys:
            return
        if self.list_field:
            lists = [values.get(f"{self.list_field}_{key}") or [] for key in keys]
            for i in range(max(map(len, lists), default=0)):
                yield from self.inner.tally({key: (lst[i] if i < len(lst) else None)
                                             for key, lst in zip(keys, lists)})
            return
        for n in self.names:
            yield from self.inner.tally({key: values.get(f"{n}_{key}") for key in keys})

    def settings(self) -> dict:
        return {**self.inner.settings(),
                "responses": list(self.names) if self.names else {"list": self.list_field}}
