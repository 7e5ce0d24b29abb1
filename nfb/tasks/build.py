"""Build the score task from what the model is: its heads, its names, its prompt format.

Reads only the model's config (no weights). A directory written by `nfb convert` carries an
`nfb` key in its config.json (prompt format, head bias, attribute names); a causal LM is read
as a classifier on one token's logit (`--reward-token`, vLLM's `classifier_from_token`).
"""

from __future__ import annotations

from nfb.errors import UsageError
from nfb.tasks.reward import (
    STEERLM_ATTRIBUTES,
    ScoreTask,
    attribute_names,
    parse_weights,
    resolve_weights,
)

PROMPT_FORMATS = ("chat", "steerlm")


def score_task(model: str, *, revision: str | None, trust_remote_code: bool,
               weights: str | None, attributes: list[str] | None, reward_token: str | None,
               prompt_format: str | None) -> tuple[ScoreTask, dict | None]:
    """The ScoreTask for `model` and the vLLM hf_overrides it needs (or None)."""
    from nfb.modelinfo import read_model_info, read_nfb_key, token_classifier_overrides

    if prompt_format is not None and prompt_format not in PROMPT_FORMATS:
        raise UsageError(f"--prompt-format {prompt_format!r}: use {' or '.join(PROMPT_FORMATS)}")
    parsed = parse_weights(weights) if weights else None
    info = read_model_info(model, revision, trust_remote_code)
    converted = read_nfb_key(model) or {}
    overrides = None
    if reward_token is not None:
        if info.is_classifier:
            raise UsageError("--reward-token is for causal LMs; this model already has a "
                             "classification head")
        overrides = token_classifier_overrides(model, [reward_token], trust_remote_code,
                                               revision)
        heads = 1
    elif not info.is_classifier:
        raise UsageError(
            f"{model} is not a sequence-classification reward model "
            f"({', '.join(info.architectures) or 'unknown architecture'}). For a causal LM "
            "whose reward is one token's logit (e.g. Llama-3.1-Nemotron-70B-Reward-HF), pass "
            "--reward-token; for a feedback model use `nfb feedback`.")
    else:
        heads = info.num_heads
    fmt = prompt_format or converted.get("prompt_format") or "chat"
    bias = converted.get("head_bias")
    if bias is not None and len(bias) != heads:
        raise UsageError(f"{model}: config.json's nfb.head_bias has {len(bias)} values for "
                         f"{heads} heads; convert the checkpoint again")
    recipe = converted.get("recipe")
    if heads == 1:
        if parsed is not None or attributes:
            raise UsageError("this model has a single output, which is the reward itself: "
                             "--weights and --attributes do not apply")
        return ScoreTask(None, None, bias=bias, prompt_format=fmt, recipe=recipe), overrides
    names = attribute_names(heads, info.id2label, attributes)
    if parsed is None:
        if tuple(names) != STEERLM_ATTRIBUTES:
            raise UsageError(f"this model has {heads} heads ({', '.join(names)}): say how they "
                             "combine into `reward` with --weights")
        parsed = parse_weights("llama3-70b-steerlm")
    return ScoreTask(names, resolve_weights(parsed, names), bias=bias, prompt_format=fmt,
                     recipe=recipe), overrides
