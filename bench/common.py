"""Shared helpers for the benchmarks: HelpSteer-sized data and a stub engine."""

from __future__ import annotations

import os
import random
import resource
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from nfb.engines.base import Engine  # noqa: E402  (after the path, for a checkout)

_WORDS = ("the model answer data question explain because value result first second "
          "example step code function list number people time water energy light plant "
          "city history reason simple helpful clear short long write read").split()


def text(rng: random.Random, chars: int) -> str:
    out, n = [], 0
    while n < chars:
        w = rng.choice(_WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


def helpsteer_rows(n: int, seed: int = 0):
    """Rows shaped like HelpSteer2: a ~700-char prompt, a ~1,500-char response, 5 ints."""
    rng = random.Random(seed)
    prompts = [text(rng, rng.randint(300, 1100)) for _ in range(64)]
    responses = [text(rng, rng.randint(800, 2200)) for _ in range(64)]
    for i in range(n):
        yield {"prompt": prompts[i % 64], "response": responses[(i * 7) % 64],
               "helpfulness_gt": i % 5, "correctness_gt": (i + 1) % 5, "coherence_gt": 4,
               "complexity_gt": 2, "verbosity_gt": (i + 2) % 5}


def write_jsonl(path: Path, n: int) -> Path:
    if path.exists() and path.stat().st_size > 0:
        return path
    with open(path, "wb") as fh:
        buf = []
        for r in helpsteer_rows(n):
            buf.append(orjson.dumps(r))
            if len(buf) == 10_000:
                fh.write(b"\n".join(buf) + b"\n")
                buf = []
        if buf:
            fh.write(b"\n".join(buf) + b"\n")
    return path


class Shared:
    """One engine handed to several runs in a benchmark: close() leaves it running."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def close(self):
        pass


class InstantEngine(Engine):
    """Answers every request at once: measures everything nfb does around the engine. It
    carries a real tokenizer (templating and tokenization are nfb's main cost per row)."""

    max_model_len = 1 << 20

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, requests, sampling, can_feed):
        text = "The response is mostly helpful. It answers the question clearly."
        for key, _ in requests:
            yield key, [text] * sampling.samples

    def classify(self, requests, can_feed):
        for key, _ in requests:
            yield key, [0.5] * 9

    def close(self):
        pass


def bench_tokenizer(path: str | None = None):
    """The demo model's real tokenizer (SmolLM2, 49k vocab) with a Llama-3-style chat template,
    or the tokenizer of `path`."""
    from transformers import AutoTokenizer

    if path is None:
        from nfb.models.demo import prepare_demo
        path = str(prepare_demo())
        tok = AutoTokenizer.from_pretrained(path)
        import tiny_models
        tok.chat_template = tiny_models.CHAT_TEMPLATE
        return tok
    return AutoTokenizer.from_pretrained(path)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    return f"{os.cpu_count()} cores, {sys.platform}"
