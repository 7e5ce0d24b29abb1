"""The judge task: a generative reward model (GenRM) reasons, then writes its scores.

Pure logic: no model, no files. What the model sees is the conversation so far (user and
assistant turns, the last one the user's request), then the judged response(s) in the roles
`response_1` and `response_2`, rendered by the model's *own* chat template with a generation
prompt (nvidia/Llama-3_3-Nemotron-Super-49B-GenRM, nvidia/Qwen3-Nemotron-235B-A22B-GenRM; the
roles are the ones NVIDIA's NeMo Gym `genrm_model` server sends). nfb never retypes the
template's instructions: the template ships with the model.

What comes back:
- a reasoning trace, closed by `</think>`; only the text after the last `</think>` is read;
- the scores, in either format NVIDIA's GenRMs write:
  - boxed (49B GenRM): `[The Begin of Individual Scores]\\n\\boxed{x, y}\\n[The End of
    Individual Scores]`, and for two responses `[The Begin of Ranking Score]\\n\\boxed{z}\\n
    [The End of Ranking Score]`;
  - JSON (235B GenRM): `{"score_1": x, "score_2": y, "ranking": z}` (the last such object).
- helpfulness is 1-5 (higher is better); the ranking is 1-6: 1 = response 1 is much better,
  3 = response 1 is slightly better, 4 = response 2 is slightly better, 6 = response 2 is much
  better (3.5 is the midpoint).

What the GenRM is shown of each judged response is its final answer, as NVIDIA's GenRM
environments send it (`final_answer`): a response that carries reasoning is cut after its
last `</think>`.

A text nfb cannot read gives null scores and a reason in `judge_error`; the row itself is not
an error row (it was judged; the judgement is unreadable). Several samples per row combine by
`votes` (`combine_votes`):
- `mean` (the default): each score is averaged over the samples that parsed (`judge_votes`
  says how many); no readable sample gives null. nfb reports what the model wrote: the columns
  stay on the model's scales (helpfulness 1-5, ranking 1-6), and an unreadable judgement is
  shown as one, never as a made-up middle score.
- `nvidia`: NeMo Gym's rule (resources_servers/genrm_compare/utils.py `aggregate_scores`,
  aggregator `simple_tiebreaker`; app.py `_run_single_comparison`): an unreadable sample
  counts as the fallback values (score 3.0 each, ranking 3.5: configs/genrm_compare.yaml
  default_score, default_ranking), and on each sample whose two scores are equal the ranking
  breaks the tie, score_1 += 3.5 - ranking, score_2 -= 3.5 - ranking; then every sample is
  averaged. This serves RL, where every rollout needs a number; the helpfulness columns may
  then leave 1-5. NeMo Gym first retries an unreadable judgement up to 3 times
  (genrm_parse_retries); nfb does not generate more than --samples, so a failed sample falls
  back at once (more --samples plays the retries' part).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from statistics import fmean

import pyarrow as pa

from nfb.config import SamplingConfig
from nfb.errors import UsageError
from nfb.prompts import Prompt
from nfb.records import Conversation
from nfb.tasks.base import Task

DEFAULT_MODEL = "nvidia/Llama-3_3-Nemotron-Super-49B-GenRM"

# Sampling NVIDIA uses for its GenRMs (NeMo Gym configs/genrm_compare.yaml:
# temperature 0.6, top_p 0.95, max_output_tokens 16384)
TEMPERATURE = 0.6
TOP_P = 0.95
MAX_TOKENS = 16384

HELPFULNESS = (1.0, 5.0)
RANKING = (1.0, 6.0)
RANKING_MIDPOINT = 3.5

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_INDIVIDUAL = re.compile(
    r"\[The Begin of Individual Scores\](.*?)\[The End of Individual Scores\]", re.DOTALL)
_RANKING = re.compile(r"\[The Begin of Ranking Score\](.*?)\[The End of Ranking Score\]",
                      re.DOTALL)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


# What a GenRM is shown of a response that reasons: NeMo-RL
# nemo_rl/environments/genrm_rlhf_environment.py (GenRMEnvironment, reasoning_split_word
# "</think>"): `if "</think>" in response: response = response.split("</think>")[-1].lstrip()`;
# NeMo Gym resources_servers/genrm_compare/app.py `_run_single_comparison` sends
# utils.extract_output_text(response), the answer without the reasoning, or
# EMPTY_OUTPUT_PLACEHOLDER "None" when that is empty.
EMPTY_ANSWER = "None"


def final_answer(response: str) -> str:
    """The final answer of a judged response: after its last `</think>` (left-stripped), or
    "None" when nothing is left (NeMo Gym's placeholder)."""
    if _THINK_CLOSE in response:
        response = response.split(_THINK_CLOSE)[-1].lstrip()
    return response if response.strip() else EMPTY_ANSWER


VOTES = ("mean", "nvidia")
DEFAULT_VOTES = "mean"
# NeMo Gym resources_servers/genrm_compare/configs/genrm_compare.yaml: the values a judgement
# that cannot be parsed counts as (after genrm_parse_retries: 3)
NVIDIA_DEFAULT_SCORE = 3.0
NVIDIA_DEFAULT_RANKING = RANKING_MIDPOINT


def combine_votes(samples: list[dict | None], names: tuple[str, ...], votes: str,
                  fallback: dict[str, float]) -> dict[str, float | None]:
    """Each score of a row from its samples (None: a sample that did not parse), by `votes`
    (see the module). `fallback`: what an unreadable sample counts as under `nvidia`."""
    if votes == "mean":
        parsed = [x for x in samples if x is not None]
        return {n: fmean(x[n] for x in parsed) if parsed else None for n in names}
    if votes != "nvidia":
        raise ValueError(f"votes {votes!r}: use {' or '.join(VOTES)}")
    counted = []
    for x in samples:
        x = dict(fallback if x is None else x)
        if "ranking" in x and x["helpfulness_1"] == x["helpfulness_2"]:
            adjustment = RANKING_MIDPOINT - x["ranking"]     # NeMo Gym simple_tiebreaker
            x["helpfulness_1"] += adjustment
            x["helpfulness_2"] -= adjustment
        counted.append(x)
    return {n: fmean(x[n] for x in counted) for n in names}


class Unreadable(ValueError):
    """A judgement nfb cannot read; the message is the reason (`code:detail`)."""


def final_part(text: str, reasons: bool = False) -> str:
    """The text after the reasoning: after the last `</think>`.

    A text that opens `<think>` and never closes it stopped while reasoning (usually at
    --max-tokens); so did any text without `</think>` from a model that always reasons
    (`reasons`: every GenRM nfb knows; its template may open `<think>` itself, so the text
    need not hold it). Reading such a text would take a draft in the reasoning for the
    scores. Only an unknown model's text without any think tag is read whole."""
    if _THINK_CLOSE in text:
        return text.rsplit(_THINK_CLOSE, 1)[1].strip()
    if reasons or _THINK_OPEN in text:
        raise Unreadable("unfinished_reasoning:no </think> (cut off at --max-tokens?)")
    return text.strip()


def _number(raw: object, what: str, bounds: tuple[float, float]) -> float:
    if isinstance(raw, bool):
        raise Unreadable(f"not_a_number:{what} {raw!r}")
    if isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, str) and _NUMBER.fullmatch(raw.strip()):
        value = float(raw.strip())
    else:
        raise Unreadable(f"not_a_number:{what} {str(raw)[:40]!r}")
    if not math.isfinite(value) or not bounds[0] <= value <= bounds[1]:
        raise Unreadable(f"out_of_range:{what} {raw} (not {bounds[0]:g}-{bounds[1]:g})")
    return value


