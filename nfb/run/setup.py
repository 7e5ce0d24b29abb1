"""Build the score task from what the model is: its recipe (nfb.models.recipes), else its
heads, its names, its prompt format.

Reads only the model's config and tokenizer (no weights), each once, through the run's
`ModelFacts`; recipe resolution and its log line are here only (`resolve_recipe`). A model nfb
knows (by hub id, config name, the `nfb` key that `nfb convert` writes, or `--recipe NAME`) is
scored as its card says; any other model takes the generic path: the chat template and the raw
heads, or one token's logit (`--reward-token`, vLLM's `classifier_from_token`) for a causal LM.
"""

from __future__ import annotations

from collections.abc import Callable

from nfb.errors import UsageError
from nfb.models.modelinfo import ModelFacts
from nfb.models.steerlm import STEERLM_ATTRIBUTES
from nfb.tasks.reward import (
    ScoreTask,
    attribute_names,
    parse_weights,
    resolve_weights,
)

PROMPT_FORMATS = ("chat", "steerlm")


# which verb runs a recipe's task, and what kind of model that is
VERBS = {"score": "score", "principle": "score", "feedback": "feedback", "judge": "judge",
         "judge_principle": "judge"}
_KINDS = {"score": "a reward model", "feedback": "a feedback model",
          "judge": "a generative reward model (it reasons, then writes its scores)"}


def resolve_recipe(facts: ModelFacts, recipe: str | None, verb: str = "score",
                   log: Callable[[str], None] | None = None):
    """The Recipe (or None) for `nfb VERB --model MODEL [--recipe NAME]`; says which, and how
    it was found (the one place that does).

    Exit 2 for an unknown --recipe, a known but unsupported model, or a model another verb
    runs (a GenRM given to `nfb score`: the message names `nfb judge`)."""
    from nfb.models.recipes import RECIPES, find_recipe

    model = facts.model
    try:
        found, how = find_recipe(model, recipe, facts.config_json if facts.local else None)
    except KeyError:
        raise UsageError(f"--recipe {recipe!r}: unknown; known recipes: "
                         f"{', '.join(r.name for r in RECIPES)} (see `nfb models`)") from None
    if found is None:
        return None
    if not found.supported:
        raise UsageError(f"{found.hub_id} is known but not yet supported by nfb: {found.note} "
                         f"(card: {found.card})")
    runs = VERBS[found.task]
    if runs != verb:
        raise UsageError(f"{found.hub_id} is {_KINDS[runs]}: use `nfb {runs} --model {model}` "
                         f"(card: {found.card})")
    if log is not None:
        log(f"recipe {found.name} ({how}): {found.card}")
    return found


