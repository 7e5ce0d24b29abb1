"""nfb's own work before and around the engine, measured against limits in the same process.

    python bench/bench_io.py [--rows 20000] [--big 1000000] [--tokenizer DIR]

1. Pre-engine rate: nfb reads HelpSteer-sized JSONL rows, validates them, renders the
   feedback conversation with the chat template and tokenizes it (the demo model's real
   49k-vocab tokenizer with a Llama-3-style template), in its reader thread and tokenizer
   worker pool. The limit beside it: the `tokenizers` library's `encode_batch` of the same
   rendered texts on all cores (no reading, no templating). Goal: >= 0.9x the limit.
2. The whole pipeline with an engine that answers at once (read, validate, template,
   tokenize, collect, checkpoint parts, final Parquet) against a bare orjson + Parquet loop.
3. Peak RSS of (2) on N rows and on 10 N rows, each in a fresh subprocess: flat in N.
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
import pyarrow as pa
import pyarrow.parquet as pq
from common import ROOT, InstantEngine, bench_tokenizer, machine, peak_rss_mb, write_jsonl


def _cfg(src: Path, out: Path, batch_rows: int = 256):
    from nfb.config import EngineConfig, RunConfig

    return RunConfig(inputs=(str(src),), output=str(out), overwrite=True,
                     engine=EngineConfig(model="bench"), batch_rows=batch_rows)


def feedback_task():
    from nfb.config import SamplingConfig
    from nfb.tasks.feedback import FeedbackTask
    return FeedbackTask(SamplingConfig(max_tokens=4096))


def pre_engine(src: Path, tok, workers: int | None) -> tuple[float, float]:
    """nfb's Feeder alone: rows/s and tokens/s from JSONL to token ids."""
    import numpy as np

    from nfb.run.feed import Feeder

    t0 = time.perf_counter()
    feeder = Feeder(_cfg(src, src.with_suffix(".x.parquet")), feedback_task(), tok,
                    np.zeros(0, dtype=bool), budget=1 << 30, workers=workers)
    rows = tokens = 0
    try:
        for prep in feeder:
            rows += len(prep.pending.rows)
            tokens += sum(len(t) for _, toks in prep.requests for t in toks)
    finally:
        feeder.close()
    dt = time.perf_counter() - t0
    return rows / dt, tokens / dt


def rendered_texts(src: Path, tok) -> list[str]:
    from nfb.records import Conversation
    from nfb.tasks.feedback import eval_messages

    rows = [orjson.loads(x) for x in open(src, "rb")]
    return [tok.apply_chat_template(
        eval_messages(Conversation(({"role": "user", "content": r["prompt"]},), r["response"])),
        tokenize=False, add_generation_prompt=True) for r in rows]