def _boxed(section: str, what: str) -> list[str]:
    """The values in a block: `\\boxed{x, y}`, or one `\\boxed{}` a value."""
    found = _BOXED.findall(section)
    if len(found) == 1:
        return [v.strip() for v in found[0].split(",")]
    if len(found) > 1 and all("," not in f for f in found):
        return [f.strip() for f in found]
    raise Unreadable(f"bad_{what}:{len(found)} \\boxed{{}} in the {what} block")


def _from_boxed(text: str) -> tuple[list[str], str | None] | None:
    """(individual score strings, ranking string or None) from the last Individual Scores
    block and the Ranking Score block after it, or None."""
    blocks = list(_INDIVIDUAL.finditer(text))
    if not blocks:
        return None
    last = blocks[-1]
    scores = _boxed(last.group(1), "scores")
    ranks = _RANKING.findall(text, last.end())
    if not ranks:
        return scores, None
    rank = _boxed(ranks[-1], "ranking")
    if len(rank) != 1:
        raise Unreadable(f"bad_ranking:{len(rank)} values in the ranking block")
    return scores, rank[0]


def _from_json(text: str) -> tuple[list[object], object | None] | None:
    """(individual scores, ranking or None) from the last JSON object holding score_1."""
    decoder = json.JSONDecoder()
    start, tries = text.rfind("{"), 0
    while start != -1 and tries < 500:   # bounded: a long code answer has many braces
        tries += 1
        try:
            obj, _ = decoder.raw_decode(text, start)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "score_1" in obj:
            scores = [obj["score_1"]] + ([obj["score_2"]] if "score_2" in obj else [])
            return scores, obj.get("ranking")
        start = text.rfind("{", 0, start)
    return None


