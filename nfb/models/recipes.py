"""What nfb knows about NVIDIA's reward and feedback models: one recipe per model, each from
its model card.

A recipe is keyed by hub id and says: the task (`score`, `principle`, `feedback`, `judge`),
the prompt format ("chat": the tokenizer's chat template; "steerlm": NeMo-Aligner's text),
the score method, the context limit the card states, the output columns and the card.

Score methods:
- `classifier`: a *ForSequenceClassification model; its head(s) are read raw.
- `token_logit`: a causal LM whose reward is the raw logit of one token at the last position
  (vLLM `classifier_from_token`, method `no_post_processing`).
- `yes_minus_no`: logit("Yes") - logit("No") at the position after a generation prompt (vLLM
  `classifier_from_token ["No", "Yes"]`, method `from_2_way_softmax`, which loads one head
  W[Yes] - W[No]; read with no activation it is exactly the raw difference).
- `generate`: a generative model (feedback text, or a GenRM's reasoning and scores: `nfb judge`).
- `generate_yes_minus_no`: a generative principle reward model (`nfb judge --principle`): it
  reasons, ends "Final Judgement: Yes/No", and the reward is read from the top-20
  log-probabilities of that answer (nfb.tasks.principle).

Matching (`find_recipe`): `--recipe NAME` (a recipe name or hub id) wins; else the model
argument itself when it is a hub id; else, for a local directory, the `nfb` key that
`nfb convert` writes, then the config's `_name_or_path`, then the directory's own name (the
last part of a hub id, e.g. `.../Llama-3.3-Nemotron-70B-Reward`). A model matching nothing
takes the generic path (chat template, raw heads).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from nfb.models.steerlm import STEERLM_ATTRIBUTES

HF = "https://huggingface.co/"


@dataclass(frozen=True)
class Recipe:
    name: str                         # short name for --recipe
    hub_id: str
    task: str                         # "score" | "principle" | "feedback" | "judge"
    #                                   | "judge_principle" (the Principle GenRM)
    prompt_format: str                # "chat" | "steerlm"
    method: str                       # "classifier" | "token_logit" | "yes_minus_no" | "generate"
    #                                   | "generate_yes_minus_no" (generate, then the Yes/No
    #                                   log-probabilities of the final answer)
    columns: tuple[str, ...]          # output columns (before --prefix)
    context_limit: int | None = None  # prompt tokens at most (rows over it: prompt_too_long)
    tokens: tuple[str, ...] = ()      # the tokens read: ids as digits, or token strings
    template_kwargs: dict = field(default_factory=dict)
    weights: str | None = None        # default --weights preset (multi-head models)
    responses: tuple[int, ...] = ()   # judge: how many responses it judges at once (1, 2)
    # the ids the card hard-codes for `tokens`, checked when the tokenizer is the card's
    # (LLAMA3_MARKS below); another tokenizer (a test's, a copy's) is checked by string only
    card_ids: dict = field(default_factory=dict)
    supported: bool = True
    note: str = ""                    # what the card leaves open, or why unsupported

    @property
    def card(self) -> str:
        return HF + self.hub_id

    def describe(self) -> dict:
        out = asdict(self)
        out["card"] = self.card
        return out


# The Llama 3 tokenizer (tiktoken BPE, 128,000 base tokens, then 256 special ones): the
# vocabulary of every Llama-3.x-based card here. A tokenizer with these special-token ids is
# taken for it, and a card's hard-coded ids must then hold exactly.
LLAMA3_MARKS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001,
                "<|start_header_id|>": 128006, "<|eot_id|>": 128009}


def is_llama3_tokenizer(tokenizer) -> bool:
    return all(tokenizer.convert_tokens_to_ids(t) == i for t, i in LLAMA3_MARKS.items())


PRINCIPLE_QUESTION = ("Evaluate the response to the previous prompt in terms of whether it "
                      "satisfies this principle: {principle}. Only answer Yes or No.")

_STEERLM_COLUMNS = (*STEERLM_ATTRIBUTES, "reward")
_GENRM_COLUMNS = ("helpfulness", "helpfulness_1", "helpfulness_2", "ranking", "preferred")

_GENRM_NOTE = ("`nfb judge`: the conversation, then the response(s) in the roles response_1 and "
               "response_2, rendered by the model's own chat template; it reasons, then writes "
               "helpfulness 1-5 per response and, for two, a ranking 1-6 (1: response 1 much "
               "better, 6: response 2 much better). Sampling defaults (temperature 0.6, top_p "
               "0.95, 16,384 tokens) are NVIDIA's NeMo Gym GenRM settings; the card shows "
               "voting@32 but not how votes combine: nfb averages the samples that parse")

_TOKEN0_NOTE = ("card: the reward is generate(...).scores[0][0][0] (the logit of token id 0) "
                "after the chat-templated conversation, add_generation_prompt=False")

RECIPES: tuple[Recipe, ...] = (
    Recipe("llama-3.1-nemotron-70b-reward-hf", "nvidia/Llama-3.1-Nemotron-70B-Reward-HF",
           "score", "chat", "token_logit", ("reward",), 4096, ("0",), note=_TOKEN0_NOTE),
    Recipe("llama-3.3-nemotron-70b-reward", "nvidia/Llama-3.3-Nemotron-70B-Reward",
           "score", "chat", "token_logit", ("reward",), 4096, ("0",), note=_TOKEN0_NOTE),
    Recipe("llama-3.3-nemotron-70b-reward-multilingual",
           "nvidia/Llama-3.3-Nemotron-70B-Reward-Multilingual",
           "score", "chat", "token_logit", ("reward",), 4096, ("0",), note=_TOKEN0_NOTE),
    Recipe("llama-3.3-nemotron-70b-select", "nvidia/Llama-3.3-Nemotron-70B-Select",
           "score", "chat", "token_logit", ("reward",), 4096, ("0",),
           note=_TOKEN0_NOTE + "; the card's input limit is 128k tokens but its explainability "
           "subcard says it may not work well beyond 4,096, which nfb enforces"),
    Recipe("llama-3.3-nemotron-70b-reward-principle",
           "nvidia/Llama-3.3-Nemotron-70B-Reward-Principle",
           "principle", "chat", "yes_minus_no", ("reward",), 4096, ("No", "Yes"),
           card_ids={"Yes": 9642, "No": 2822},
           note="card: [user, assistant, user: PRINCIPLE_QUESTION], add_generation_prompt=True, "
           "reward = score[9642 'Yes'] - score[2822 'No'] of the first generated position. The "
           "card reads generate()'s output_scores, which are the logits after the generation "
           "config's logits processors; nfb reads the raw logits (the two agree when no "
           "processor rescales them)"),
    Recipe("qwen-3-nemotron-32b-reward", "nvidia/Qwen-3-Nemotron-32B-Reward",
           "score", "chat", "classifier", ("reward",), None,
           template_kwargs={"enable_thinking": False},
           note="AutoModelForSequenceClassification, one scalar. An earlier card revision says "
           "training used a 'nothink' instruction and dialogues of up to 8,192 tokens; the "
           "current card does not restate either, so nfb enforces no limit and renders the chat "
           "template with enable_thinking=False (Qwen3's template then writes an empty "
           "<think></think> block before the judged response)"),
    Recipe("qwen-2.5-nemotron-32b-reward", "nvidia/Qwen-2.5-Nemotron-32B-Reward",
           "score", "chat", "classifier", ("reward",), None,
           note="AutoModelForSequenceClassification, one scalar; card: max 128k tokens, "
           "trained on conversations up to 8K (not enforced)"),
    Recipe("llama3-70b-steerlm-rm", "nvidia/Llama3-70B-SteerLM-RM",
           "score", "steerlm", "classifier",
           _STEERLM_COLUMNS, 8192,
           weights="llama3-70b-steerlm",
           note="a NeMo checkpoint: run `nfb convert` first; 9 heads, SteerLM prompt (always "
           "NeMo-Aligner's system prompt: a row's system turn is left out and counted), reward "
           "= the card's weights (preset llama3-70b-steerlm); card: 8,192 tokens at most"),
    Recipe("nemotron-4-340b-reward", "nvidia/Nemotron-4-340B-Reward",
           "score", "steerlm", "classifier",
           _STEERLM_COLUMNS, 4096,
           weights="nemotron-4-340b",
           note="a NeMo checkpoint whose architecture (LayerNorm1p, squared ReLU, partial RoPE) "
           "`nfb convert` refuses for now; a Hugging Face copy in SteerLM format with 9 heads "
           "is scored with --recipe nemotron-4-340b-reward (preset nemotron-4-340b); card: "
           "4,096 tokens at most"),
    Recipe("llama-3.3-nemotron-70b-feedback", "nvidia/Llama-3.3-Nemotron-70B-Feedback",
           "feedback", "chat", "generate", ("feedback", "feedback_level", "feedback_label"),
           note="`nfb feedback` (its default model)"),
    Recipe("llama-3.3-nemotron-super-49b-genrm", "nvidia/Llama-3_3-Nemotron-Super-49B-GenRM",
           "judge", "chat", "generate",
           _GENRM_COLUMNS,
           responses=(1, 2), note=_GENRM_NOTE),
    Recipe("llama-3.3-nemotron-super-49b-genrm-multilingual",
           "nvidia/Llama-3_3-Nemotron-Super-49B-GenRM-Multilingual",
           "judge", "chat", "generate",
           _GENRM_COLUMNS,
           responses=(1, 2), note=_GENRM_NOTE),
    Recipe("qwen3-nemotron-235b-a22b-genrm", "nvidia/Qwen3-Nemotron-235B-A22B-GenRM",
           "judge", "chat", "generate",
           ("helpfulness_1", "helpfulness_2", "ranking", "preferred"), 131072,
           responses=(2,),
           note=_GENRM_NOTE + ". This card judges two responses only; its input limit is "
           "'128k tokens' (nfb reads it as 131,072); NVIDIA's code reads its scores as JSON "
           "(score_1, score_2, ranking), which nfb parses beside the boxed format"),
    Recipe("qwen3-nemotron-32b-genrm-principle", "nvidia/Qwen3-Nemotron-32B-GenRM-Principle",
           "judge_principle", "chat", "generate_yes_minus_no", ("reward",),
           tokens=(" Yes", " No"), responses=(1,),
           note="`nfb judge --principle TEXT` (or --principle-field): [conversation, "
           "assistant: the response's final answer, principle: TEXT], add_generation_prompt="
           "True; the model reasons and ends 'Final Judgement: Yes/No'. card: reward = "
           "clip(s[' Yes'] - max, -50) - clip(s[' No'] - max, -50) at scores[-2]; nfb reads it "
           "from vLLM's top-20 log-probabilities as NeMo-RL's principle_genrm_for_rlhf_"
           "environment.py does (greedy, 200 tokens by default; no 'Final Judgement:' or a "
           "token outside the top 20: null with --votes mean, NeMo-RL's 0.0 with --votes "
           "nvidia)"),
)

# `nfb convert` writes config.json nfb.recipe: these are its values
CONVERTED = {"llama3-70b-steerlm-rm": "llama3-70b-steerlm-rm"}


def _key(text: str) -> str:
    return text.strip().lower()


def by_name(name: str) -> Recipe | None:
    """A recipe by its name, hub id, or the last part of its hub id (any case)."""
    k = _key(name)
    for r in RECIPES:
        if k in (r.name, _key(r.hub_id), _key(r.hub_id.split("/")[-1])):
            return r
    return None


def find_recipe(model: str, recipe: str | None = None, config_json: dict | None = None
                ) -> tuple[Recipe | None, str]:
    """The recipe for `model` and how it was found ("" when none matched); `config_json`: the
    local model's config.json when the caller has read it already.

    Raises KeyError for an unknown --recipe name."""
    if recipe:
        r = by_name(recipe)
        if r is None:
            raise KeyError(recipe)
        return r, "--recipe"
    path = os.path.expanduser(model)
    if not os.path.isdir(path):
        r = by_name(model) if model.count("/") == 1 else None
        return (r, "hub id") if r else (None, "")
    if config_json is None:
        from nfb.models.modelinfo import read_config_json

        config_json = read_config_json(path)
    cfg = config_json
    nfb_key = cfg.get("nfb") if isinstance(cfg.get("nfb"), dict) else {}
    if isinstance(nfb_key.get("recipe"), str) and nfb_key["recipe"] in CONVERTED:
        return by_name(CONVERTED[nfb_key["recipe"]]), "nfb convert"
    name = cfg.get("_name_or_path")
    if isinstance(name, str) and name.strip():
        r = by_name(name) or by_name(os.path.basename(os.path.normpath(name)))
        if r:
            return r, "config _name_or_path"
    base = os.path.basename(os.path.normpath(path))
    r = by_name(base)
    return (r, "directory name") if r else (None, "")


def table() -> list[dict]:
    return [r.describe() for r in RECIPES]
