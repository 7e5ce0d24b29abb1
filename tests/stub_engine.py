"""A stub engine for tests of mechanics: the real tokenizer and chat template of a model
directory, deterministic outputs computed from the prompt's token ids, no vLLM.

It keeps the Engine protocol exactly: requests are pulled lazily while `can_feed()` allows,
at most `max_in_flight` are held, and results come back out of order (each "step" finishes
the newest request first), so the ordered collector is exercised as with a real engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

from nfb.engines.base import Engine
from nfb.errors import EngineDied

LABELS = ["not", "slightly", "partially", "mostly", "perfectly"]


def _digest(ids: list[int]) -> bytes:
    return hashlib.sha256(struct.pack(f"{len(ids)}i", *ids)).digest()


def stub_text(ids: list[int], sample: int = 0) -> str:
    d = _digest(ids + [sample])
    return (f"The response is {LABELS[d[0] % 5]} helpful. A stub evaluation of "
            f"{len(ids)} prompt tokens.")


def stub_heads(ids: list[int], n: int) -> list[float]:
    d = _digest(ids)
    return [round((d[i % 32] - 128) / 32.0 + i * 0.01, 6) for i in range(n)]


class StubEngine(Engine):
    def __init__(self, cfg, runner: str, die_after: int | None = None):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.runner = runner
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        conf = json.load(open(os.path.join(cfg.model, "config.json")))
        self.max_model_len = cfg.max_model_len or conf.get("max_position_embeddings", 4096)
        archs = conf.get("architectures") or []
        if cfg.hf_overrides:
            self.heads = int(cfg.hf_overrides.get("num_labels", 1))
        elif any(a.endswith("ForSequenceClassification") for a in archs):
            self.heads = int(conf.get("num_labels") or len(conf.get("id2label") or {}) or 1)
        else:
            self.heads = 1
        self.die_after = die_after
        self.finished = 0
        self.closed = False

    def _stream(self, requests, can_feed):
        window = max(1, self.cfg.max_in_flight)
        held = []
        source = iter(requests)
        exhausted = False
        while True:
            while not exhausted and len(held) < window and can_feed():
                try:
                    held.append(next(source))
                except StopIteration:
                    exhausted = True
            if not held:
                if exhausted:
                    return
                continue
            if self.die_after is not None and self.finished >= self.die_after:
                raise EngineDied("the stub engine died (test)")
            self.finished += 1
            yield held.pop()      # newest first: out of order on purpose

    def generate(self, requests, sampling, can_feed):
        for key, ids in self._stream(requests, can_feed):
            if getattr(sampling, "logprobs", None):
                yield key, [self._sample(ids, s) for s in range(sampling.samples)]
            else:
                yield key, [stub_text(ids, s) for s in range(sampling.samples)]

    def _sample(self, ids, sample):
        """A `Sample` that ends "Final Judgement: Yes" with made-up top log-probabilities
        (the tokens " Yes" and " No" among them, when they are single tokens)."""
        from nfb.engines.base import Sample

        d = _digest(ids + [sample])
        words = [self.tokenizer.encode(w, add_special_tokens=False) for w in (" Yes", " No")]
        top = {w[0]: -(d[i] / 64.0) for i, w in enumerate(words) if len(w) == 1}
        top.setdefault(self.tokenizer.eos_token_id, -0.01)
        return Sample(stub_text(ids, sample) + " Final Judgement: Yes",
                      ({0: -0.5}, top, {self.tokenizer.eos_token_id: -0.01}))

    def classify(self, requests, can_feed):
        for key, ids in self._stream(requests, can_feed):
            yield key, stub_heads(ids, self.heads)

    def close(self) -> None:
        self.closed = True


def slowed(engine: StubEngine, delay: float) -> StubEngine:
    """`engine` with each answer delayed by `delay` seconds (a slow engine or replica)."""
    import time

    stream = engine._stream

    def slow(requests, can_feed):
        for item in stream(requests, can_feed):
            time.sleep(delay)
            yield item
    engine._stream = slow
    return engine