@dataclass(frozen=True)
class Judgement:
    helpfulness: tuple[float, ...]    # one per judged response
    ranking: float | None             # two responses: 1-6


def parse_judgement(text: str | None, responses: int, reasons: bool = False) -> Judgement:
    """The scores in one generated text, for `responses` (1 or 2) judged responses
    (`reasons`: the model always reasons first, see `final_part`).

    Raises Unreadable with the reason when the text holds no readable scores."""
    if not text or not text.strip():
        raise Unreadable("empty:the model wrote nothing")
    final = final_part(text, reasons)
    got = _from_boxed(final) or _from_json(final)
    if got is None:
        raise Unreadable("no_scores:no [The Begin of Individual Scores] block or score JSON "
                         "after the reasoning")
    raw_scores, raw_rank = got
    if len(raw_scores) != responses:
        raise Unreadable(f"wrong_count:{len(raw_scores)} score(s) for {responses} response(s)")
    names = ["helpfulness"] if responses == 1 else ["helpfulness_1", "helpfulness_2"]
    scores = tuple(_number(s, n, HELPFULNESS) for s, n in zip(raw_scores, names))
    ranking = None
    if responses == 2:
        if raw_rank is None:
            raise Unreadable("no_ranking:two responses but no ranking score")
        ranking = _number(raw_rank, "ranking", RANKING)
    return Judgement(scores, ranking)


def preferred(ranking: float | None) -> int | None:
    """1 or 2: the response the ranking prefers; None for no ranking or exactly the midpoint."""
    if ranking is None or ranking == RANKING_MIDPOINT:
        return None
    return 1 if ranking < RANKING_MIDPOINT else 2


