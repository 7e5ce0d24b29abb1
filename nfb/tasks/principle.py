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
from nfb.tasks.base import Task
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


class PrincipleTask(Task):
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
        self.shares_prefixes = True     # every principle of a row repeats the conversation

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


# --- the generative principle reward model (nfb judge) --------------------------------------
#
# nvidia/Qwen3-Nemotron-32B-GenRM-Principle. Its card's Quick Start: messages [user, assistant,
# {"role": "principle", "content": PRINCIPLE}], apply_chat_template(add_generation_prompt=True),
# generate with output_scores, then at the final-answer position (scores[-2]: the last token is
# the end of turn) reward = clip(s[" Yes"] - max(s), -50) - clip(s[" No"] - max(s), -50).
# NVIDIA's RL environment for it, NeMo-RL nemo_rl/environments/
# principle_genrm_for_rlhf_environment.py (AsyncPrincipleGenrmWorker.verify_with_principle,
# commit 3d1a7b5e8 "split reasoning"), runs it on vLLM: SamplingParams(logprobs=20), greedy
# (temperature 0.0) and max_tokens 200 by default; a text without "Final Judgement:" gets reward
# 0.0; at position -2 it reads the log-probabilities of " Yes" and " No" among the top 20, and a
# token missing from them gives reward 0.0. Otherwise reward = logprob(Yes) - logprob(No).
#
# nfb computes the card's formula from vLLM's top-20 log-probabilities: s - max(s) is
# logprob - logprob(top token) at one position, so
#   reward = max(lp[Yes] - lp[top], -50) - max(lp[No] - lp[top], -50),
# which is NeMo-RL's logprob(Yes) - logprob(No) whenever neither is 50 below the top token. vLLM's
# log-probabilities are raw (logprobs_mode raw_logprobs: before temperature, top-k, top-p), as
# NeMo-RL reads them; the card's generate() scores pass through the repo's generation_config,
# which would divide them by its temperature if it samples (nfb samples greedily by default, as
# NeMo-RL does, where generate() applies no temperature either).
# A judgement without "Final Judgement:", or with " Yes" or " No" outside the top 20, is
# unreadable: votes "mean" (the default) gives null and says why in judge_error; votes "nvidia"
# gives NeMo-RL's 0.0.

PRINCIPLE_ROLE = "principle"
FINAL_JUDGEMENT = "Final Judgement:"
TOP_LOGPROBS = 20
CLIP = -50.0
YES_NO = (" Yes", " No")
GENRM_TEMPERATURE = 0.0      # NeMo-RL principle_genrm_for_rlhf_environment.py defaults
GENRM_MAX_TOKENS = 200
GENRM_FALLBACK = {"reward": 0.0}   # NeMo-RL's reward for an unreadable judgement


def answer_ids(tokenizer) -> tuple[int, int]:
    """The token ids of " Yes" and " No" (each must be one token, as NeMo-RL requires)."""
    ids = []
    for word in YES_NO:
        got = tokenizer.encode(word, add_special_tokens=False)
        if len(got) != 1:
            from nfb.errors import UsageError

            raise UsageError(f"{word!r} is {len(got)} tokens for this tokenizer, not one: the "
                             "Principle GenRM reads its Yes/No token; is this the right model?")
        ids.append(got[0])
    return ids[0], ids[1]


def principle_reward(sample, yes: int, no: int) -> float:
    """The card's reward from one `Sample` (text and top-20 log-probabilities of its last
    tokens). Raises Unreadable with the reason."""
    from nfb.tasks.judge import Unreadable

    if FINAL_JUDGEMENT not in sample.text:
        raise Unreadable(f"no_final_judgement:no {FINAL_JUDGEMENT!r} in the text (cut off at "
                         "--max-tokens?)")
    if len(sample.tail) < 2:
        raise Unreadable("too_short:fewer than 2 generated tokens")
    top = sample.tail[-2]
    missing = [w for w, i in zip(YES_NO, (yes, no)) if i not in top]
    if missing:
        raise Unreadable(f"not_in_top_{TOP_LOGPROBS}:{' and '.join(map(repr, missing))} not "
                         f"among the top {TOP_LOGPROBS} tokens of the final answer")
    best = max(top.values())
    return max(top[yes] - best, CLIP) - max(top[no] - best, CLIP)


