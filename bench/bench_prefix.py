"""The gain of vLLM's prefix caching when the requests of a row share their prompt.

    python bench/bench_prefix.py [--rows 256] [--responses 4] [--model DIR]

nfb turns prefix caching on for several responses per row (`--response-field` repeated,
`--responses-field`), principles and `--samples N`. This runs the same multi-response score
job through two engines of the same reward model, one with prefix caching and one without,
alternating over rounds in one process, checks they give the same values, and prints the
ratio of rows/s. Without --model a tiny random 9-head Llama is built (CPU).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import orjson
from common import Shared, helpsteer_rows, machine, text


def data(path: Path, rows: int, responses: int) -> Path:
    rng = random.Random(1)
    with open(path, "wb") as fh:
        for r in helpsteer_rows(rows):
            r["responses"] = [text(rng, 300) for _ in range(responses)]
            fh.write(orjson.dumps(r) + b"\n")
    return path


def one(engine, src: Path, out: Path) -> tuple[float, list]:
    import pyarrow.parquet as pq

    from nfb.api import for_fields
    from nfb.config import EngineConfig, RunConfig
    from nfb.models.steerlm import STEERLM_ATTRIBUTES
    from nfb.records import FieldMap
    from nfb.run.pipeline import run
    from nfb.tasks.reward import PRESETS, ScoreTask

    cfg = RunConfig(inputs=(str(src),), output=str(out), overwrite=True,
                    engine=EngineConfig(model=engine.cfg.model),
                    fields=FieldMap(responses_list="responses"))
    task = for_fields(ScoreTask(list(STEERLM_ATTRIBUTES),
                                list(PRESETS["llama3-70b-steerlm"][0])), cfg)
    t0 = time.perf_counter()
    result = run(cfg, task, lambda: Shared(engine))
    dt = time.perf_counter() - t0
    assert result.rows and not result.error_rows
    return result.rows / dt, pq.read_table(out).column("responses_reward").to_pylist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--responses", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", help="9-head reward model dir (default: tiny random)")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()

    import tiny_models

    from nfb.config import EngineConfig
    from nfb.engines.vllm import VLLMEngine

    d = Path(tempfile.mkdtemp(prefix="nfb-bench-prefix-"))
    model = a.model or str(tiny_models.build_reward_model(d / "rm9"))
    src = data(d / "rows.jsonl", a.rows, a.responses)
    print(f"# prefix caching, {a.rows} rows x {a.responses} responses sharing a ~700-char "
          f"prompt ({machine()}, {time.strftime('%Y-%m-%d')})")
    engines = {on: VLLMEngine(EngineConfig(model=model, dtype=a.dtype,
                                           enable_prefix_caching=on), "pooling")
               for on in (False, True)}
    rates = {False: [], True: []}
    values = {}
    for on in (False, True):
        one(engines[on], src, d / "warm.parquet")
    for i in range(a.repeats):
        for on in ((False, True) if i % 2 == 0 else (True, False)):
            rate, values[on] = one(engines[on], src, d / f"o{int(on)}.parquet")
            rates[on].append(rate)
    for e in engines.values():
        e.close()
    same = all(abs(x - y) <= 1e-4 * (1 + abs(x)) for u, v in zip(values[False], values[True])
               for x, y in zip(u, v))
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"prefix caching off {off:8.1f} rows/s | on {on:8.1f} rows/s | gain {on / off:.2f}x "
          f"(runs {', '.join(f'{b / a_:.2f}' for a_, b in zip(rates[False], rates[True]))}) "
          f"| same values: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
