"""What nfb reads from a model's config before the engine starts (fast, no weights).

`ModelFacts` is the one setup pass: a run reads each fact of its model (config.json and its
`nfb` key, transformers' config, the tokenizer, the generation_config) at most once, and hands
the object to every check and to the task's build.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

from nfb.errors import (
    ConfigError,
    ModelError,  # noqa: E402,F401
)


@dataclass(frozen=True)
class ModelInfo:
    architectures: tuple[str, ...]
    num_heads: int                   # sequence-classification labels (1 for causal LMs)
    id2label: dict | None
    max_position_embeddings: int | None

    @property
    def is_classifier(self) -> bool:
        return any(a.endswith("ForSequenceClassification") for a in self.architectures)


def _looks_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or os.path.exists(model)


def check_model_path(model: str) -> None:
    """A local-looking model that is not a directory is a usage error (exit 2)."""
    if os.path.isdir(os.path.expanduser(model)):
        return
    if _looks_local(model):
        raise ConfigError(f"--model {model!r}: no such model directory. Give a local directory "
                          "in Hugging Face format, or a hub id such as org/name")


class ModelFacts:
    """What nfb knows of one model before its engine starts, each fact read at most once."""

    def __init__(self, model: str, revision: str | None = None, trust_remote_code: bool = False):
        self.model = model
        self.revision = revision
        self.trust_remote_code = trust_remote_code
        self.local = os.path.isdir(os.path.expanduser(model))   # else a hub id

    @cached_property
    def config_json(self) -> dict:
        """A local model's config.json as it is ({} for a hub id or none to read)."""
        return read_config_json(self.model) if self.local else {}

    @cached_property
    def nfb_key(self) -> dict | None:
        """The `nfb` key `nfb convert` writes, checked (see `check_nfb_key`)."""
        return check_nfb_key(self.model, self.config_json.get("nfb"))

    @cached_property
    def hf_config(self):
        """transformers' config (ModelError when it cannot be read)."""
        return _hf_config(self.model, self.revision, self.trust_remote_code)

    @cached_property
    def info(self) -> ModelInfo:
        return _info(self.hf_config)

    @cached_property
    def tokenizer(self):
        """The tokenizer, or None when it cannot be read."""
        return read_tokenizer(self.model, self.revision, self.trust_remote_code)

    @cached_property
    def generation_config(self) -> dict:
        return read_generation_config(self.model) if self.local else {}

    @property
    def context(self) -> int | None:
        """The context length config.json itself states (see `config_context`)."""
        return _stated_context(self.config_json)


def _hf_config(model: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(os.path.expanduser(model), revision=revision,
                                          trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ModelError(
            f"cannot read the config of {model!r}: {str(e).splitlines()[0] if str(e) else e!r}. "
            "Without network, give a local model directory (or one already in the Hugging Face "
            "cache); a model with custom code needs --trust-remote-code.") from None


def read_model_info(model: str, revision: str | None, trust_remote_code: bool) -> ModelInfo:
    return _info(_hf_config(model, revision, trust_remote_code))


def _info(cfg) -> ModelInfo:
    archs = tuple(cfg.architectures or ())
    id2label = dict(cfg.id2label) if getattr(cfg, "id2label", None) else None
    num = int(getattr(cfg, "num_labels", 1)) if any(
        a.endswith("ForSequenceClassification") for a in archs) else 1
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return ModelInfo(archs, num, id2label, getattr(text, "max_position_embeddings", None))


MAX_CONFIG_JSON = 64 * 2**20  # a config.json past this is not read (a real one is KBs)


def read_config_json(model: str) -> dict:
    """A local model directory's config.json as it is ({} when there is none to read: missing,
    not a regular file, over MAX_CONFIG_JSON bytes, or not a JSON object)."""
    import stat

    import orjson

    path = os.path.join(os.path.expanduser(model), "config.json")
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open
            return {}
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_JSON + 1)
        if len(data) > MAX_CONFIG_JSON:
            return {}
        cfg = orjson.loads(data)
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def config_context(model: str) -> int | None:
    """The context length a local model's config.json itself states (its text config's
    max_position_embeddings), or None when it states none (transformers would then fill in its
    class default, e.g. 2,048 for Llama, which is no fact about the model)."""
    return _stated_context(read_config_json(model))


def _stated_context(cfg: dict) -> int | None:
    for c in (cfg, cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}):
        value = c.get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return None