@dataclass(frozen=True)
class JudgeColumns:
    """Names and types of the columns the judge task adds (before --prefix)."""

    responses: int = 1     # 1: one response judged; 2: two responses and their ranking
    samples: int = 1
    reasons: bool = False  # the model always reasons first (every GenRM nfb knows)
    votes: str = DEFAULT_VOTES

    @property
    def fallback(self) -> dict[str, float]:
        """What an unreadable sample counts as under votes=nvidia (NeMo Gym's defaults)."""
        if self.responses == 1:
            return {"helpfulness": NVIDIA_DEFAULT_SCORE}
        return {"helpfulness_1": NVIDIA_DEFAULT_SCORE, "helpfulness_2": NVIDIA_DEFAULT_SCORE,
                "ranking": NVIDIA_DEFAULT_RANKING}

    @property
    def scores(self) -> tuple[str, ...]:
        return ("helpfulness",) if self.responses == 1 else (
            "helpfulness_1", "helpfulness_2", "ranking")

    def schema(self, prefix: str = "") -> pa.Schema:
        fields = [pa.field(prefix + s, pa.float64()) for s in self.scores]
        if self.responses == 2:
            fields.append(pa.field(prefix + "preferred", pa.int8()))
        fields += [pa.field(prefix + "judgement", pa.string()),
                   pa.field(prefix + "judge_error", pa.string())]
        if self.samples > 1:
            fields += [pa.field(prefix + "judge_votes", pa.int16()),
                       pa.field(prefix + "judgements", pa.list_(pa.string()))]
            fields += [pa.field(prefix + s + "_samples", pa.list_(pa.float64()))
                       for s in self.scores]
        return pa.schema(fields)

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(self.schema().names)

    def empty(self) -> dict:
        """All columns null (an error row; the start of every row's values)."""
        return dict.fromkeys(self.names)

    def values(self, texts: list[str]) -> dict:
        """Column values of one row from its generated texts (one per sample)."""
        per_sample: list[dict | None] = []
        reasons: list[str] = []
        for text in texts:
            try:
                j = parse_judgement(text, self.responses, self.reasons)
            except Unreadable as e:
                per_sample.append(None)
                reasons.append(str(e))
                continue
            values = list(j.helpfulness) + ([j.ranking] if self.responses == 2 else [])
            per_sample.append(dict(zip(self.scores, values)))
        parsed = [s for s in per_sample if s is not None]
        out = self.empty()
        out.update(combine_votes(per_sample, self.scores, self.votes, self.fallback))
        if self.responses == 2:
            out["preferred"] = preferred(out["ranking"])
        # the judgement behind the scores: the first sample that parsed
        shown = next((t for t, p in zip(texts, per_sample) if p is not None), texts[0])
        out["judgement"] = _shown(shown)
        if not parsed:
            out["judge_error"] = reasons[0] if len(texts) == 1 else (
                f"{reasons[0].split(':', 1)[0]}:no sample of {len(texts)} readable; first: "
                f"{reasons[0]}")
        if self.samples > 1:
            out["judge_votes"] = len(parsed)
            out["judgements"] = [_shown(t) for t in texts]
            for name in self.scores:
                out[name + "_samples"] = [s[name] if s else None for s in per_sample]
        return out


def _shown(text: str) -> str:
    """What `judgement` keeps: the text after the reasoning (the analysis and the scores), or
    the whole text when the reasoning never closed (so the user can see why)."""
    try:
        return final_part(text)
    except Unreadable:
        return text


def judge_messages(conv: Conversation, responses: tuple[str, ...]) -> list[dict[str, str]]:
    """The conversation so far, then the final answer of each judged response in its own role
    (response_1, ...)."""
    return [*conv.context, *({"role": f"response_{i}", "content": final_answer(r)}
                             for i, r in enumerate(responses, 1))]


REASONING_NOTE = ("response_reasoning_left_out: a judged response carries reasoning (</think>); "
                  "the GenRM is shown its final answer only, as NVIDIA's GenRM environments do "
                  "(NeMo Gym genrm_compare, NeMo-RL genrm_rlhf_environment)")


def reasoning_notes(responses) -> tuple[str, ...]:
    return ("response_reasoning_left_out",) if any(_THINK_CLOSE in r for r in responses) else ()


def check_template(tokenizer, responses: int) -> str | None:
    """Why this tokenizer's chat template cannot serve a GenRM (None when it can): it must
    render the judged responses in the roles response_1 (and response_2)."""
    marks = [f"nfb-probe-response-{i}" for i in range(1, responses + 1)]
    probe = [{"role": "user", "content": "nfb-probe-prompt"},
             *({"role": f"response_{i}", "content": m} for i, m in enumerate(marks, 1))]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template that refuses the roles, or none at all
        return (f"its chat template cannot render the roles response_1/response_2 that a GenRM "
                f"reads ({' '.join(str(e).split())[:160]})")
    if any(m not in text for m in marks):
        return "its chat template drops the judged response(s) in the roles response_1/response_2"
    return None


