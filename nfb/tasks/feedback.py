"""The feedback task: the evaluation turn, level parsing and sample aggregation.

Pure logic: no model, no files. The evaluation instruction is the model card's text of
nvidia/Llama-3.3-Nemotron-70B-Feedback, verbatim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from statistics import fmean

import pyarrow as pa

from nfb.config import SamplingConfig
from nfb.prompts import Prompt
from nfb.records import Conversation
from nfb.tasks.base import Task

DEFAULT_MODEL = "nvidia/Llama-3.3-Nemotron-70B-Feedback"

EVAL_PROMPT = (
    "Evaluate the response to the previous prompt in terms of how helpful it is overall. "
    "Start the evaluation with the statement - The response is {not / slightly / partially / "
    "mostly / perfectly} helpful. Then provide a brief explanation of the evaluation in 2 to 10 "
    "sentences."
)

LEVELS: dict[str, int] = {"not": 1, "slightly": 2, "partially": 3, "mostly": 4, "perfectly": 5}
LABELS: dict[int, str] = {v: k for k, v in LEVELS.items()}

# "The response is mostly helpful", any case, any run of whitespace between the words.
_STATEMENT = re.compile(
    r"\bthe\s+response\s+is\s+(not|slightly|partially|mostly|perfectly)\s+helpful\b",
    re.IGNORECASE,
)
# What may stand before the statement and still count as "starting with" it: whitespace,
# quotes, markdown emphasis/headings, list markers.
_LEAD = re.compile(r"[\s\"'*_#>`\-:]*")

# Regex for guided decoding (--constrain-level): the statement, then free text.
CONSTRAINED_PREFIX = r"The response is (not|slightly|partially|mostly|perfectly) helpful\."
CONSTRAINED_REGEX = CONSTRAINED_PREFIX + r"[\s\S]*"


def parse_level(text: str | None) -> int | None:
    """Return the helpfulness level 1-5 stated in a feedback text, or None.

    The card asks the model to *start* with "The response is X helpful". That leading
    statement wins. Without one, a statement elsewhere counts only if every statement in the
    text names the same level; a text that names two different levels is ambiguous (None).
    """
    if not text:
        return None
    matches = list(_STATEMENT.finditer(text))
    if not matches:
        return None
    first = matches[0]
    if _LEAD.fullmatch(text, 0, first.start()):
        return LEVELS[first.group(1).lower()]
    levels = {m.group(1).lower() for m in matches}
    if len(levels) == 1:
        return LEVELS[levels.pop()]
    return None


def label_of(level: int | None) -> str | None:
    return LABELS.get(level) if level is not None else None


def eval_messages(conv: Conversation, instruction: str = EVAL_PROMPT) -> list[dict[str, str]]:
    """The conversation the feedback model sees: context, the judged response, then EVAL."""
    return [*conv.context, {"role": "assistant", "content": conv.response},
            {"role": "user", "content": instruction}]


@dataclass(frozen=True)
class FeedbackColumns:
    """Names and types of the columns the feedback task adds (before --prefix)."""

    samples: int = 1

    def schema(self, prefix: str = "") -> pa.Schema:
        fields = [
            pa.field(prefix + "feedback", pa.string()),
            pa.field(prefix + "feedback_level", pa.int8()),
            pa.field(prefix + "feedback_label", pa.string()),
        ]
        if self.samples > 1:
            fields += [
                pa.field(prefix + "feedback_samples", pa.list_(pa.string())),
                pa.field(prefix + "feedback_levels", pa.list_(pa.int8())),
                pa.field(prefix + "feedback_level_mean", pa.float64()),
            ]
        return pa.schema(fields)


def feedback_values(texts: list[str] | None, samples: int) -> dict[str, object]:
    """Column values for one row from its generated texts (None for an error row)."""
    if texts is None:
        out: dict[str, object] = {"feedback": None, "feedback_level": None, "feedback_label": None}
        if samples > 1:
            out.update(feedback_samples=None, feedback_levels=None, feedback_level_mean=None)
        return out
    levels = [parse_level(t) for t in texts]
    out = {"feedback": texts[0], "feedback_level": levels[0], "feedback_label": label_of(levels[0])}
    if samples > 1:
        parsed = [lv for lv in levels if lv is not None]
        out.update(
            feedback_samples=list(texts),
            feedback_levels=levels,
            feedback_level_mean=fmean(parsed) if parsed else None,
        )
    return out


class FeedbackTask(Task):
    """`nfb feedback`: generate an evaluation per row, parse its helpfulness level."""

    name = "feedback"
    runner = "generate"
    tallied = ("feedback_level",)

    def __init__(self, sampling: SamplingConfig, instruction: str = EVAL_PROMPT,
                 recipe=None):
        self.sampling = sampling
        self.instruction = instruction
        self.recipe = recipe          # nfb.models.recipes.Recipe, when the model is known
        self.columns = FeedbackColumns(sampling.samples)

    def schema(self, prefix: str) -> pa.Schema:
        return self.columns.schema(prefix)

    def prompts(self, conv: Conversation, row: dict | None = None) -> list[Prompt]:
        return [Prompt(messages=eval_messages(conv, self.instruction),
                       add_generation_prompt=True)]

    def prompt_budget(self, max_model_len: int) -> int:
        return max_model_len - self.sampling.max_tokens

    def parse(self, outputs: list[list[str]]) -> dict:
        return feedback_values(outputs[0], self.sampling.samples)

    def empty_values(self) -> dict:
        return feedback_values(None, self.sampling.samples)

    def tally(self, values: dict):
        """Rows per feedback level (the first sample's)."""
        level = values.get("feedback_level")
        return (("levels", level),) if level is not None else ()

    def settings(self) -> dict:
        out = {"prompt": self.instruction, "sampling": self.sampling.settings(), "levels": LEVELS}
        if self.recipe is not None:
            out.update(recipe=self.recipe.name, card=self.recipe.card)
        return out
