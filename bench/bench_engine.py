"""End-to-end rows/s of nfb against a bare vLLM script, same engine, same process.

    python bench/bench_engine.py [--rows 512] [--max-tokens 32] [--model DIR] [--rm-model DIR]

feedback: a bare script reads the same JSONL and calls `LLM.chat` on all rows at once with
the same sampling; nfb runs its whole pipeline (read, validate, template, length check,
continuous feeding, parsing, checkpoint parts, final Parquet) on the same `LLM` object.
score: bare `LLM.classify` on the chat-templated texts against `nfb score`. Runs alternate
(baseline, nfb, baseline, nfb, ...) and the median ratio is printed; 1.00 means nfb costs
nothing over the bare script. Without --model, tiny random Llama models are built (CPU).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import orjson
from common import machine, write_jsonl


class Shared:
    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def close(self):
        pass


def bare_chat(llm, src: Path, max_tokens: int) -> float:
    from vllm import SamplingParams

    from nfb.tasks.feedback import EVAL_PROMPT

    t0 = time.perf_counter()
    rows = [orjson.loads(x) for x in open(src, "rb")]
    convs = [[{"role": "user", "content": r["prompt"]},
              {"role": "assistant", "content": r["response"]},
              {"role": "user", "content": EVAL_PROMPT}] for r in rows]
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    assert len(outs) == len(rows)
    return len(rows) / (time.perf_counter() - t0)


def bare_classify(llm, src: Path) -> float:
    tok = llm.get_tokenizer()
    t0 = time.perf_counter()
    rows = [orjson.loads(x) for x in open(src, "rb")]
    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": r["response"]}],
                                     tokenize=False) for r in rows]
    outs = llm.classify(texts, use_tqdm=False)
    assert len(outs) == len(rows)
    return len(rows) / (time.perf_counter() - t0)


def nfb_run(engine, task, src: Path, out: Path, kind: str, sampling=None) -> float:
    from nfb.config import EngineConfig, RunConfig, SamplingConfig
    from nfb.pipeline import run

    cfg = RunConfig(task=kind, inputs=(str(src),), output=str(out), overwrite=True,
                    engine=EngineConfig(model=engine.cfg.model),
                    sampling=sampling or SamplingConfig())
    t0 = time.perf_counter()
    result = run(cfg, task, lambda: Shared(engine))
    assert result.rows and not result.error_rows, result.errors
    return result.rows / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", help="feedback model dir (default: tiny random Llama)")
    ap.add_argument("--rm-model", help="9-head reward model dir (default: tiny random)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    a = ap.parse_args()

    import tiny_models

    from nfb.config import EngineConfig, SamplingConfig
    from nfb.engines.vllm import VLLMEngine, on_cpu
    from nfb.tasks.feedback import FeedbackTask
    from nfb.tasks.reward import PRESETS, STEERLM_ATTRIBUTES, ScoreTask

    d = Path(tempfile.mkdtemp(prefix="nfb-bench-engine-"))
    fb_model = a.model or str(tiny_models.build_causal_lm(d / "causal"))
    rm_model = a.rm_model or str(tiny_models.build_reward_model(d / "rm9"))
    src = write_jsonl(d / "rows.jsonl", a.rows)
    mem = a.gpu_memory_utilization or (0.2 if on_cpu() else 0.9)
    print(f"# nfb vs bare vLLM, same engine and process ({machine()}); {a.rows} "
          f"HelpSteer-sized rows, greedy, max_tokens={a.max_tokens}")

    fb = VLLMEngine(EngineConfig(model=fb_model, dtype=a.dtype), "generate", mem)
    sampling = SamplingConfig(temperature=0, max_tokens=a.max_tokens)
    task = FeedbackTask(sampling)
    bare_chat(fb.llm, src, a.max_tokens)  # warm-up both paths
    nfb_run(fb, task, src, d / "fb.parquet", "feedback", sampling)
    base, ours = [], []
    for _ in range(a.repeats):
        base.append(bare_chat(fb.llm, src, a.max_tokens))
        ours.append(nfb_run(fb, task, src, d / "fb.parquet", "feedback", sampling))
    fb.close()
    ratios = [o / b for o, b in zip(ours, base)]
    print(f"feedback  bare LLM.chat {statistics.median(base):8.1f} rows/s | nfb "
          f"{statistics.median(ours):8.1f} rows/s | ratio {statistics.median(ratios):.3f} "
          f"(runs: {', '.join(f'{r:.3f}' for r in ratios)})")

    rm = VLLMEngine(EngineConfig(model=rm_model, dtype=a.dtype), "pooling", mem)
    stask = ScoreTask(list(STEERLM_ATTRIBUTES), list(PRESETS["llama3-70b-steerlm"][0]))
    bare_classify(rm.llm, src)
    nfb_run(rm, stask, src, d / "sc.parquet", "score")
    base, ours = [], []
    for _ in range(a.repeats):
        base.append(bare_classify(rm.llm, src))
        ours.append(nfb_run(rm, stask, src, d / "sc.parquet", "score"))
    rm.close()
    ratios = [o / b for o, b in zip(ours, base)]
    print(f"score     bare classify {statistics.median(base):8.1f} rows/s | nfb "
          f"{statistics.median(ours):8.1f} rows/s | ratio {statistics.median(ratios):.3f} "
          f"(runs: {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