def encode_limit(texts: list[str], tok, ids: bool = False) -> tuple[float, float]:
    """The tokenizers library alone: encode_batch of pre-rendered texts on all cores (with
    `ids`, also reading the ids out as Python lists, which any consumer must do)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    t0 = time.perf_counter()
    enc = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    if ids:
        [e.ids for e in enc]
    dt = time.perf_counter() - t0
    return len(texts) / dt, sum(len(e.ids) for e in enc) / dt


def run_nfb(src: Path, out: Path, tok, task: str = "feedback") -> float:
    from nfb.models.steerlm import STEERLM_ATTRIBUTES
    from nfb.run.pipeline import run
    from nfb.tasks.reward import PRESETS, ScoreTask

    t = feedback_task() if task == "feedback" else ScoreTask(
        list(STEERLM_ATTRIBUTES), list(PRESETS["llama3-70b-steerlm"][0]))
    t0 = time.perf_counter()
    result = run(_cfg(src, out), t, lambda: InstantEngine(tok))
    dt = time.perf_counter() - t0
    assert result.rows == pq.ParquetFile(out).metadata.num_rows
    return result.rows / dt


def run_baseline(src: Path, out: Path) -> float:
    """The least a tool must do: parse each line, write the rows (plus a text column)."""
    t0 = time.perf_counter()
    writer = None
    rows = 0
    with open(src, "rb") as fh:
        batch = []
        for line in fh:
            batch.append(orjson.loads(line))
            if len(batch) == 1024:
                rows += _write(batch, out, writer := writer or [None])
                batch = []
        if batch:
            rows += _write(batch, out, writer)
    writer[0].close()
    return rows / (time.perf_counter() - t0)


def _write(batch, out, holder) -> int:
    t = pa.Table.from_pylist(batch)
    t = t.append_column("feedback", pa.array(["The response is mostly helpful."] * len(t)))
    holder[0] = holder[0] or pq.ParquetWriter(out, t.schema, compression="zstd")
    holder[0].write_table(t)
    return len(t)


def child(src: str, out: str, tokenizer: str | None) -> None:
    run_nfb(Path(src), Path(out), bench_tokenizer(tokenizer))
    print(f"{peak_rss_mb():.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big", type=int, default=200_000, help="0 skips the memory test")
    ap.add_argument("--small", type=int, default=20_000)
    ap.add_argument("--tokenizer", help="tokenizer dir (default: the demo model's)")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        return child(*a.child, a.tokenizer)
    d = Path(a.dir or tempfile.mkdtemp(prefix="nfb-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    tok = bench_tokenizer(a.tokenizer)
    src = write_jsonl(d / f"hs-{a.rows}.jsonl", a.rows)
    texts = rendered_texts(src, tok)
    ntok = sum(len(x) for x in tok(texts[:200], add_special_tokens=False)["input_ids"]) / 200
    print(f"# nfb I/O benchmark ({machine()}, {time.strftime('%Y-%m-%d')}); {a.rows:,} "
          f"HelpSteer-sized rows, {ntok:.0f} tokens per rendered feedback prompt, tokenizer "
          f"{type(tok).__name__} ({len(tok):,} tokens)")
    lim, lim_ids, ours, tps_l, tps_o = [], [], [], [], []
    for _ in range(a.repeats):   # alternated: this machine's timings are noisy
        r, t = encode_limit(texts, tok)
        lim.append(r)
        tps_l.append(t)
        lim_ids.append(encode_limit(texts, tok, ids=True)[0])
        r, t = pre_engine(src, tok, None)
        ours.append(r)
        tps_o.append(t)
    med = statistics.median
    print(f"limit: tokenizers encode_batch, all cores  {med(lim):>9,.0f} rows/s "
          f"{med(tps_l):>12,.0f} tokens/s")
    print(f"  the same, ids read out as Python lists   {med(lim_ids):>9,.0f} rows/s")
    ratio = med(ours) / med(lim)
    print(f"nfb pre-engine (read+template+tokenize)    {med(ours):>9,.0f} rows/s "
          f"{med(tps_o):>12,.0f} tokens/s   ratio {ratio:.2f} "
          f"({'PASS' if ratio >= 0.9 else 'FAIL'}: >= 0.90; runs "
          f"{', '.join(f'{o / m:.2f}' for o, m in zip(ours, lim))})")
    base, fb, sc = [], [], []
    for _ in range(a.repeats):
        base.append(run_baseline(src, d / "base.parquet"))
        fb.append(run_nfb(src, d / "fb.parquet", tok, "feedback"))
        sc.append(run_nfb(src, d / "sc.parquet", tok, "score"))
    b = med(base)
    print(f"bare orjson + Parquet loop                 {b:>9,.0f} rows/s")
    print(f"nfb feedback, instant engine               {med(fb):>9,.0f} rows/s")
    print(f"nfb score, instant engine                  {med(sc):>9,.0f} rows/s")
    if a.big:
        rss = {}
        for n in (a.small, a.big):
            p = write_jsonl(d / f"hs-{n}.jsonl", n)
            args = [sys.executable, __file__, "--child", str(p), str(d / f"mem-{n}.parquet")]
            if a.tokenizer:
                args += ["--tokenizer", a.tokenizer]
            r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT / "bench",
                               check=True)
            rss[n] = float(r.stdout.strip().splitlines()[-1])
        ratio = rss[a.big] / rss[a.small]
        print(f"peak RSS {a.small:>9,} rows  {rss[a.small]:8.1f} MB")
        print(f"peak RSS {a.big:>9,} rows  {rss[a.big]:8.1f} MB   ratio {ratio:.3f} "
              f"({'PASS' if ratio <= 1.1 else 'FAIL'}: <= 1.10)")


if __name__ == "__main__":
    main()