def read_generation_config(model: str) -> dict:
    """A local model's generation_config.json ({} when there is none to read)."""
    import orjson

    try:
        with open(os.path.join(os.path.expanduser(model), "generation_config.json"), "rb") as fh:
            cfg = orjson.loads(fh.read())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def sampling_processors(gen: dict) -> dict:
    """What of a generation_config would change generate()'s output scores: with do_sample,
    its temperature (divides the logits), top_k and top_p (set the rest to -inf). {} when
    nothing would (greedy, or neutral values)."""
    if not gen.get("do_sample"):
        return {}
    out = {}
    if gen.get("temperature") not in (None, 1, 1.0):
        out["temperature"] = gen["temperature"]
    if gen.get("top_k") not in (None, 0):
        out["top_k"] = gen["top_k"]
    if gen.get("top_p") not in (None, 1, 1.0):
        out["top_p"] = gen["top_p"]
    return out


def read_tokenizer(model: str, revision: str | None, trust_remote_code: bool):
    """The model's tokenizer for a check before loading, or None when it cannot be read
    (the engine then reports that itself, with its own words)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(model), revision=revision,
                                             trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - transformers raises many kinds here
        return None


def read_nfb_key(model: str) -> dict | None:
    """The `nfb` key that `nfb convert` writes into a converted model's config.json, its
    fields nfb acts on checked (a model folder is untrusted input): `head_bias` a list of
    finite numbers, `prompt_format` "chat" or "steerlm", `recipe` a string."""
    return check_nfb_key(model, read_config_json(model).get("nfb"))


def check_nfb_key(model: str, value) -> dict | None:
    """The `nfb` key's value when it is a dict whose fields check out (ConfigError if not)."""
    import math

    if not isinstance(value, dict):
        return None
    bias, fmt, recipe = value.get("head_bias"), value.get("prompt_format"), value.get("recipe")
    if bias is not None and not (isinstance(bias, list) and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
            for b in bias)):
        raise ConfigError(f"{model}: config.json's nfb.head_bias is {bias!r:.60}, not a list of "
                          "numbers; convert the checkpoint again")
    if fmt is not None and fmt not in ("chat", "steerlm"):
        raise ConfigError(f"{model}: config.json's nfb.prompt_format is {fmt!r:.60}, not chat "
                          "or steerlm; convert the checkpoint again")
    if recipe is not None and not isinstance(recipe, str):
        raise ConfigError(f"{model}: config.json's nfb.recipe is {recipe!r:.60}, not a name; "
                          "convert the checkpoint again")
    return value


def token_classifier_overrides(facts: ModelFacts, tokens: list[str],
                               method: str = "no_post_processing") -> dict:
    """vLLM hf_overrides that read a causal LM as a classifier on the logits of `tokens`.

    This is vLLM's own route for causal LMs used as scorers (`classifier_from_token`): one
    token with method `no_post_processing` gives that token's raw logit (its head is the
    token's row of lm_head); two tokens with `from_2_way_softmax` give the difference of
    their logits. A token may be given by id ("0"), turned into its string here.
    """
    from nfb.errors import UsageError

    model, cfg = facts.model, facts.hf_config
    if any(t.isdigit() for t in tokens):  # a token id, e.g. 0 for Llama-3.1-Nemotron-70B-Reward-HF
        tok = facts.tokenizer
        if tok is None:   # unreadable: transformers' own error says why
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(os.path.expanduser(model),
                                                revision=facts.revision,
                                                trust_remote_code=facts.trust_remote_code)
        tokens = [tok.convert_ids_to_tokens(int(t)) if t.isdigit() else t for t in tokens]
    archs = [a.replace("ForCausalLM", "ForSequenceClassification")
             for a in (cfg.architectures or [])]
    if not archs or not all(a.endswith("ForSequenceClassification") for a in archs):
        raise UsageError(f"{model}: a token-logit reward needs a *ForCausalLM model "
                         f"(found {cfg.architectures})")
    return {"architectures": archs, "classifier_from_token": list(tokens), "method": method,
            "num_labels": 1 if len(tokens) == 1 or method == "from_2_way_softmax"
            else len(tokens)}
