"""nfb's own I/O path, engine stubbed: rows/s and peak memory vs input size.

    python bench/bench_io.py [--rows 200000] [--big 1000000]

Prints (1) rows/s of the whole nfb pipeline (read JSONL, validate, build conversations,
checkpoint parts, merge to Parquet) against a bare baseline measured in the same process
(orjson line parse + pyarrow Parquet write of the same rows), and (2) peak RSS of nfb on
N rows and on 10 N rows, each in a fresh subprocess: the ratio shows memory does not grow
with input size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from common import ROOT, StubEngine, machine, peak_rss_mb, write_jsonl


def run_nfb(src: Path, out: Path, task: str = "feedback") -> float:
    from nfb.config import EngineConfig, RunConfig, SamplingConfig
    from nfb.pipeline import run
    from nfb.tasks.feedback import FeedbackTask
    from nfb.tasks.reward import PRESETS, STEERLM_ATTRIBUTES, ScoreTask

    cfg = RunConfig(task=task, inputs=(str(src),), output=str(out), overwrite=True,
                    engine=EngineConfig(model="stub"), sampling=SamplingConfig())
    t = FeedbackTask(cfg.sampling) if task == "feedback" else ScoreTask(
        list(STEERLM_ATTRIBUTES), list(PRESETS["llama3-70b-steerlm"][0]))
    t0 = time.perf_counter()
    result = run(cfg, t, StubEngine)
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
                t = pa.Table.from_pylist(batch)
                t = t.append_column("feedback", pa.array(["The response is mostly helpful."]
                                                         * len(t)))
                writer = writer or pq.ParquetWriter(out, t.schema, compression="zstd")
                writer.write_table(t)
                rows += len(t)
                batch = []
        if batch:
            t = pa.Table.from_pylist(batch)
            t = t.append_column("feedback", pa.array(["The response is mostly helpful."]
                                                     * len(t)))
            writer = writer or pq.ParquetWriter(out, t.schema, compression="zstd")
            writer.write_table(t)
            rows += len(t)
    writer.close()
    return rows / (time.perf_counter() - t0)


def child(src: str, out: str) -> None:
    run_nfb(Path(src), Path(out))
    print(f"{peak_rss_mb():.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--big", type=int, default=1_000_000, help="0 skips the memory test")
    ap.add_argument("--small", type=int, default=100_000)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    d = Path(a.dir or tempfile.mkdtemp(prefix="nfb-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    src = write_jsonl(d / f"hs-{a.rows}.jsonl", a.rows)
    mb = src.stat().st_size / 1e6
    print(f"# nfb I/O benchmark, engine stubbed ({machine()}); {a.rows:,} HelpSteer-sized rows, "
          f"{mb:,.0f} MB JSONL")
    base, nfb_fb, nfb_sc = [], [], []
    for _ in range(3):  # interleaved, best of 3: this machine's timings are noisy
        base.append(run_baseline(src, d / "base.parquet"))
        nfb_fb.append(run_nfb(src, d / "fb.parquet", "feedback"))
        nfb_sc.append(run_nfb(src, d / "sc.parquet", "score"))
    b, f, s = max(base), max(nfb_fb), max(nfb_sc)
    print(f"baseline (orjson + Parquet)  {b:>10,.0f} rows/s")
    print(f"nfb feedback, stub engine    {f:>10,.0f} rows/s   ratio to baseline {f / b:.2f}")
    print(f"nfb score, stub engine       {s:>10,.0f} rows/s   ratio to baseline {s / b:.2f}")
    print(f"target: >= 50,000 rows/s -> feedback {'PASS' if f >= 50_000 else 'FAIL'}, "
          f"score {'PASS' if s >= 50_000 else 'FAIL'}")
    if a.big:
        rss = {}
        for n in (a.small, a.big):
            p = write_jsonl(d / f"hs-{n}.jsonl", n)
            r = subprocess.run([sys.executable, __file__, "--child", str(p),
                                str(d / f"mem-{n}.parquet")], capture_output=True, text=True,
                               cwd=ROOT / "bench", check=True)
            rss[n] = float(r.stdout.strip().splitlines()[-1])
        print(f"peak RSS {a.small:>9,} rows  {rss[a.small]:8.1f} MB")
        ratio = rss[a.big] / rss[a.small]
        print(f"peak RSS {a.big:>9,} rows  {rss[a.big]:8.1f} MB   ratio {ratio:.3f} "
              f"({'PASS' if ratio <= 1.1 else 'FAIL'}: <= 1.10)")


if __name__ == "__main__":
    main()
