"""filter / stats / best-of-n on generated scored Parquet: nfb on DuckDB vs the old pyarrow
implementation (HEAD's nfb/filters.py and nfb/stats.py, loaded from git as the baseline) vs a
hand-written DuckDB query (the limit).

    python bench/bench_verbs.py --rows 10_000_000 --files 8

Each measurement runs in its own process, so peak RSS (ru_maxrss) is that job's alone.
Default --rows 2,000,000 (a 2-core machine takes minutes per 10M-row pass of the baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ATTRS = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]


def generate(d: Path, rows: int, files: int, per_prompt: int = 4) -> list[str]:
    import numpy as np
    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {"task": "score", "model": "bench/RM", "columns": ["nfb_row", "nfb_error", *ATTRS,
                                                               "reward"],
            "task_settings": {"attributes": ATTRS, "weights": dict.fromkeys(ATTRS, 0.2)},
            "fingerprint": "f", "settings_fingerprint": "s", "prefix": "",
            "fields": {"prompt": "prompt"}}
    rng = np.random.default_rng(0)
    out, per = [], -(-rows // files)
    for f in range(files):
        lo, hi = f * per, min(rows, (f + 1) * per)
        if lo >= hi:
            break
        path = d / f"scored-{f:03d}.parquet"
        with pq.ParquetWriter(path, None or pa.schema([
                ("id", pa.int64()), ("prompt", pa.string()), ("response", pa.string()),
                ("source", pa.string()), ("nfb_row", pa.int64()), ("nfb_error", pa.string()),
                *[(a, pa.float64()) for a in ATTRS], ("reward", pa.float64())]).with_metadata(
                {b"nfb": orjson.dumps(meta)}), compression="zstd") as w:
            for s in range(lo, hi, 1_000_000):
                e = min(hi, s + 1_000_000)
                n = e - s
                idx = np.arange(s, e)
                att = {a: rng.normal(2, 1, n) for a in ATTRS}
                err = np.where(idx % 97 == 0, "null_field", None)
                w.write_table(pa.table({
                    "id": idx, "prompt": pa.array([f"prompt {i // per_prompt}" for i in idx]),
                    "response": pa.array([f"response text number {i}" for i in idx]),
                    "source": pa.array(np.array(["web", "forum", "book"])[idx % 3]),
                    "nfb_row": idx, "nfb_error": pa.array(err.tolist(), pa.string()),
                    **att, "reward": sum(att.values()) * 0.2}))
        out.append(str(path))
    return out


def _old_module(name: str) -> types.ModuleType:
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:nfb/{name}.py"],
                         capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType(f"old_{name}")
    sys.modules[mod.__name__] = mod   # dataclasses look their module up
    exec(compile(src, f"HEAD:nfb/{name}.py", "exec"), mod.__dict__)
    return mod


def work(impl: str, task: str, files: list[str], out: str) -> None:
    if impl == "old":
        if task == "stats":
            _old_module("stats").compute_stats(files)
            return
        F = _old_module("filters")
        spec = F.build_spec(min_level=None, max_level=None,
                            min_reward=0.0 if task == "filter" else None, max_reward=None,
                            where=[], drop_errors=True, best_of_n=task == "best",
                            group_by="prompt" if task == "best" else None,
                            drop_nfb_columns=False, prefix="")
        F.run_filter(files, out, spec)
    elif impl == "nfb":
        from nfb.api import filter as nfb_filter
        from nfb.api import stats as nfb_stats
        if task == "stats":
            nfb_stats(files)
        elif task == "filter":
            nfb_filter(files, out, min_reward=0.0, drop_errors=True)
        else:
            nfb_filter(files, out, best_of_n=True, group_by="prompt", drop_errors=True)
    else:  # the limit: one hand-written DuckDB statement
        import duckdb
        con = duckdb.connect()
        src = f"read_parquet({files!r})"
        if task == "stats":
            cols = ", ".join(f"count({c}), avg({c}), quantile_cont({c}, [0, .05, .25, .5, .75, "
                             f".95, 1])" for c in [*ATTRS, "reward"])
            con.execute(f"SELECT count(*), count(nfb_error), {cols} FROM {src}").fetchall()
            con.execute(f"SELECT nfb_error, count(*) FROM {src} GROUP BY 1").fetchall()
        elif task == "filter":
            con.execute(f"COPY (SELECT * FROM {src} WHERE reward >= 0 AND NOT isnan(reward) "
                        f"AND nfb_error IS NULL) TO '{out}' (FORMAT parquet, COMPRESSION zstd)")
        else:
            con.execute(f"COPY (SELECT * FROM {src} WHERE nfb_error IS NULL AND reward IS NOT "
                        "NULL AND NOT isnan(reward) QUALIFY row_number() OVER (PARTITION BY "
                        "prompt ORDER BY reward DESC) = 1) "
                        f"TO '{out}' (FORMAT parquet, COMPRESSION zstd)")


def measure(impl: str, task: str, files: list[str], d: Path) -> dict:
    out = d / f"out-{impl}-{task}.parquet"
    cmd = [sys.executable, __file__, "--worker", impl, task, str(out), *files]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if out.exists():
        import pyarrow.parquet as pq
        res["rows_out"] = pq.ParquetFile(out).metadata.num_rows
        out.unlink()
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        impl, task, out, *files = sys.argv[2:]
        t = time.perf_counter()
        work(impl, task, files, out)
        secs = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"secs": secs, "peak_rss_mb": rss}))
        return
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=lambda s: int(s.replace("_", "")), default=2_000_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--tasks", default="filter,best,stats")
    ap.add_argument("--impls", default="old,nfb,duckdb")
    ap.add_argument("--dir", default=None, help="keep the generated data here")
    ap.add_argument("--memory-limit", default=None,
                    help="DuckDB memory limit for nfb's verbs (NFB_SQL_MEMORY_LIMIT), e.g. 256MB")
    a = ap.parse_args()
    if a.memory_limit:
        os.environ["NFB_SQL_MEMORY_LIMIT"] = a.memory_limit
    d = Path(a.dir or tempfile.mkdtemp(prefix="nfb-bench-verbs-"))
    d.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p) for p in d.glob("scored-*.parquet"))
    if not files:
        t = time.perf_counter()
        files = generate(d, a.rows, a.files)
        print(f"generated {a.rows:,} rows in {len(files)} files in "
              f"{time.perf_counter() - t:.1f}s ({d})")
    import pyarrow.parquet as pq
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, {n:,} rows, "
          f"{sum(os.path.getsize(f) for f in files) / 1e6:.0f} MB")
    print(f"{'task':8} {'impl':8} {'secs':>8} {'peak MB':>8} {'rows out':>10} "
          f"{'vs old':>7} {'vs duckdb':>9}")
    for task in a.tasks.split(","):
        res = {impl: measure(impl, task, files, d) for impl in a.impls.split(",")}
        for impl, r in res.items():
            if "error" in r:
                print(f"{task:8} {impl:8} error: {r['error']}")
                continue
            old, lim = res.get("old", {}).get("secs"), res.get("duckdb", {}).get("secs")
            print(f"{task:8} {impl:8} {r['secs']:8.2f} {r['peak_rss_mb']:8.0f} "
                  f"{r.get('rows_out', '-'):>10} "
                  f"{(old / r['secs']) if old else float('nan'):6.2f}x "
                  f"{(r['secs'] / lim) if lim else float('nan'):8.2f}x")


if __name__ == "__main__":
    main()
