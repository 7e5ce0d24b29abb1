"""`--dry-run`: the plan of a run before any GPU: rows, requests, prompt tokens, the error rows
a real run would write, and an estimate of engine time.

Every row goes through the pipeline's own `Feeder` (read, validate, chat template, tokenize,
the prompt budget check), as in a real run, with the tokenizer and config read from the
model directory or the Hugging Face cache (no weights, no engine). So the error rows counted
here are the ones a real run writes before the engine (every reason but what the engine
itself may refuse), by the same code.

The engine-time estimate divides the token counts by per-GPU rates from `RATES`. Each rate
says whether it was measured (a run of nfb on that GPU) or derived (from the datasheet's
dense BF16 peak with a stated efficiency, for the model's parameter count read from its
config): a derived figure is a rough guide, within about 2x.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from nfb.config import RunConfig
from nfb.errors import UsageError
from nfb.models.modelinfo import ModelFacts
from nfb.run.collect import error_code
from nfb.run.feed import Feeder
from nfb.run.pipeline import prepare
from nfb.tasks.base import Task

# Efficiency assumed for derived rates (model FLOPs utilisation of vLLM in offline batch
# runs): prefill is compute-bound and batches well; decode at large batch reaches less.
PREFILL_MFU = 0.5
DECODE_MFU = 0.2


@dataclass(frozen=True)
class GpuRate:
    gpu: str
    bf16_tflops: float        # dense BF16 peak, from the vendor's datasheet
    source: str               # "derived" (from bf16_tflops) or "measured" (an nfb run)
    note: str = ""
    # measured rates in tokens per second per GPU for a 1-billion-parameter model; None
    # when derived (then: tflops * MFU / (2 * params))
    prefill_per_bparam: float | None = None
    decode_per_bparam: float | None = None

    def rates(self, params: float) -> tuple[float, float]:
        """(prefill, decode) tokens per second per GPU for a model of `params` parameters."""
        b = params / 1e9
        if self.prefill_per_bparam is not None and self.decode_per_bparam is not None:
            return self.prefill_per_bparam / b, self.decode_per_bparam / b
        flops = self.bf16_tflops * 1e12
        return flops * PREFILL_MFU / (2 * params), flops * DECODE_MFU / (2 * params)


# Every figure here is DERIVED (none measured yet: nfb has not been timed on these GPUs).
# Peaks are the datasheets' dense BF16 tensor-core figures (no sparsity).
RATES: tuple[GpuRate, ...] = (
    GpuRate("H100-SXM", 989.0, "derived", "NVIDIA H100 datasheet, SXM5"),
    GpuRate("H200", 989.0, "derived", "NVIDIA H200 datasheet (H100 compute, more HBM)"),
    GpuRate("B200", 2250.0, "derived", "NVIDIA B200 datasheet (HGX B200, per GPU)"),
    GpuRate("A100-80GB", 312.0, "derived", "NVIDIA A100 datasheet"),
    GpuRate("L40S", 362.0, "derived", "NVIDIA L40S datasheet"),
)


def count_params(config: dict) -> int | None:
    """The parameter count of a Llama-like decoder from its config.json (embeddings and
    output head included), or None when the config lacks the sizes."""
    text = config.get("text_config") or config
    try:
        h = int(text["hidden_size"])
        layers = int(text["num_hidden_layers"])
        inter = int(text.get("intermediate_size") or 4 * h)
        heads = int(text.get("num_attention_heads") or 1)
        kv = int(text.get("num_key_value_heads") or heads)
        vocab = int(text.get("vocab_size") or 0)
    except (KeyError, TypeError, ValueError):
        return None
    head_dim = int(text.get("head_dim") or h // heads)
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2     # q, o + k, v
    mlp = 3 * h * inter                                         # gate, up, down
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    archs = config.get("architectures") or []
    if any(str(a).endswith("ForSequenceClassification") for a in archs):
        head = h * int(config.get("num_labels") or len(config.get("id2label") or {}) or 1)
    else:
        head = 0 if tied else vocab * h
    return layers * (attn + mlp + 2 * h) + vocab * h + head + h


@dataclass
class DryRunResult:
    output: str
    task: str
    rows: int = 0
    requests: int = 0
    sequences: int = 0               # generated sequences (requests x samples), 0 for score
    prompt_tokens: list[int] = field(default_factory=list, repr=False)
    errors: Counter = field(default_factory=Counter)
    truncated: int | None = None     # rows --too-long would shorten (None: the policy is error)
    max_tokens: int = 0
    max_model_len: int = 0
    prompt_budget: int = 0
    params: int | None = None
    gpus: int = 1
    seconds: float = 0.0             # this dry run (read, validate, template, tokenize)
    dry_run: bool = True

    @property
    def error_rows(self) -> int:
        return sum(self.errors.values())

    def token_stats(self) -> dict:
        t = np.asarray(self.prompt_tokens, dtype=np.int64)
        if not len(t):
            return {"total": 0, "mean": None, "p50": None, "p99": None, "max": None}
        return {"total": int(t.sum()), "mean": round(float(t.mean()), 1),
                "p50": float(np.percentile(t, 50)), "p99": float(np.percentile(t, 99)),
                "max": int(t.max())}

    def estimate(self) -> dict:
        """Engine seconds per GPU type: prefill of every prompt token, plus decode of
        `max_tokens` per generated sequence (an upper bound: most stop earlier)."""
        total = int(np.sum(self.prompt_tokens)) if self.prompt_tokens else 0
        out_tokens = self.sequences * self.max_tokens
        rows = []
        for r in RATES:
            if not self.params:
                break
            pre, dec = r.rates(self.params)
            p_s = total / (pre * self.gpus)
            d_s = out_tokens / (dec * self.gpus) if out_tokens else 0.0
            rows.append({"gpu": r.gpu, "source": r.source,
                         "prefill_tokens_per_s_per_gpu": round(pre),
                         "decode_tokens_per_s_per_gpu": round(dec),
                         "prefill_s": round(p_s, 1), "decode_s_at_most": round(d_s, 1),
                         "engine_s_at_most": round(p_s + d_s, 1)})
        return {"params": self.params, "gpus": self.gpus,
                "output_tokens_at_most": out_tokens, "gpus_table": rows,
                "assumptions": (f"derived rates: dense BF16 peak x {PREFILL_MFU} (prefill) or "
                                f"x {DECODE_MFU} (decode) / (2 x params); decode counts "
                                "max_tokens per sequence (an upper bound); GPUs scale "
                                "linearly; model load not included; under ~1 B parameters "
                                "per-step overheads dominate: the figures are too low")}

    def summary(self) -> dict:
        return {"dry_run": True, "task": self.task, "output": self.output, "rows": self.rows,
                "requests": self.requests, "sequences": self.sequences,
                "prompt_tokens": self.token_stats(), "error_rows": self.error_rows,
                "errors": dict(self.errors.most_common()),
                **({} if self.truncated is None else {"truncated": self.truncated}),
                "max_model_len": self.max_model_len, "prompt_budget": self.prompt_budget,
                "max_tokens": self.max_tokens, "seconds": round(self.seconds, 2),
                "estimate": self.estimate()}


def dry_run(cfg: RunConfig, task: Task, log=lambda _m: None,
            facts: ModelFacts | None = None) -> DryRunResult:
    """Plan `task` over the inputs of `cfg` exactly as `nfb.run.pipeline.run` would feed it
    (`facts`: what the run's setup read of the model already)."""

    t0 = time.monotonic()
    prepare(cfg, task)   # the checks a real run makes first (column clashes)
    eng = cfg.engine
    facts = facts or ModelFacts(eng.model, eng.revision, eng.trust_remote_code)
    tok = facts.tokenizer
    if tok is None:
        raise UsageError(f"--dry-run needs the tokenizer of {eng.model!r}: give a local model "
                         "directory, or one in the Hugging Face cache (no weights needed)")
    max_len = eng.max_model_len or facts.info.max_position_embeddings
    if not max_len:
        raise UsageError(f"{eng.model}: its config gives no context length; pass "
                         "--max-model-len")
    budget = task.prompt_budget(max_len)
    if budget <= 0:
        raise UsageError(
            f"the model allows {max_len} tokens in all, which leaves no room for a prompt: "
            "lower --max-tokens or raise --max-model-len")
    task.check_tokenizer(tok)
    sampling = task.sampling
    generate = task.runner == "generate"
    res = DryRunResult(cfg.output, task.name, max_model_len=max_len, prompt_budget=budget,
                       max_tokens=sampling.max_tokens if generate and sampling else 0,
                       params=count_params(facts.config_json),
                       gpus=eng.tensor_parallel_size * max(1, eng.replicas))
    samples = sampling.samples if generate and sampling else 0
    feeder = Feeder(cfg, task, tok, np.zeros(0, dtype=bool), budget)
    try:
        for prep in feeder:
            res.rows += len(prep.pending.rows)
            for _, reason in prep.failed:
                res.errors[error_code(reason)] += 1
            if cfg.too_long != "error":
                failed = {j for j, _ in prep.failed}
                res.truncated = (res.truncated or 0) + sum(
                    1 for j in prep.truncated if j not in failed)
            for _, toks in prep.requests:
                res.requests += len(toks)
                res.prompt_tokens.extend(len(t) for t in toks)
    finally:
        feeder.close()
    res.sequences = res.requests * samples
    res.seconds = time.monotonic() - t0
    return res