VOTE_TEXT = {"mean": "mean over the samples that parsed",
             "nvidia": "NeMo Gym aggregate_scores (simple_tiebreaker): unreadable samples count "
                       "as 3.0/3.0/3.5, equal scores broken by the ranking, then the mean"}
SHOWN = "final answer: after the last </think>, 'None' when empty (NeMo Gym, NeMo-RL)"

PARSER_VERSION = 1   # in the fingerprint: a resumed run never mixes two ways of reading


class JudgeTask(Task):
    """`nfb judge`: a GenRM reasons about one response (helpfulness 1-5) or two (each one's
    helpfulness and a 1-6 ranking), then writes its scores; nfb reads them.

    `fields` names the input fields judged (recorded as the roles they fill)."""

    name = "judge"
    runner = "generate"

    note_texts = {"response_reasoning_left_out": REASONING_NOTE}
    tallied = ("judge_error",)

    def __init__(self, sampling: SamplingConfig, fields: tuple[str, ...] = ("response",),
                 recipe=None, context_limit: int | None = None, votes: str = DEFAULT_VOTES):
        if votes not in VOTES:
            raise UsageError(f"--votes {votes!r}: use {' or '.join(VOTES)}")
        if len(fields) not in (1, 2):
            raise ValueError("a GenRM judges one response or two")
        self.sampling = sampling
        self.fields = tuple(fields)
        self.responses = len(fields)
        self.recipe = recipe          # nfb.models.recipes.Recipe, when the model is known
        self.context_limit = context_limit
        # every GenRM nfb knows reasons first: a text without </think> was cut off
        self.votes = votes
        self.columns = JudgeColumns(self.responses, sampling.samples, reasons=recipe is not None,
                                    votes=votes)

    def schema(self, prefix: str) -> pa.Schema:
        return self.columns.schema(prefix)

    def check_conversation(self, conv: Conversation) -> str | None:
        """A GenRM reads a history whose last turn is the user's request."""
        if not conv.context or conv.context[-1].get("role") != "user":
            return "bad_messages:the turn before the judged response is not from the user"
        return None

    def row_notes(self, conv: Conversation) -> tuple[str, ...]:
        return reasoning_notes(conv.alternatives or (conv.response,))

    def check_tokenizer(self, tokenizer) -> None:
        """Once the engine's tokenizer is known (hub ids too): a template that cannot show
        the judged responses would judge nothing, so the run stops (exit 2)."""
        why = check_template(tokenizer, self.responses)
        if why:
            raise UsageError(f"{why}: is this a generative reward model?")

    def prompts(self, conv: Conversation, row: dict | None = None) -> list[Prompt]:
        judged = conv.alternatives or (conv.response,)
        return [Prompt(messages=judge_messages(conv, judged), add_generation_prompt=True)]

    def prompt_budget(self, max_model_len: int) -> int:
        budget = max_model_len - self.sampling.max_tokens
        return min(budget, self.context_limit) if self.context_limit else budget

    def parse(self, outputs: list[list[str]]) -> dict:
        return self.columns.values(outputs[0])

    def empty_values(self) -> dict:
        return self.columns.empty()

    def tally(self, values: dict):
        """Rows with no readable judgement."""
        return (("unreadable", None),) if values.get("judge_error") is not None else ()

    def settings(self) -> dict:
        out = {"responses": {f"response_{i}": f for i, f in enumerate(self.fields, 1)},
               "sampling": self.sampling.settings(), "context_limit": self.context_limit,
               "scales": {"helpfulness": list(HELPFULNESS), "ranking": list(RANKING)},
               "votes": VOTE_TEXT[self.votes], "parser": PARSER_VERSION,
               "needs_reasoning": self.columns.reasons, "responses_shown": SHOWN}
        if self.recipe is not None:
            out.update(recipe=self.recipe.name, card=self.recipe.card)
        return out
