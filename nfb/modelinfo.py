"""What nfb reads from a model's config before the engine starts (fast, no weights)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from nfb.config import ConfigError


from nfb.errors import ModelError  # noqa: E402,F401


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
