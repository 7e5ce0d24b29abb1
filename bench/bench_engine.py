"""End-to-end rows/s of nfb against a bare vLLM script, same engine, same process.

    python bench/bench_engine.py [--rows 512] [--max-tokens 32] [--model DIR] [--rm-model DIR]
                                 [-tp N] [--dtype bfloat16]

On a GPU, point it at a small real model (e.g. --model Qwen2.5-0.5B-Instruct --rm-model a
small *ForSequenceClassification reward model --dtype bfloat16) to print the same ratios plus
tokens/s.

feedback: a bare script reads the same JSONL and calls `LLM.chat` on all rows at once with
the same sampling; nfb runs its whole pipeline (read, validate, template, length check,
continuous feeding, parsing, checkpoint parts, final Parquet) on the same `LLM` object.
score: bare `LLM.classify` on the chat-templated texts against `nfb score`. Runs alternate
(baseline first in odd rounds, nfb first in even rounds); the median ratio and its spread are
printed, and both sides must give the same outputs (greedy texts, head values); 1.00 means nfb
costs nothing over the bare script. Without --model, tiny random Llama models are built (CPU).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import orjson
from common import Shared, machine, write_jsonl


def _rows(src: Path) -> list[dict]:
    return [orjson.loads(x) for x in open(src, "rb")]


def bare_chat(llm, src: Path, max_tokens: int) -> tuple[float, list[str], int]:
    from vllm import SamplingParams

    from nfb.tasks.feedback import EVAL_PROMPT

    t0 = time.perf_counter()
    rows = _rows(src)
    convs = [[{"role": "user", "content": r["prompt"]},
              {"role": "assistant", "content": r["response"]},
              {"role": "user", "content": EVAL_PROMPT}] for r in rows]
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    dt = time.perf_counter() - t0
    assert len(outs) == len(rows)
    tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs)
    return len(rows) / dt, [o.outputs[0].text for o in outs], int(tokens / dt)


def bare_classify(llm, src: Path) -> tuple[float, list[list[float]], int]:
    from vllm import PoolingParams

    tok = llm.get_tokenizer()
    t0 = time.perf_counter()
    rows = _rows(src)
    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": r["response"]}],
                                     tokenize=False) for r in rows]
    outs = llm.classify(texts, use_tqdm=False,
                        pooling_params=PoolingParams(use_activation=False),
                        tokenization_kwargs={"add_special_tokens": False})
    dt = time.perf_counter() - t0
    assert len(outs) == len(rows)
    tokens = sum(len(o.prompt_token_ids) for o in outs)
    return len(rows) / dt, [list(o.outputs.probs) for o in outs], int(tokens / dt)


def nfb_run(engine, task, src: Path, out: Path) -> tuple[float, list]:
    import pyarrow.parquet as pq

    from nfb.config import EngineConfig, RunConfig
    from nfb.pipeline import run

    cfg = RunConfig(inputs=(str(src),), output=str(out), overwrite=True,
                    engine=EngineConfig(model=engine.cfg.model))
    t0 = time.perf_counter()
    result = run(cfg, task, lambda: Shared(engine))
    dt = time.perf_counter() - t0
    assert result.rows and not result.error_rows, result.errors
    t = pq.read_table(out)
    if task.runner == "generate":
        values = t.column("feedback").to_pylist()
    else:
        cols = task.attributes or ["reward"]
        values = [[row[c] for c in cols] for row in t.to_pylist()]
    return result.rows / dt, values


def rounds(n: int, bare, ours):
    """Alternate which side goes first; returns (bare rates, nfb rates, outputs, tokens/s)."""
    base, mine = [], []
    for i in range(n):
        order = [("b", bare), ("n", ours)] if i % 2 == 0 else [("n", ours), ("b", bare)]
        for side, fn in order:
            got = fn()
            (base if side == "b" else mine).append(got)
    return base, mine


def report(name: str, base, mine, same: bool) -> None:
    ratios = [m[0] / b[0] for b, m in zip(base, mine)]
    med = statistics.median
    print(f"{name:9} bare {med([b[0] for b in base]):9.1f} rows/s "
          f"({med([b[2] for b in base]):,.0f} tokens/s) | nfb {med([m[0] for m in mine]):9.1f} "
          f"rows/s | ratio median {med(ratios):.3f}, spread {min(ratios):.3f}-{max(ratios):.3f} "
          f"| same outputs: {'yes' if same else 'NO'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--model", help="feedback model dir (default: tiny random Llama)")
    ap.add_argument("--rm-model", help="reward model dir (default: tiny random, 9 heads)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    a = ap.parse_args()

    import tiny_models

    from nfb.config import EngineConfig, SamplingConfig
    from nfb.engines.vllm import VLLMEngine
    from nfb.modelinfo import read_model_info
    from nfb.tasks.feedback import FeedbackTask
    from nfb.tasks.reward import ScoreTask, attribute_names

    d = Path(tempfile.mkdtemp(prefix="nfb-bench-engine-"))
    fb_model = a.model or str(tiny_models.build_causal_lm(d / "causal"))
    rm_model = a.rm_model or str(tiny_models.build_reward_model(d / "rm9"))
    src = write_jsonl(d / "rows.jsonl", a.rows)
    print(f"# nfb vs bare vLLM, same engine and process ({machine()}, "
          f"{time.strftime('%Y-%m-%d')}); {a.rows} HelpSteer-sized rows, greedy, "
          f"max_tokens={a.max_tokens}, tp={a.tensor_parallel_size}")
    ecfg = dict(dtype=a.dtype, tensor_parallel_size=a.tensor_parallel_size,
                gpu_memory_utilization=a.gpu_memory_utilization)

    fb = VLLMEngine(EngineConfig(model=fb_model, **ecfg), "generate")
    task = FeedbackTask(SamplingConfig(temperature=0, max_tokens=a.max_tokens))
    bare_chat(fb.llm, src, a.max_tokens)  # warm-up both paths
    nfb_run(fb, task, src, d / "fb.parquet")
    base, mine = rounds(a.repeats, lambda: bare_chat(fb.llm, src, a.max_tokens),
                        lambda: nfb_run(fb, task, src, d / "fb.parquet"))
    fb.close()
    report("feedback", base, mine, all(b[1] == m[1] for b, m in zip(base, mine)))

    rm = VLLMEngine(EngineConfig(model=rm_model, **ecfg), "pooling")
    info = read_model_info(rm_model, None, False)
    names = attribute_names(info.num_heads, info.id2label, None)
    stask = ScoreTask(names, [1.0] * len(names)) if len(names) > 1 else ScoreTask(None, None)
    bare_classify(rm.llm, src)
    nfb_run(rm, stask, src, d / "sc.parquet")
    base, mine = rounds(a.repeats, lambda: bare_classify(rm.llm, src),
                        lambda: nfb_run(rm, stask, src, d / "sc.parquet"))
    rm.close()

    def close(x, y):
        return all(abs(p - q) <= 1e-4 * (1 + abs(p)) for u, v in zip(x, y) for p, q in zip(u, v))
    report("score", base, mine, all(close(b[1], m[1]) for b, m in zip(base, mine)))


if __name__ == "__main__":
    main()