def check_principle_template(tokenizer) -> str | None:
    """Why this tokenizer's chat template cannot serve the Principle GenRM (None: it can):
    it must render the principle in the role `principle`."""
    mark = "nfb-probe-principle"
    probe = [{"role": "user", "content": "nfb-probe-prompt"},
             {"role": "assistant", "content": "nfb-probe-response"},
             {"role": PRINCIPLE_ROLE, "content": mark}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template that refuses the role
        return (f"its chat template cannot render the role {PRINCIPLE_ROLE!r} that the "
                f"Principle GenRM reads ({' '.join(str(e).split())[:160]})")
    if mark not in text:
        return f"its chat template drops the {PRINCIPLE_ROLE!r} turn"
    return None


class PrincipleJudgeTask(Task):
    """`nfb judge` with nvidia/Qwen3-Nemotron-32B-GenRM-Principle: the model reasons about
    whether the response satisfies a principle and ends "Final Judgement: Yes/No"; `reward`
    is the card's Yes-minus-No score at that answer (see above).

    `principle` (one for every row) or `principle_field` (each row's own)."""

    name = "judge"
    runner = "generate"
    tallied = ("judge_error",)

    def __init__(self, sampling, *, principle: str | None = None,
                 principle_field: str | None = None, recipe=None,
                 context_limit: int | None = None, votes: str = "mean"):
        from nfb.tasks.judge import VOTES

        if bool(principle) == bool(principle_field):
            raise UsageError("give --principle TEXT or --principle-field FIELD (one of them)")
        if votes not in VOTES:
            raise UsageError(f"--votes {votes!r}: use {' or '.join(VOTES)}")
        if not sampling.logprobs:
            raise ValueError("the Principle GenRM needs logprobs")
        self.sampling = sampling
        self.principle = principle
        self.principle_field = principle_field
        self.row_fields: tuple[str, ...] = (principle_field,) if principle_field else ()
        self.recipe = recipe
        self.context_limit = context_limit
        self.votes = votes
        self.ids: tuple[int, int] | None = None   # " Yes", " No": set by check_tokenizer

    @property
    def note_texts(self) -> dict[str, str]:
        from nfb.tasks.judge import REASONING_NOTE
        return {"response_reasoning_left_out": REASONING_NOTE}

    def schema(self, prefix: str):
        import pyarrow as pa

        fields = [pa.field(prefix + "reward", pa.float64()),
                  pa.field(prefix + "judgement", pa.string()),
                  pa.field(prefix + "judge_error", pa.string())]
        if self.sampling.samples > 1:
            fields += [pa.field(prefix + "judge_votes", pa.int16()),
                       pa.field(prefix + "judgements", pa.list_(pa.string())),
                       pa.field(prefix + "reward_samples", pa.list_(pa.float64()))]
        return pa.schema(fields)

    def check_row(self, row: dict) -> str | None:
        from nfb.records import field_error

        return field_error(row, self.principle_field) if self.principle_field else None

    def check_conversation(self, conv) -> str | None:
        if not conv.context or conv.context[-1].get("role") != "user":
            return "bad_messages:the turn before the judged response is not from the user"
        return None

    def row_notes(self, conv) -> tuple[str, ...]:
        from nfb.tasks.judge import reasoning_notes
        return reasoning_notes((conv.response,))

    def check_tokenizer(self, tokenizer) -> None:
        why = check_principle_template(tokenizer)
        if why:
            raise UsageError(f"{why}: is this the Principle GenRM?")
        self.ids = answer_ids(tokenizer)

    def prompts(self, conv, row: dict | None = None) -> list[Prompt]:
        from nfb.tasks.judge import final_answer

        principle = row[self.principle_field] if self.principle_field else self.principle
        return [Prompt(messages=[*conv.context,
                                 {"role": "assistant", "content": final_answer(conv.response)},
                                 {"role": PRINCIPLE_ROLE, "content": principle}],
                       add_generation_prompt=True)]

    def prompt_budget(self, max_model_len: int) -> int:
        budget = max_model_len - self.sampling.max_tokens
        return min(budget, self.context_limit) if self.context_limit else budget

    def parse(self, outputs: list) -> dict:
        from nfb.tasks.judge import Unreadable, _shown, combine_votes

        samples = outputs[0]
        assert self.ids is not None, "check_tokenizer first"
        per: list[dict | None] = []
        reasons: list[str] = []
        for s in samples:
            try:
                per.append({"reward": principle_reward(s, *self.ids)})
            except Unreadable as e:
                per.append(None)
                reasons.append(str(e))
        out = self.empty_values()
        out.update(combine_votes(per, ("reward",), self.votes, GENRM_FALLBACK))
        shown = next((s for s, p in zip(samples, per) if p is not None), samples[0])
        out["judgement"] = _shown(shown.text)
        if reasons and len(reasons) == len(samples):
            out["judge_error"] = reasons[0] if len(samples) == 1 else (
                f"{reasons[0].split(':', 1)[0]}:no sample of {len(samples)} readable; first: "
                f"{reasons[0]}")
        if self.sampling.samples > 1:
            out["judge_votes"] = sum(p is not None for p in per)
            out["judgements"] = [_shown(s.text) for s in samples]
            out["reward_samples"] = [p["reward"] if p else None for p in per]
        return out

    def empty_values(self) -> dict:
        return dict.fromkeys(self.schema("").names)

    def tally(self, values: dict):
        """Rows with no readable judgement."""
        return (("unreadable", None),) if values.get("judge_error") is not None else ()

    def settings(self) -> dict:
        from nfb.tasks.judge import SHOWN, VOTE_TEXT

        out = {"principle": self.principle, "principle_field": self.principle_field,
               "sampling": self.sampling.settings(), "context_limit": self.context_limit,
               "reward": f"max(lp[' Yes'] - lp[top], {CLIP:g}) - max(lp[' No'] - lp[top], "
                         f"{CLIP:g}) at the final answer (position -2), top "
                         f"{TOP_LOGPROBS} log-probabilities; needs {FINAL_JUDGEMENT!r}",
               "votes": VOTE_TEXT[self.votes] if self.votes == "mean" else
               "nvidia: an unreadable judgement counts as 0.0 (NeMo-RL), then the mean",
               "responses_shown": SHOWN}
        if self.recipe is not None:
            out.update(recipe=self.recipe.name, card=self.recipe.card)
        return out
