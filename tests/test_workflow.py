"""filter, stats, merge, --shard, --limit, stdin/stdout: the rest of the data workflow (mechanics
on the stub engine; the shell pipeline runs real vLLM in subprocesses)."""

import os
import subprocess
import sys

import orjson
import pyarrow.parquet as pq
import pytest
from conftest import sample_rows, write_jsonl

F32 = ["--dtype", "float32"]
W = ["--weights", "llama3-70b-steerlm"]   # a 9-head model no recipe names needs its weights


@pytest.fixture
def data(tmp_path):
    rows = sample_rows(30)
    for r in rows[10:20]:      # 10 prompts with 2 responses each -> best-of-n groups
        r["prompt"] = f"Shared prompt {r['id'] % 5}"
    rows[3]["response"] = None
    return write_jsonl(tmp_path / "in.jsonl", rows), rows


@pytest.fixture
def scored(stub_cli, models, data, tmp_path):
    out = tmp_path / "scored.parquet"
    r = stub_cli("score", data[0], "-o", out, "--model", models["rm9"], *W, *F32)
    assert r.exit_code == 0, r.output
    return out


def test_three_shards_merged_equal_one_run(stub_cli, models, data, scored, tmp_path):
    shards = []
    for i in range(3):
        out = tmp_path / f"s{i}.parquet"
        r = stub_cli("score", data[0], "-o", out, "--model", models["rm9"], *W, "--shard", f"{i}/3",
                     *F32)
        assert r.exit_code == 0, r.output
        assert pq.read_table(out).column("nfb_row").to_pylist() == list(range(i, 30, 3))
        shards.append(out)
    merged = tmp_path / "merged.parquet"
    r = stub_cli("merge", *reversed(shards), "-o", merged)
    assert r.exit_code == 0, r.output
    a, b = pq.read_table(merged), pq.read_table(scored)
    assert a.column_names == b.column_names
    for name in a.column_names:
        assert a.column(name).to_pylist() == b.column(name).to_pylist(), name
    meta = orjson.loads(a.schema.metadata[b"nfb"])
    assert meta["shard"] is None and meta["summary"]["rows"] == 30
    # the merged file is what the unsharded command would have written: nothing to do
    r = stub_cli("score", data[0], "-o", merged, "--model", models["rm9"], *W, *F32)
    assert r.exit_code == 0 and "already complete" in r.output
    # refusals
    r = stub_cli("merge", shards[0], shards[1], "-o", tmp_path / "x.parquet")
    assert r.exit_code == 2 and "missing shard(s) 2/3" in r.output
    import shutil
    twin = shutil.copy(shards[0], tmp_path / "twin.parquet")
    r = stub_cli("merge", shards[0], twin, shards[1], shards[2], "-o", tmp_path / "x.parquet")
    assert r.exit_code == 2 and "given twice" in r.output
    other = tmp_path / "other.parquet"
    assert stub_cli("score", data[0], "-o", other, "--model", models["rm9"], *W, "--shard", "2/3",
               "--weights", "nemotron-4-340b", *F32).exit_code == 0
    r = stub_cli("merge", shards[0], shards[1], other, "-o", tmp_path / "x.parquet")
    assert r.exit_code == 2 and "other settings" in r.output
    r = stub_cli("merge", *shards, "-o", merged)
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_limit(stub_cli, models, data, tmp_path):
    out = tmp_path / "o.jsonl.gz"
    r = stub_cli("score", data[0], "-o", out, "--model", models["rm9"], *W, "--limit", "7", *F32)
    assert r.exit_code == 0, r.output
    import gzip
    rows = [orjson.loads(x) for x in gzip.decompress(out.read_bytes()).splitlines()]
    assert [x["nfb_row"] for x in rows] == list(range(7))


