"""The reward task: attribute names, weight presets, reward = weights . attributes.

Pure logic: the engine hands back one vector of raw head outputs per row.
"""

from __future__ import annotations

import math
import re

from nfb.models.steerlm import STEERLM_ATTRIBUTES
from nfb.prompts import Prompt
from nfb.tasks.base import Task

# STEERLM_ATTRIBUTES: quality, toxicity, humor, creativity (untrained heads in
# Llama3-70B-SteerLM-RM), then HelpSteer's helpfulness .. verbosity

# name -> (weights over STEERLM_ATTRIBUTES, source)
PRESETS: dict[str, tuple[tuple[float, ...], str]] = {
    "llama3-70b-steerlm": (
        (0, 0, 0, 0, 0.65, 0.8, 0.45, 0.55, -0.4),
        "nvidia/Llama3-70B-SteerLM-RM model card",
    ),
    "nemotron-4-340b": (
        (0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33),
        "nvidia/Nemotron-4-340B-Reward model card",
    ),
}


from nfb.errors import WeightsError  # noqa: E402,F401

_LABEL_N = re.compile(r"LABEL_\d+")


def attribute_names(num_heads: int, id2label: dict | None, override: list[str] | None
                    ) -> list[str]:
    """Column names for the model's heads.

    `--attributes` wins; else the config's id2label when it holds real names; else the
    SteerLM names for a 9-head model; else head_0..head_{n-1}. A 1-head model is scalar
    (its only column is `reward`).
    """
    if override:
        if len(override) != num_heads:
            raise WeightsError(
                f"--attributes names {len(override)} heads but the model has {num_heads}")
        if len(set(override)) != len(override):
            raise WeightsError("--attributes has a name twice")
        return list(override)
    if id2label:
        labels = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(num_heads)]
        if all(labels) and not any(_LABEL_N.fullmatch(x) for x in labels) \
                and len(set(labels)) == num_heads:
            return labels
    if num_heads == len(STEERLM_ATTRIBUTES):
        return list(STEERLM_ATTRIBUTES)
    return [f"head_{i}" for i in range(num_heads)]


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise WeightsError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise WeightsError(f"{what}: {text!r} is not a finite number")
    return value


def parse_weights(spec: str, attributes: list[str] | None = None) -> list[float] | dict[str, float]:
    """Parse --weights without knowing the model: a preset, a comma list or name=value pairs.

    Returns a list (positional) or a dict (by name). `resolve_weights` fits it to the heads.
    """
    spec = spec.strip()
    if not spec:
        raise WeightsError("--weights is empty")
    if spec in PRESETS:
        return list(PRESETS[spec][0])
    parts = [p.strip() for p in spec.split(",")]
    if any("=" in p for p in parts):
        out: dict[str, float] = {}
        for p in parts:
            if "=" not in p:
                raise WeightsError(f"--weights mixes name=value pairs and bare numbers ({p!r})")
            name, _, value = p.partition("=")
            name = name.strip()
            if not name:
                raise WeightsError(f"--weights: {p!r} has no attribute name")
            if name in out:
                raise WeightsError(f"--weights names {name!r} twice")
            out[name] = _number(value.strip(), f"--weights {name}")
        return out
    if len(parts) == 1 and not _looks_numeric(parts[0]):
        raise WeightsError(
            f"--weights: unknown preset {spec!r}; presets are {', '.join(PRESETS)}, or give a "
            "comma list (one weight per head) or name=value pairs")
    return [_number(p, "--weights") for p in parts]


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def resolve_weights(weights: list[float] | dict[str, float], attributes: list[str]) -> list[float]:
    """One weight per head, in head order."""
    if isinstance(weights, dict):
        unknown = [k for k in weights if k not in attributes]
        if unknown:
            raise WeightsError(
                f"--weights names {', '.join(map(repr, unknown))}, not an attribute of this "
                f"model ({', '.join(attributes)})")
        return [weights.get(a, 0.0) for a in attributes]
    if len(weights) != len(attributes):
        raise WeightsError(
            f"--weights has {len(weights)} values but the model has {len(attributes)} heads "
            f"({', '.join(attributes)})")
    return [float(w) for w in weights]