def score_task(facts: ModelFacts, *, weights: str | None, attributes: list[str] | None,
               reward_token: str | None,
               prompt_format: str | None, recipe: str | None = None,
               principle: list[str] | None = None, principle_field: str | None = None,
               log: Callable[[str], None] | None = None):
    """The task for the model and the vLLM hf_overrides it needs (or None)."""
    from nfb.models.modelinfo import token_classifier_overrides

    model = facts.model
    log = log or (lambda _m: None)
    if prompt_format is not None and prompt_format not in PROMPT_FORMATS:
        raise UsageError(f"--prompt-format {prompt_format!r}: use {' or '.join(PROMPT_FORMATS)}")
    found = resolve_recipe(facts, recipe, log=log)
    principled = bool(principle) or bool(principle_field)
    if found is None:
        if principled:
            raise UsageError("--principle and --principle-field are for a principle reward model "
                             "(nvidia/Llama-3.3-Nemotron-70B-Reward-Principle); this model has "
                             "no principles (pass --recipe if it is a copy of that model)")
        pass   # the note is written once the task is known: what nfb applies, and why
    else:
        if principled and found.task != "principle":
            raise UsageError(f"--principle and --principle-field do not apply to {found.hub_id}: "
                             "it has no principles")
        if reward_token is not None:
            raise UsageError(f"--reward-token does not apply to {found.hub_id}: its recipe "
                             f"already says how it is scored ({found.method})")
        if prompt_format is not None and prompt_format != found.prompt_format:
            raise UsageError(f"--prompt-format {prompt_format} does not fit {found.hub_id}, "
                             f"whose card uses the {found.prompt_format} format")
        if found.task == "principle":
            return _principle_task(facts, found, weights=weights,
                                   attributes=attributes, principle=principle,
                                   principle_field=principle_field, log=log)
        if found.method == "token_logit":
            reward_token = found.tokens[0]
        if found.method == "token_logit":
            _note_generation_config(facts, found, log)
        prompt_format = found.prompt_format
        if weights is None and found.weights:
            weights = found.weights
    parsed = parse_weights(weights) if weights else None
    info = facts.info
    converted = facts.nfb_key or {}
    overrides = None
    if reward_token is not None:
        if info.is_classifier:
            raise UsageError("--reward-token is for causal LMs; this model already has a "
                             "classification head" if found is None else
                             f"{model} has a classification head, but the recipe "
                             f"{found.name} reads a token of a causal LM: is this the right "
                             "model?")
        overrides = token_classifier_overrides(facts, [reward_token])
        heads = 1
    elif not info.is_classifier:
        raise UsageError(
            f"{model} is not a sequence-classification reward model "
            f"({', '.join(info.architectures) or 'unknown architecture'}). For a causal LM "
            "whose reward is one token's logit (e.g. Llama-3.1-Nemotron-70B-Reward-HF), pass "
            "--reward-token; for a feedback model use `nfb feedback`.")
    else:
        heads = info.num_heads
    given_format = prompt_format
    fmt = prompt_format or converted.get("prompt_format") or "chat"
    bias = converted.get("head_bias")
    if bias is not None and len(bias) != heads:
        raise UsageError(f"{model}: config.json's nfb.head_bias has {len(bias)} values for "
                         f"{heads} heads; convert the checkpoint again")
    extra = {}
    if found is not None:
        expected = len(found.columns) - 1 if len(found.columns) > 1 else 1
        if heads != expected:
            raise UsageError(f"{model} has {heads} output(s) but the recipe {found.name} "
                             f"expects {expected}: is this the right model?")
        extra = dict(recipe=found.name, context_limit=found.context_limit,
                     template_kwargs=found.template_kwargs, card=found.card)
    else:
        extra = dict(recipe=converted.get("recipe"))
    if heads == 1:
        if (parsed is not None and (found is None or not found.weights)) or attributes:
            raise UsageError("this model has a single output, which is the reward itself: "
                             "--weights and --attributes do not apply")
        if found is None:
            log(_generic_note(model, converted, given_format, fmt, bias, reward_token, None))
        return ScoreTask(None, None, bias=bias, prompt_format=fmt, **extra), overrides
    names = attribute_names(heads, info.id2label, attributes)
    weights_how = f"--weights {weights}" if parsed is not None else None
    if parsed is None:
        # a preset is a recipe's (its card's weights); a model no recipe names gets none,
        # whatever its heads are called: two SteerLM models weigh the same heads differently
        if tuple(names) == STEERLM_ATTRIBUTES:
            raise UsageError(
                "this model has the 9 SteerLM heads but no nfb recipe, so no card says how they "
                "combine into `reward`: give --weights (llama3-70b-steerlm for "
                "Llama3-70B-SteerLM-RM, nemotron-4-340b for Nemotron-4-340B-Reward, or your own), "
                "or --recipe if the model is one of those")
        raise UsageError(f"this model has {heads} heads ({', '.join(names)}): say how they "
                         "combine into `reward` with --weights")
    if found is None:
        log(_generic_note(model, converted, given_format, fmt, bias, None, weights_how))
    return ScoreTask(names, resolve_weights(parsed, names), bias=bias, prompt_format=fmt,
                     **extra), overrides


