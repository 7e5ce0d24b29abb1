"""nfb pairs: hand-made scored tables whose right pairs are known exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nfb.errors import UsageError
from nfb.io.writers import read_metadata
from nfb.verbs.pairs import pairs

META = {"model": "rm", "task": "score", "columns": ["nfb_row", "nfb_error", "reward"]}


def write(path, table, meta=META):
    if meta is not None:
        table = table.replace_schema_metadata({b"nfb": json.dumps(meta).encode()})
    pq.write_table(table, path)
    return str(path)


def rows_of(path):
    if str(path).endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    return [orjson.loads(x) for x in open(path, "rb").read().splitlines()]


def triples(path):
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in rows_of(path)]


@pytest.fixture
def per_row(tmp_path):
    """Shape (a): p1 has 3 responses, p2 a tie, p3 one response, p4 one error row."""
    t = pa.table({
        "prompt": ["p1", "p2", "p1", "p3", "p1", "p2", "p4", "p4"],
        "response": ["a", "d", "b", "f", "c", "e", "g", "h"],
        "nfb_row": pa.array(range(8), pa.int64()),
        "nfb_error": [None] * 7 + ["prompt_too_long:9 tokens > 8"],
        "reward": [1.0, 5.0, 3.0, 1.0, 2.0, 5.0, 2.0, None],
    })
    return write(tmp_path / "a.parquet", t)


def test_best_worst_per_row(per_row, tmp_path):
    out = tmp_path / "p.parquet"
    r = pairs(per_row, str(out), group_by="prompt")
    rows = rows_of(out)
    assert rows == [{"prompt": "p1", "chosen": "b", "rejected": "a", "chosen_score": 3.0,
                     "rejected_score": 1.0, "margin": 2.0, "chosen_nfb_row": 2,
                     "rejected_nfb_row": 0}]
    assert (r.pairs, r.groups, r.ties, r.null_scores, r.error_rows, r.small_groups) == \
        (1, 4, 1, 1, 1, 2)
    assert pq.read_schema(out).names[:3] == ["prompt", "chosen", "rejected"]
    meta = read_metadata(str(out))
    assert meta["model"] == "rm"                                   # the input's provenance
    assert meta["pairs"]["strategy"] == "best-worst" and meta["pairs"]["group_by"] == "prompt"
    assert meta["pairs"]["counts"]["ties"] == 1


def test_all_pairs_order_and_margin(per_row, tmp_path):
    out = tmp_path / "p.jsonl"
    r = pairs(per_row, str(out), group_by="prompt", strategy="all-pairs")
    # by margin, then by input order of the two responses
    assert triples(out) == [("p1", "b", "a"), ("p1", "c", "a"), ("p1", "b", "c")]
    assert [x["margin"] for x in rows_of(out)] == [2.0, 1.0, 1.0]
    assert r.ties == 1
    out2 = tmp_path / "m.jsonl"
    r2 = pairs(per_row, str(out2), group_by="prompt", strategy="all-pairs", min_margin=1.5)
    assert triples(out2) == [("p1", "b", "a")] and r2.below_margin == 2
    out3 = tmp_path / "k.jsonl"
    r3 = pairs(per_row, str(out3), group_by="prompt", strategy="all-pairs", per_group=2)
    assert triples(out3) == [("p1", "b", "a"), ("p1", "c", "a")] and r3.over_per_group == 1


def test_best_worst_per_group_disjoint(tmp_path):
    # 5 responses: best-worst K=2 gives (r5 vs r1), (r4 vs r2); the middle one is left out
    t = pa.table({"prompt": ["q"] * 5, "response": ["r3", "r1", "r5", "r2", "r4"],
                  "reward": [3.0, 1.0, 5.0, 2.0, 4.0]})
    src = write(tmp_path / "s.parquet", t, None)
    out = tmp_path / "o.jsonl"
    pairs(src, str(out), group_by="prompt", per_group=2)
    assert triples(out) == [("q", "r5", "r1"), ("q", "r4", "r2")]
    out1 = tmp_path / "o1.jsonl"
    pairs(src, str(out1), group_by="prompt", per_group=10)        # capped at n // 2
    assert triples(out1) == [("q", "r5", "r1"), ("q", "r4", "r2")]


def test_fields_shape_rewardbench(tmp_path):
    t = pa.table({"prompt": ["x", "y", "z"], "chosen": ["c1", "c2", "c3"],
                  "rejected": ["r1", "r2", "r3"],
                  "rm_chosen_reward": [1.0, 0.0, 2.0], "rm_rejected_reward": [0.5, 2.0, 2.0]})
    src = write(tmp_path / "b.parquet", t, None)
    out = tmp_path / "o.jsonl"
    with pytest.raises(UsageError, match="--prefix"):
        pairs(src, str(out))
    r = pairs(src, str(out), prefix="rm_")
    # the model's ranking, not the input's labels: y is flipped, z is a tie
    assert triples(out) == [("x", "c1", "r1"), ("y", "r2", "c2")]
    assert r.shape == "fields" and r.ties == 1 and r.groups == 3


def test_list_shape_and_group_by_across_rows(tmp_path):
    t = pa.table({"prompt": ["x", "y", "x"], "responses": [["a", "b", "c"], ["d"], ["e"]],
                  "responses_reward": [[1.0, 3.0, 2.0], [1.0], [9.0]]})
    src = write(tmp_path / "c.parquet", t, None)
    out = tmp_path / "o.jsonl"
    r = pairs(src, str(out))
    assert triples(out) == [("x", "b", "a")] and r.small_groups == 2 and r.shape == "list"
    # grouped by prompt, the third row's response joins the first row's
    out2 = tmp_path / "o2.jsonl"
    pairs(src, str(out2), group_by="prompt")
    assert triples(out2) == [("x", "e", "a")]


def test_misaligned_list_rows_are_counted(tmp_path):
    t = pa.table({"prompt": ["x", "y"], "responses": [["a", "b"], ["c", "d"]],
                  "responses_reward": [[1.0, 2.0], [1.0]]})
    r = pairs(write(tmp_path / "c.parquet", t, None), str(tmp_path / "o.jsonl"))
    assert r.misaligned_rows == 1 and r.pairs == 1


def test_feedback_levels_and_score_option(tmp_path):
    t = pa.table({"prompt": ["p", "p", "p"], "response": ["a", "b", "c"],
                  "feedback_level": pa.array([2, 5, None], pa.int8()),
                  "helpfulness": [3.0, 1.0, 2.0]})
    src = write(tmp_path / "f.parquet", t, None)
    out = tmp_path / "o.jsonl"
    r = pairs(src, str(out), group_by="prompt")
    assert triples(out) == [("p", "b", "a")] and r.score == "feedback_level"
    r = pairs(src, str(out), group_by="prompt", score="helpfulness")
    assert triples(out) == [("p", "a", "b")] and r.score == "helpfulness"


@pytest.mark.parametrize("kw, match", [
    ({"group_by": "nope"}, "--group-by nope: no such column"),
    ({}, "--group-by"),
    ({"group_by": "prompt", "strategy": "random"}, "--strategy"),
    ({"group_by": "prompt", "per_group": 0}, "--per-group"),
    ({"group_by": "prompt", "min_margin": -1}, "--min-margin"),
    ({"group_by": "prompt", "score": "quality"}, "no quality column"),
])
def test_bad_options(per_row, tmp_path, kw, match):
    with pytest.raises(UsageError, match=match):
        pairs(per_row, str(tmp_path / "o.jsonl"), **kw)
    assert not (tmp_path / "o.jsonl").exists()


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "nfb", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli(per_row, tmp_path):
    p = _cli("pairs", per_row, "-o", "-", "--group-by", "prompt", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert [orjson.loads(x)["chosen"] for x in p.stdout.splitlines()] == ["b"]
    assert "1 tied pairs dropped" in p.stderr and "1 pairs from 1 of 4 groups" in p.stderr
    for args, code, text in [
        (["--group-by", "nope"], 2, "no such column"),
        ([], 2, "--group-by"),
    ]:
        p = _cli("pairs", per_row, "-o", "o.jsonl", *args, cwd=tmp_path)
        assert p.returncode == code and text in p.stderr and "Traceback" not in p.stderr
    p = _cli("pairs", str(tmp_path / "missing.parquet"), "-o", "o.jsonl", cwd=tmp_path)
    assert p.returncode == 1 and "no such file" in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    p = _cli("pairs", str(tmp_path / "bad.parquet"), "-o", "o.jsonl", cwd=tmp_path)
    assert p.returncode == 1 and "error:" in p.stderr and "Traceback" not in p.stderr