def test_filter_conditions(stub_cli, scored, tmp_path):
    t = pq.read_table(scored).to_pylist()
    rewards = sorted(x["reward"] for x in t if x["reward"] is not None)
    cut = rewards[len(rewards) // 2]
    out = tmp_path / "kept.jsonl"
    r = stub_cli("filter", scored, "-o", out, "--min-reward", cut, "--where", "helpfulness>-100")
    assert r.exit_code == 0, r.output
    kept = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert [x["nfb_row"] for x in kept] == [x["nfb_row"] for x in t
                                            if x["reward"] is not None and x["reward"] >= cut]
    out2 = tmp_path / "k2.parquet"
    r = stub_cli("filter", scored, "-o", out2, "--where", f"correctness<={t[0]['correctness']}",
            "--max-reward", 1e9)
    assert r.exit_code == 0, r.output
    assert pq.read_table(out2).column("nfb_row").to_pylist() == [
        x["nfb_row"] for x in t if x["correctness"] is not None
        and x["correctness"] <= t[0]["correctness"]]


def test_filter_best_of_n_drop_errors_and_original_schema(stub_cli, scored, data, tmp_path):
    t = pq.read_table(scored).to_pylist()
    out = tmp_path / "best.parquet"
    r = stub_cli("filter", scored, "-o", out, "--best-of-n", "--group-by", "prompt")
    assert r.exit_code == 0, r.output
    best = {}
    for x in t:
        if x["reward"] is None:
            continue
        if x["prompt"] not in best or x["reward"] > best[x["prompt"]]["reward"]:
            best[x["prompt"]] = x
    got = pq.read_table(out).to_pylist()
    assert sorted(x["nfb_row"] for x in got) == sorted(x["nfb_row"] for x in best.values())
    assert len(got) == len({x["prompt"] for x in t if x["reward"] is not None})
    # drop errors and give back the input's own columns
    out2 = tmp_path / "clean.jsonl"
    r = stub_cli("filter", scored, "-o", out2, "--drop-errors", "--drop-nfb-columns")
    assert r.exit_code == 0, r.output
    rows = [orjson.loads(x) for x in out2.read_bytes().splitlines()]
    src = [x for x in data[1] if x.get("response") is not None]
    assert rows == src


@pytest.mark.parametrize("args,match", [
    (["--best-of-n"], "--group-by"), (["--where", "x~1"], "COLUMN OP NUMBER"),
    (["--where", "x>>1"], "not a number"),
    (["--where", "nope>1"], "no column nope"), (["--min-level", "great"], "level 'great'"),
])
def test_filter_usage_errors(stub_cli, scored, tmp_path, args, match):
    r = stub_cli("filter", scored, "-o", tmp_path / "o.parquet", *args)
    assert r.exit_code == 2 and match in r.output


def test_filter_levels_and_stats(stub_cli, models, data, tmp_path):
    out = tmp_path / "fb.parquet"
    r = stub_cli("feedback", data[0], "-o", out, "--model", models["causal"], "--constrain-level",
            "--max-tokens", "24", "--seed", "3", *F32)
    assert r.exit_code == 0, r.output
    t = pq.read_table(out).to_pylist()
    levels = [x["feedback_level"] for x in t]
    assert all(lv in range(1, 6) for i, lv in enumerate(levels) if i != 3)
    kept = tmp_path / "k.parquet"
    r = stub_cli("filter", out, "-o", kept, "--min-level", "partially", "--max-level", "5")
    assert r.exit_code == 0, r.output
    assert pq.read_table(kept).num_rows == sum(1 for lv in levels if lv is not None and lv >= 3)
    r = stub_cli("stats", out, "--json")
    assert r.exit_code == 0, r.output
    s = orjson.loads(r.stdout)
    assert s["rows"] == 30 and s["errors"] == {"null_field": 1} and s["task"] == "feedback"
    for lv, label in enumerate(["not", "slightly", "partially", "mostly", "perfectly"], 1):
        assert s["levels"][f"{lv} {label}"] == levels.count(lv)
    r = stub_cli("stats", out)
    assert r.exit_code == 0 and "feedback levels" in r.output


def test_stats_quantiles(stub_cli, scored):
    r = stub_cli("stats", scored, "--json")
    assert r.exit_code == 0, r.output
    s = orjson.loads(r.stdout)
    rewards = sorted(x for x in pq.read_table(scored).column("reward").to_pylist()
                     if x is not None)
    q = s["quantiles"]["reward"]
    assert q["count"] == 29 and q["p0"] == rewards[0] and q["p100"] == rewards[-1]
    assert set(s["quantiles"]) >= {"helpfulness", "verbosity", "reward"}
    assert s["model"] and s["settings"]["weights"]["helpfulness"] == 0.65


@pytest.mark.slow
def test_shell_pipeline_stdin_to_stdout(models, data, tmp_path):
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    nfb = f"{sys.executable} -m nfb"
    cmd = (f"cat {data[0]} | {nfb} score - -o - --model {models['rm9']} "
           "--weights llama3-70b-steerlm --dtype float32 "
           f"| {nfb} filter - --drop-errors -o -")
    p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, env=env,
                       timeout=400)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    rows = [orjson.loads(x) for x in p.stdout.splitlines()]
    assert len(rows) == 29 and all(isinstance(x["reward"], float) for x in rows)
    assert [x["id"] for x in rows] == [x["id"] for x in data[1] if x["id"] != 3]