def _generic_note(model: str, converted: dict, given_format: str | None, fmt: str,
                  bias: list[float] | None, reward_token: str | None,
                  weights_how: str | None) -> str:
    """What nfb applies to a model it has no recipe for, and why (one line)."""
    if converted:
        head = (f"note: {model} was made by `nfb convert` but matches no nfb recipe (its "
                "shape is no known model's), so nfb applies what the conversion recorded")
    else:
        head = f"note: no nfb recipe for {model} (`nfb models` lists the models nfb knows)"
    what = []
    if given_format:
        what.append(f"the {fmt} prompt format (--prompt-format)")
    elif fmt == "steerlm":
        what.append("the SteerLM prompt format (the one NeMo-Aligner trained it with)")
    else:
        what.append("the model's chat template")
    if reward_token is not None:
        what.append(f"the reward is the logit of token {reward_token!r} (--reward-token)")
    elif bias is not None:
        what.append(f"the head bias ({len(bias)} value{'s' if len(bias) > 1 else ''}, "
                    "added by nfb: vLLM's heads cannot hold it)")
    else:
        what.append("the raw heads")
    if weights_how:
        what.append(f"the weights {weights_how}")
    elif reward_token is None:
        what.append("the single output is the reward")
    return f"{head}: {'; '.join(what)}"


def _principle_task(facts: ModelFacts, found, *, weights, attributes, principle,
                    principle_field, log=lambda _m: None):
    from nfb.models.modelinfo import token_classifier_overrides
    from nfb.models.recipes import PRINCIPLE_QUESTION
    from nfb.tasks.principle import PrincipleTask, principle_columns

    if not principle and not principle_field:
        raise UsageError(f"{found.hub_id} scores a response against a principle: give "
                         "--principle TEXT (repeatable: one column each) or --principle-field "
                         "FIELD (each row's own principle)")
    if principle and principle_field:
        raise UsageError("give --principle or --principle-field, not both")
    if attributes:
        raise UsageError("--attributes does not apply to a principle model (columns are named "
                         "from the principles)")
    if principle_field and weights:
        raise UsageError("--weights does not apply with --principle-field (one principle a row)")
    resolved = None
    if weights:
        columns = principle_columns(principle)
        resolved = resolve_weights(parse_weights(weights), columns)
    model = facts.model
    if facts.info.is_classifier:
        raise UsageError(f"{model} has a classification head, but the recipe {found.name} "
                         "reads the Yes/No logits of a causal LM: is this the right model?")
    _check_tokens(facts, found)
    # W[Yes] - W[No] as one head (vLLM from_2_way_softmax: tokens [false, true])
    overrides = token_classifier_overrides(facts, list(found.tokens),
                                           method="from_2_way_softmax")
    _note_generation_config(facts, found, log)
    task = PrincipleTask(principles=principle, principle_field=principle_field,
                         weights=resolved, question=PRINCIPLE_QUESTION, recipe=found.name,
                         context_limit=found.context_limit)
    return task, overrides


def _note_generation_config(facts: ModelFacts, found, log: Callable[[str], None]) -> None:
    """The token-logit cards read generate(..., output_scores=True).scores, which pass through
    the repo's generation_config: greedy (no do_sample), they are the raw logits nfb reads. A
    generation_config that samples would divide them by its temperature and set tokens outside
    its top-k/top-p to -inf (for the card's token 0, nearly always -inf: no reward), so nfb keeps
    the raw logits and says so."""
    from nfb.models.modelinfo import sampling_processors

    if not facts.local:
        return   # a hub id: its generation_config is not read before the engine loads
    changed = sampling_processors(facts.generation_config)
    if changed:
        log(f"note: {facts.model}'s generation_config samples ({changed}): the card's generate() "
            "scores would be rescaled and masked by it; nfb reads the raw logits, as a greedy "
            f"generation_config gives them ({found.card})")


def _check_tokens(facts: ModelFacts, found) -> None:
    """Each token the recipe reads must be one token of the model's vocabulary; on the card's
    own tokenizer (Llama 3's), at the very id the card hard-codes."""
    from nfb.models.recipes import is_llama3_tokenizer

    model, tok = facts.model, facts.tokenizer
    if tok is None:
        return
    if found.card_ids and is_llama3_tokenizer(tok):
        got = {t: tok.convert_tokens_to_ids(t) for t in found.card_ids}
        if got != found.card_ids:
            raise UsageError(
                f"{model}: a Llama 3 tokenizer whose ids for the recipe's tokens are {got}, not "
                f"the card's {found.card_ids} ({found.card}): is this the right tokenizer?")
    for t in found.tokens:
        i = tok.convert_tokens_to_ids(t)
        if i is None or (tok.unk_token_id is not None and i == tok.unk_token_id):
            raise UsageError(f"{model}: the recipe {found.name} reads the token {t!r}, which "
                             "is not in this model's vocabulary: is this the right model?")
