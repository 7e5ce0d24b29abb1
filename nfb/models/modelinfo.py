"""What nfb reads from a model's config before the engine starts (fast, no weights)."""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def read_model_info(model: str, revision: str | None, trust_remote_code: bool) -> ModelInfo:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(os.path.expanduser(model), revision=revision,
                                         trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ModelError(
            f"cannot read the config of {model!r}: {str(e).splitlines()[0] if str(e) else e!r}. "
            "Without network, give a local model directory (or one already in the Hugging Face "
            "cache); a model with custom code needs --trust-remote-code.") from None
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
    cfg = read_config_json(model)
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
    import math

    value = read_config_json(model).get("nfb")
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


def token_classifier_overrides(model: str, tokens: list[str], trust_remote_code: bool,
                               revision: str | None = None, method: str = "no_post_processing"
                               ) -> dict:
    """vLLM hf_overrides that read a causal LM as a classifier on the logits of `tokens`.

    This is vLLM's own route for causal LMs used as scorers (`classifier_from_token`): one
    token with method `no_post_processing` gives that token's raw logit (its head is the
    token's row of lm_head); two tokens with `from_2_way_softmax` give the difference of
    their logits. A token may be given by id ("0"), turned into its string here.
    """
    from transformers import AutoConfig, AutoTokenizer

    from nfb.errors import UsageError

    try:
        cfg = AutoConfig.from_pretrained(os.path.expanduser(model),
                                         trust_remote_code=trust_remote_code, revision=revision)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot read the config of {model!r}: {e}") from None
    if any(t.isdigit() for t in tokens):  # a token id, e.g. 0 for Llama-3.1-Nemotron-70B-Reward-HF
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(model), revision=revision,
                                            trust_remote_code=trust_remote_code)
        tokens = [tok.convert_ids_to_tokens(int(t)) if t.isdigit() else t for t in tokens]
    archs = [a.replace("ForCausalLM", "ForSequenceClassification")
             for a in (cfg.architectures or [])]
    if not archs or not all(a.endswith("ForSequenceClassification") for a in archs):
        raise UsageError(f"{model}: a token-logit reward needs a *ForCausalLM model "
                         f"(found {cfg.architectures})")
    return {"architectures": archs, "classifier_from_token": list(tokens), "method": method,
            "num_labels": 1 if len(tokens) == 1 or method == "from_2_way_softmax"
            else len(tokens)}
