"""The principle task: reward = logit("Yes") - logit("No") after a user turn that asks whether
the response satisfies a principle (nvidia/Llama-3.3-Nemotron-70B-Reward-Principle, card:
https://huggingface.co/nvidia/Llama-3.3-Nemotron-70B-Reward-Principle).

Pure logic. One request per principle; all requests of a row share the conversation prefix
(prefix caching makes the extra principles cheap). The engine returns one value per request:
vLLM's `from_2_way_softmax` head W[Yes] - W[No], read with no activation, is the raw
difference of the two logits.
"""

from __future__ import annotations

import math
import re

from nfb.errors import UsageError
from nfb.prompts import Prompt
from nfb.tasks.reward import weighted_reward

_SLUG = re.compile(r"[^a-z0-9]+")


def principle_columns(principles: list[str]) -> list[str]:
    """One column per principle: principle_<slug> (letters and digits, at most 40)."""
    names = []
    for p in principles:
        slug = _SLUG.sub("_", p.lower()).strip("_")[:40].rstrip("_") or "x"
        names.append("principle_" + slug)
    seen = set()
    for n, p in zip(names, principles):
        if n in seen:
            raise UsageError(f"--principle {p!r} gives the column name {n} twice; make the "
                             "principles differ in their first words")
        seen.add(n)
    return names


class PrincipleTask:
    """`nfb score` with a principle model.

    - `principles` (from --principle): the same principles for every row; one column per
      principle and `reward`, their weighted sum (one principle: weight 1).
    - `principle_field` (from --principle-field): each row's own principle, read from that
      field; the one column is `reward`.
    """

    name = "score"
    runner = "pooling"
    sampling = None

    def __init__(self, *, principles: list[str] | None = None, principle_field: str | None = None,
                 weights: list[float] | None = None, question: str = "",
                 recipe: str | None = None, context_limit: int | None = None):
        if bool(principles) == bool(principle_field):
            raise UsageError("give either --principle (once per principle) or "
                             "--principle-field, not both")
        self.principles = list(principles or [])
        self.principle_field = principle_field
        self.columns = principle_columns(self.principles) if self.principles else []
        if self.principles and weights is None:
            if len(self.principles) > 1:
                raise UsageError(
                    f"{len(self.principles)} principles ({', '.join(self.columns)}): say how they "
                    "combine into `reward` with --weights (e.g. "
                    f"'{self.columns[0]}=1,{self.columns[1]}=1')")
            weights = [1.0]
        self.weights = weights
        self.question = question
        self.recipe = recipe
        self.context_limit = context_limit
        # the input fields each row needs besides the conversation (see the pipeline)
        self.row_fields: tuple[str, ...] = (principle_field,) if principle_field else ()
        # requests per response (nfb.tasks.multi wraps this task for several responses a row)
        self.requests_per_conversation = len(self.principles) or 1

    def schema(self, prefix: str):
        import pyarrow as pa

        fields = [pa.field(prefix + c, pa.float64()) for c in self.columns]
        return pa.schema([*fields, pa.field(prefix + "reward", pa.float64())])

    def _prompt(self, conv, principle: str) -> Prompt:
        return Prompt(messages=[*conv.messages(),
                                {"role": "user",
                                 "content": self.question.format(principle=principle)}],
                      add_generation_prompt=True)

    def check_row(self, row: dict) -> str | None:
        """An error code when the row's principle field is unusable (per-row principles)."""
        from nfb.records import field_error

        return field_error(row, self.principle_field) if self.principle_field else None

    def prompts(self, conv, row: dict | None = None) -> list[Prompt]:
        if self.principle_field:
            if row is None:
                raise UsageError("--principle-field needs a pipeline that passes row fields")
            return [self._prompt(conv, row[self.principle_field])]
        return [self._prompt(conv, p) for p in self.principles]

    def prompt_budget(self, max_model_len: int) -> int:
        return min(max_model_len, self.context_limit or max_model_len)

    def parse(self, outputs: list[list[float]]) -> dict:
        values = [float(o[0]) for o in outputs]
        if self.principle_field:
            return {"reward": values[0]}
        out = dict(zip(self.columns, values, strict=True))
        out["reward"] = weighted_reward(values, self.weights)
        if not math.isfinite(out["reward"]):
            out["reward"] = None
        return out

    def empty_values(self) -> dict:
        return {**{c: None for c in self.columns}, "reward": None}

    def settings(self) -> dict:
        return {"recipe": self.recipe, "prompt": self.question,
                "principles": dict(zip(self.columns, self.principles)) or None,
                "principle_field": self.principle_field,
                "weights": dict(zip(self.columns, self.weights)) if self.principles else None,
                "score": "logit(Yes) - logit(No)", "context_limit": self.context_limit}