def weighted_reward(values: list[float], weights: list[float]) -> float:
    return math.fsum(v * w for v, w in zip(values, weights, strict=True))


SYSTEM_TURN_NOTE = (
    "system_turn_left_out: a row's system turn is left out; a SteerLM reward model always sees "
    "NeMo-Aligner's own system prompt (its training data carries no other), so the row is "
    "scored as NVIDIA's code scores it; the summary counts these rows")


class ScoreTask(Task):
    """`nfb score`: raw reward-model heads per row (plus the head bias a converted NeMo model
    carries), and their weighted sum as `reward`.

    `prompt_format` says what the model sees: "chat" (the tokenizer's chat template) or
    "steerlm" (NeMo-Aligner's SteerLM text, see nfb.models.steerlm).
    """

    name = "score"
    runner = "pooling"
    sampling = None

    def __init__(self, attributes: list[str] | None, weights: list[float] | None,
                 bias: list[float] | None = None, prompt_format: str = "chat",
                 recipe: str | None = None, context_limit: int | None = None,
                 template_kwargs: dict | None = None, card: str | None = None):
        # attributes None: a scalar model whose one output is the reward
        self.attributes = attributes
        self.weights = weights
        self.bias = bias
        self.prompt_format = prompt_format
        self.recipe = recipe
        self.context_limit = context_limit
        self.template_kwargs = dict(template_kwargs or {})  # e.g. enable_thinking=False
        self.card = card                                      # the model card of the recipe

    def schema(self, prefix: str):
        import pyarrow as pa

        fields = [pa.field(prefix + a, pa.float64()) for a in self.attributes or []]
        return pa.schema([*fields, pa.field(prefix + "reward", pa.float64())])

    @property
    def note_texts(self) -> dict[str, str]:
        return {"system_turn_left_out": SYSTEM_TURN_NOTE} if self.prompt_format == "steerlm" \
            else {}

    def row_notes(self, conv) -> tuple[str, ...]:
        """SteerLM leaves a row's system turn out (NeMo-Aligner's own prompt, always)."""
        if self.prompt_format == "steerlm" and conv.context \
                and conv.context[0].get("role") == "system":
            return ("system_turn_left_out",)
        return ()

    def prompts(self, conv, row: dict | None = None) -> list[Prompt]:
        if self.prompt_format == "steerlm":
            from nfb.models.steerlm import steerlm_prompt
            return [Prompt(text=steerlm_prompt(conv.messages()))]
        return [Prompt(messages=conv.messages(), template_kwargs=dict(self.template_kwargs))]

    def prompt_budget(self, max_model_len: int) -> int:
        return min(max_model_len, self.context_limit or max_model_len)

    def values(self, heads: list[float]) -> dict:
        if self.bias:
            heads = [h + b for h, b in zip(heads, self.bias, strict=True)]
        if self.attributes is None:
            return {"reward": heads[0]}
        out = dict(zip(self.attributes, heads, strict=True))
        out["reward"] = weighted_reward(heads, self.weights) if self.weights else None
        return out

    def parse(self, outputs: list[list[float]]) -> dict:
        return self.values(outputs[0])

    def empty_values(self) -> dict:
        return {**{a: None for a in self.attributes or []}, "reward": None}

    def settings(self) -> dict:
        out = {"attributes": self.attributes,
               "weights": dict(zip(self.attributes, self.weights, strict=True))
               if self.attributes and self.weights else None,
               "head_bias": self.bias, "prompt_format": self.prompt_format,
               "recipe": self.recipe, "context_limit": self.context_limit}
        if self.prompt_format == "steerlm":
            out["system_turn"] = "left out: NeMo-Aligner's SYSTEM_PROMPT, always"
        if self.template_kwargs:  # only when set: older runs keep their fingerprint
            out["template_kwargs"] = self.template_kwargs
        if self.card:
            out["card"] = self.card
        return out
