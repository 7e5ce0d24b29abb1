"""--engine ray on a simulated cluster: scaling, the driver's share of the CPU, engine loads.

A head (no CPU: it only coordinates) and two worker nodes of 1 CPU each
(`ray.cluster_utils.Cluster`), CPU vLLM, the tiny 9-head reward model with the SteerLM
recipe, HelpSteer-sized rows. One score run with 1 replica and one with 2, each a driver
process of its own (`python -m nfb score ... --engine ray --ray-address ...`). Printed:

- rows/s with 1 and with 2 replicas (scoring, after the engines loaded), and their ratio;
- the driver's CPU seconds against the CPU seconds of the whole run (driver, raylets, Ray
  workers, vLLM engines), goal under 5%;
- engine loads for an input of 10 former blocks (`--ray-block-rows` was one Ray Data job,
  so one load per replica, per block): goal, equal to the replicas.

    flock /tmp/nfb-vllm.lock python bench/bench_ray.py [--rows 2000]

This machine has 2 cores shared by everything (both replicas, the CPU stages, the driver):
the ratio of 2 to 1 replicas says how the pipeline scales only where a replica has cores
(or a GPU) of its own.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, helpsteer_rows

BLOCKS = 10


class TreeCPU:
    """CPU seconds of this process's descendants over a run, sampled every 0.2 s (a vLLM
    engine process dies with its actor, and no parent reaps its time): per process, the
    last sample less the first (or the whole, for a process new in the run)."""

    def __init__(self):
        import threading
        self.first = _tree_cpu(os.getpid())
        self.last = dict(self.first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.last.update(_tree_cpu(os.getpid()))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.last.update(_tree_cpu(os.getpid()))
        return sum(v - self.first.get(pid, 0.0) for pid, v in self.last.items())


def _tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of `pid`'s descendants, each with its reaped children's."""
    import psutil

    out = {}
    for p in psutil.Process(pid).children(recursive=True):
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            continue
    return out


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cluster, model: Path, src: Path, out: Path, replicas: int) -> dict:
    from nfb.io.writers import read_metadata

    cmd = [sys.executable, "-m", "nfb", "score", str(src), "-o", str(out), "--model",
           str(model), "--weights", "llama3-70b-steerlm", "--dtype", "float32", "-q",
           "--overwrite", "--engine", "ray", "--ray-address", cluster.address,
           "--replicas", str(replicas)]
    tree, driver_before = TreeCPU(), _children_cpu()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    driver_pid = proc.pid
    out_text, err_text = proc.communicate()
    wall = time.monotonic() - t0
    everything = tree.stop()
    if proc.returncode != 0:
        sys.exit(f"bench_ray: the run failed:\n{out_text}\n{err_text}")
    driver = _children_cpu() - driver_before      # the driver, reaped by this process
    seen_driver = tree.last.get(driver_pid, 0.0)  # its sampled share of `everything`
    cluster_cpu = everything - seen_driver
    summary = read_metadata(str(out))["summary"]
    c = summary["cluster"]
    return {"replicas": replicas, "rows": summary["rows"], "wall_s": wall,
            "rows_per_s": c["rows_per_s_per_replica"] * replicas,
            "load_s": c["load_seconds"], "engine_loads": c["engine_loads"],
            "driver_cpu_s": driver, "total_cpu_s": driver + cluster_cpu,
            "pipeline_driver_cpu_s": c["driver_cpu_seconds"],
            "bookkeeping_cpu_s": c["bookkeeping_cpu_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2000)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    import orjson
    import tiny_models
    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="nfb-bench-ray-"))
    model = tiny_models.build_reward_model(tmp / "rm9", 9)
    src = tmp / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in helpsteer_rows(args.rows)))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        one = run(cluster, model, src, tmp / "one.parquet", 1)
        two = run(cluster, model, src, tmp / "two.parquet", 2)
    finally:
        cluster.shutdown()
    print(f"input: {args.rows:,} HelpSteer-sized rows = {BLOCKS} former blocks of "
          f"--ray-block-rows {args.rows // BLOCKS:,}; tiny 9-head RM (SteerLM recipe), CPU vLLM")
    for r in (one, two):
        print(f"replicas {r['replicas']}: {r['rows_per_s']:,.1f} rows/s scoring, "
              f"{r['wall_s']:,.1f} s wall (engine load {r['load_s']:,.1f} s), "
              f"engine loads {r['engine_loads']}, driver CPU {r['driver_cpu_s']:,.2f} s of "
              f"{r['total_cpu_s']:,.1f} s total")
    print(f"ratio rows/s 2 replicas / 1 replica: {two['rows_per_s'] / one['rows_per_s']:.2f}")
    for r in (one, two):
        print(f"ratio engine loads / replicas ({r['replicas']}): "
              f"{r['engine_loads'] / r['replicas']:.2f} (the former blocks would give "
              f"{BLOCKS:.2f})")
        print(f"ratio driver CPU / total CPU ({r['replicas']} replica(s)): "
              f"{r['driver_cpu_s'] / r['total_cpu_s']:.3f} (goal < 0.05); while the pipeline "
              f"ran (no imports, no final merge): "
              f"{r['pipeline_driver_cpu_s'] / r['total_cpu_s']:.3f}; nfb's bookkeeping alone: "
              f"{r['bookkeeping_cpu_s'] / r['total_cpu_s']:.3f} "
              f"({1000 * r['bookkeeping_cpu_s'] / r['rows']:.3f} ms per row)")


if __name__ == "__main__":
    main()
