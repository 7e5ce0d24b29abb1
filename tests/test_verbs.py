"""filter / stats / merge on DuckDB: hand-made scored files (no engine), milliseconds each."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import nfb
from nfb import api
from nfb.errors import InputError, UsageError
from nfb.io.writers import read_metadata

ATTRS = ["helpfulness", "correctness"]


def _meta(**kw) -> dict:
    m = {"nfb_version": "0", "task": "score", "model": "nvidia/some-RM",
         "fields": {"prompt": "prompt", "response": "response", "messages": None},
         "prefix": "", "columns": ["nfb_row", "nfb_error", *ATTRS, "reward"],
         "task_settings": {"attributes": ATTRS, "weights": {"helpfulness": 1.0,
                                                            "correctness": 0.5}},
         "weights": {"helpfulness": 1.0, "correctness": 0.5},
         "fingerprint": "fp", "settings_fingerprint": "sfp", "shard": None}
    m.update(kw)
    return m


def write_scored(path, rows: list[dict], meta: dict | None = None, schema=None):
    t = pa.Table.from_pylist(rows, schema=schema)
    if meta is not None:
        t = t.replace_schema_metadata({b"nfb": orjson.dumps(meta)})
    pq.write_table(t, path)
    return path


def rows_of(prompts, rewards, sources=None, errors=None, start=0):
    out = []
    for i, (p, r) in enumerate(zip(prompts, rewards)):
        out.append({"id": start + i, "prompt": p, "response": f"r{start + i}",
                    "source": (sources or ["web"] * len(prompts))[i],
                    "nfb_row": start + i, "nfb_error": (errors or [None] * len(prompts))[i],
                    "helpfulness": None if r is None else r / 2, "correctness": 1.0,
                    "reward": r})
    return out


@pytest.fixture
def scored(tmp_path):
    rows = rows_of(["a", "a", "a", "b", "b", None, None, "c", "d"],
                   [1.0, 3.0, 2.0, 5.0, float("nan"), 0.5, 0.7, None, 4.0],
                   sources=["web", "forum", "web", "book", "web", "web", "forum", "web", "book"],
                   errors=[None] * 7 + ["null_field", None])
    return write_scored(tmp_path / "s.parquet", rows, _meta())


def kept(path):
    if str(path).endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    return [orjson.loads(x) for x in open(path, "rb").read().splitlines()]


@pytest.fixture
def cli(monkeypatch):
    from typer.testing import CliRunner

    import nfb.cli

    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(nfb.cli.app, [str(a) for a in args])
    return invoke


# --- expressions ---------------------------------------------------------------------------

def test_where_sql_expression(scored, tmp_path):
    out = tmp_path / "o.parquet"
    r = nfb.filter(scored, out, where="helpfulness >= 1 AND source IN ('web', 'forum')")
    assert tuple(r) == (9, 3)
    # id 4's helpfulness is NaN: in SQL (DuckDB) NaN is greater than every number, so it
    # passes `>= 1`; the shorthands (--min-reward, 'COLUMN OP NUMBER') treat NaN as missing
    assert [x["id"] for x in kept(out)] == [1, 2, 4]
    nfb.filter(scored, out, where="length(response) < 3 OR prompt = 'd'")
    assert [x["id"] for x in kept(out)] == list(range(9))
    nfb.filter(scored, out, where=["source = 'book'", "reward > 4.5"])
    assert [x["id"] for x in kept(out)] == [3]


def test_legacy_where_and_shorthands_compile_to_same_rows(scored, tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    nfb.filter(scored, a, where="reward>=2", drop_errors=True)
    nfb.filter(scored, b, min_reward=2, drop_errors=True)
    assert kept(a) == kept(b)
    assert [x["id"] for x in kept(a)] == [1, 2, 3, 8]   # NaN and null never pass


@pytest.mark.parametrize("expr,match", [
    ("1; COPY scored TO '/tmp/nfb-pwned.csv'", "not statements"),
    ("reward > 0; DROP TABLE x", "not statements"),
    ("read_csv('/etc/passwd') IS NOT NULL", "read_csv() is not allowed"),
    ("(SELECT count(*) FROM read_csv('/etc/passwd')) > 0", "subquery is not allowed"),
    ("1=1) UNION SELECT * FROM read_csv('/etc/passwd') WHERE (1=1", "only an expression"),
    ("reward >", "syntax error"),
    ("nope > 1", "no column nope"),
    ("x~1", "COLUMN OP NUMBER"),
    ("x>>1", "not a number"),
    ("source >= 3", "type mismatch"),
    ("source > 1 AND 1 = 1", "type mismatch"),
])
def test_where_refused(scored, tmp_path, expr, match):
    with pytest.raises(UsageError) as e:
        nfb.filter(scored, tmp_path / "o.parquet", where=expr)
    assert match in str(e.value)
    assert not (tmp_path / "o.parquet").exists()


def test_unknown_column_lists_the_columns(scored, tmp_path):
    with pytest.raises(UsageError, match=r"no column nope in the input \(columns: id, prompt"):
        nfb.filter(scored, tmp_path / "o.parquet", where="nope = 'x' OR reward > 1")


# --- best-of-n, top-k, rank ----------------------------------------------------------------

def test_best_of_n_nan_never_wins_and_null_keys_are_own_groups(scored, tmp_path):
    out = tmp_path / "best.parquet"
    r = nfb.filter(scored, out, best_of_n=True, group_by="prompt")
    # a: 3.0 (id 1); b: 5.0 beats NaN (id 3); null keys: each its own group (5, 6);
    # c: only a null score -> no winner; d: 4.0
    assert [x["id"] for x in kept(out)] == [1, 3, 5, 6, 8]
    assert r.rows_kept == 5


def test_best_of_n_nan_against_real_score(tmp_path):
    f = write_scored(tmp_path / "n.parquet", rows_of(["p", "p"], [float("nan"), 5.0]), _meta())
    nfb.filter(f, tmp_path / "o.jsonl", best_of_n=True, group_by="prompt")
    assert [x["id"] for x in kept(tmp_path / "o.jsonl")] == [1]


def test_top_k_ties_go_to_the_earlier_row(tmp_path):
    f = write_scored(tmp_path / "t.parquet",
                     rows_of(["p"] * 4 + ["q"] * 2, [1.0, 2.0, 2.0, 0.0, 1.0, 1.0]), _meta())
    nfb.filter(f, tmp_path / "o.parquet", top_k=2, group_by="prompt")
    assert [x["id"] for x in kept(tmp_path / "o.parquet")] == [1, 2, 4, 5]
    nfb.filter(f, tmp_path / "o.parquet", top_k=1, group_by="prompt")
    assert [x["id"] for x in kept(tmp_path / "o.parquet")] == [1, 4]


def test_add_rank_and_z_within_group(tmp_path):
    f = write_scored(tmp_path / "t.parquet",
                     rows_of(["p", "p", "p", "q", "q"], [1.0, 3.0, 2.0, 7.0, None]), _meta())
    out = tmp_path / "r.parquet"
    nfb.filter(f, out, add_rank=True, group_by="prompt")
    t = kept(out)
    assert [x["nfb_rank"] for x in t] == [3, 1, 2, 1, None]
    sd = np.std([1.0, 3.0, 2.0])
    for x, v in zip(t[:3], [1.0, 3.0, 2.0]):
        assert math.isclose(x["nfb_z"], (v - 2.0) / sd)
    assert t[3]["nfb_z"] is None            # one scored row: no spread
    meta = read_metadata(str(out))
    assert meta["columns"][-2:] == ["nfb_rank", "nfb_z"]
    # ranked columns are nfb's: --drop-nfb-columns removes them again
    out2 = tmp_path / "plain.jsonl"
    nfb.filter(out, out2, drop_nfb_columns=True)
    assert list(kept(out2)[0]) == ["id", "prompt", "response", "source"]


@pytest.mark.parametrize("kw,match", [
    ({"best_of_n": True}, "--group-by"), ({"top_k": 2}, "--group-by"),
    ({"group_by": "prompt"}, "goes with"), ({"top_k": 0, "group_by": "prompt"}, "--top-k"),
    ({"best_of_n": True, "group_by": "nope"}, "no column nope"),
    ({"min_level": "great"}, "level 'great'"),
    ({"min_level": 3}, "no column feedback_level"),
])
def test_option_errors(scored, tmp_path, kw, match):
    with pytest.raises(UsageError, match=match):
        nfb.filter(scored, tmp_path / "o.parquet", **kw)


# --- bad inputs: one line, never a traceback -----------------------------------------------

def test_min_reward_on_text_column(tmp_path, cli):
    f = write_scored(tmp_path / "t.parquet", [{"prompt": "p", "reward": "high", "nfb_row": 0}])
    r = cli("filter", f, "-o", tmp_path / "o.parquet", "--min-reward", "1")
    assert r.exit_code == 2 and "needs a numeric column, but reward is VARCHAR" in r.output
    r = cli("filter", f, "-o", tmp_path / "o.parquet", "--where", "reward >= 1")
    assert r.exit_code == 2 and "type mismatch" in r.output and "Traceback" not in r.output


def test_inputs_where_one_lacks_the_column(tmp_path, cli):
    a = write_scored(tmp_path / "a.parquet", rows_of(["p"], [1.0]), _meta())
    b = write_scored(tmp_path / "b.parquet", [{"id": 9, "prompt": "q"}])
    out = tmp_path / "o.parquet"
    r = cli("filter", a, b, "-o", out, "--min-reward", "0")
    assert r.exit_code == 0, r.output
    assert [x["id"] for x in kept(out)] == [0]       # b's row has no reward: not kept
    r = cli("stats", a, b, "--json")
    assert r.exit_code == 0 and orjson.loads(r.stdout)["rows"] == 2
    r = cli("filter", b, "-o", out, "--overwrite", "--min-reward", "0")
    assert r.exit_code == 2 and "no column reward" in r.output


@pytest.mark.parametrize("content", [b"", b"PAR1 this is not parquet at all"])
def test_empty_or_corrupt_parquet(tmp_path, cli, content):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(content)
    for args in (["filter", bad, "-o", tmp_path / "o.parquet"], ["stats", bad],
                 ["merge", bad, "-o", tmp_path / "m.parquet"]):
        r = cli(*args)
        assert r.exit_code == 1, (args, r.output)
        assert "not a readable Parquet file" in r.output and "Traceback" not in r.output
    with pytest.raises(InputError):
        api.stats(str(bad))


def test_merge_to_txt_is_refused(scored, tmp_path, cli):
    r = cli("merge", scored, "-o", tmp_path / "out.txt")
    assert r.exit_code == 2 and ".parquet" in r.output and "Traceback" not in r.output


def test_jsonl_column_that_appears_late(tmp_path):
    rows = [{"id": i, "prompt": "p", "nfb_row": i, "reward": float(i)} for i in range(600)]
    rows[400]["flag"] = "late"
    f = tmp_path / "s.jsonl"
    f.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    out = tmp_path / "o.jsonl"
    r = nfb.filter(str(f), out, where="flag = 'late'")
    assert tuple(r) == (600, 1) and kept(out)[0]["id"] == 400
    assert api.stats(str(f))["rows"] == 600


def test_drop_nfb_columns_keeps_a_users_nfb_named_column(tmp_path):
    rows = [{"nfb_source": "mine", **x} for x in rows_of(["p", "q"], [1.0, 2.0])]
    f = write_scored(tmp_path / "s.parquet", rows, _meta())
    out = tmp_path / "o.jsonl"
    nfb.filter(f, out, drop_nfb_columns=True, drop_errors=True)
    assert [list(x) for x in kept(out)] == [["nfb_source", "id", "prompt", "response",
                                             "source"]] * 2


# --- provenance ------------------------------------------------------------------------------

def test_provenance_survives_filter(scored, tmp_path):
    out = tmp_path / "o.parquet"
    nfb.filter(scored, out, where="reward > 1", top_k=1, group_by="prompt")
    meta = read_metadata(str(out))
    src = read_metadata(str(scored))
    assert meta["model"] == src["model"] and meta["weights"] == src["weights"]
    assert meta["settings_fingerprint"] == src["settings_fingerprint"]
    assert meta["fingerprint"] is None   # not the finished output of a scoring command
    v = meta["verbs"][-1]
    assert v["verb"] == "filter" and v["args"]["where"] == ["reward > 1"]
    assert v["args"]["top_k"] == 1 and v["args"]["group_by"] == "prompt"
    # a second verb appends to the record; JSONL output gets the sidecar
    out2 = tmp_path / "o2.jsonl"
    nfb.filter(out, out2, drop_errors=True)
    m2 = read_metadata(str(out2))
    assert [x["verb"] for x in m2["verbs"]] == ["filter", "filter"]
    assert m2["model"] == src["model"]


# --- the Bradley-Terry warning --------------------------------------------------------------

def test_min_reward_on_scalar_rm_warns_once(tmp_path, cli):
    meta = _meta(columns=["nfb_row", "nfb_error", "reward"],
                 task_settings={"attributes": None, "weights": None})
    rows = [{"prompt": p, "response": "x", "nfb_row": i, "nfb_error": None, "reward": r}
            for i, (p, r) in enumerate([("a", 1.0), ("b", 2.0), ("a", 0.0)])]
    f = write_scored(tmp_path / "bt.parquet", rows, meta)
    seen = []
    nfb.filter(f, tmp_path / "o.parquet", min_reward=0.5, warn=seen.append)
    assert len(seen) == 1
    assert "rewards are comparable only between responses to the same prompt" in seen[0]
    assert "--top-k 1 --group-by prompt" in seen[0]
    r = cli("filter", f, "-o", tmp_path / "o2.parquet", "--min-reward", "0.5")
    assert r.exit_code == 0 and r.output.count("same prompt") == 1
    # within a prompt, or a multi-attribute model: no warning
    seen.clear()
    nfb.filter(f, tmp_path / "o3.parquet", min_reward=0.5, top_k=1, group_by="prompt",
               warn=seen.append)
    multi = write_scored(tmp_path / "m.parquet", rows_of(["a", "b"], [1.0, 2.0]), _meta())
    nfb.filter(multi, tmp_path / "o4.parquet", min_reward=0.5, warn=seen.append)
    assert seen == []


# --- stats ---------------------------------------------------------------------------------

def test_stats_exact_quantiles_and_groups(tmp_path):
    rng = np.random.default_rng(0)
    vals = rng.normal(size=1000)
    src = ["web" if i % 3 else "book" for i in range(1000)]
    rows = rows_of([f"p{i}" for i in range(1000)], vals.tolist(), sources=src)
    rows[5]["reward"] = float("nan")
    rows[6]["reward"] = None
    f = write_scored(tmp_path / "s.parquet", rows, _meta())
    s = api.stats(str(f), group_by="source")
    good = np.array([r["reward"] for r in rows if r["reward"] is not None
                     and not math.isnan(r["reward"])])
    q = s["quantiles"]["reward"]
    assert q["count"] == 998 and q["p0"] == good.min() and q["p100"] == good.max()
    for p in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert math.isclose(q[f"p{int(p * 100)}"], np.quantile(good, p), rel_tol=1e-12)
    assert math.isclose(q["mean"], good.mean())
    groups = {g["group"]: g for g in s["groups"]}
    assert set(groups) == {"web", "book"} and s["group_by"] == "source"
    for name in ("web", "book"):
        gv = np.array([r["reward"] for r in rows if r["source"] == name
                       and r["reward"] is not None and not math.isnan(r["reward"])])
        gq = groups[name]["quantiles"]["reward"]
        assert gq["count"] == len(gv)
        assert math.isclose(gq["p50"], np.quantile(gv, 0.5), rel_tol=1e-12)
        assert gq["p0"] == gv.min() and gq["p100"] == gv.max()
    assert sum(g["rows"] for g in s["groups"]) == 1000


def test_stats_errors_levels_and_cli(tmp_path, cli):
    meta = _meta(task="feedback", columns=["nfb_row", "nfb_error", "feedback",
                                           "feedback_level", "feedback_label"],
                 task_settings={})
    levels = [1, 4, 4, None, 5, None]
    errs = [None, None, None, "null_field: response", None, "prompt_too_long"]
    rows = [{"prompt": "p", "source": "web" if i < 3 else "book", "nfb_row": i,
             "nfb_error": e, "feedback": "f", "feedback_level": lv, "feedback_label": None}
            for i, (lv, e) in enumerate(zip(levels, errs))]
    schema = pa.schema([("prompt", pa.string()), ("source", pa.string()),
                        ("nfb_row", pa.int64()), ("nfb_error", pa.string()),
                        ("feedback", pa.string()), ("feedback_level", pa.int8()),
                        ("feedback_label", pa.string())])
    f = write_scored(tmp_path / "fb.parquet", rows, meta, schema)
    r = cli("stats", f, "--json", "--group-by", "source")
    assert r.exit_code == 0, r.output
    s = orjson.loads(r.stdout)
    assert s["errors"] == {"null_field": 1, "prompt_too_long": 1} and s["error_rows"] == 2
    assert s["levels"]["4 mostly"] == 2 and s["levels"]["unparsed"] == 0
    assert math.isclose(s["level_mean"], 14 / 4)
    g = {x["group"]: x for x in s["groups"]}
    assert g["book"]["error_rows"] == 2 and g["web"]["level_mean"] == 3.0
    r = cli("stats", f, "--group-by", "source")
    assert r.exit_code == 0 and "feedback levels" in r.output and "by source" in r.output
    r = cli("stats", f, "--group-by", "nope")
    assert r.exit_code == 2 and "no column nope" in r.output


def test_filter_levels(tmp_path):
    rows = [{"prompt": "p", "nfb_row": i, "nfb_error": None, "feedback_level": lv}
            for i, lv in enumerate([1, 3, 4, None, 5])]
    schema = pa.schema([("prompt", pa.string()), ("nfb_row", pa.int64()),
                        ("nfb_error", pa.string()), ("feedback_level", pa.int8())])
    f = write_scored(tmp_path / "f.parquet", rows,
                     _meta(task="feedback", columns=["nfb_row", "nfb_error", "feedback_level"]),
                     schema)
    out = tmp_path / "o.parquet"
    assert tuple(nfb.filter(f, out, min_level="partially", max_level=4)) == (5, 2)
    t = pq.read_table(out)
    assert t.column("nfb_row").to_pylist() == [1, 2]
    assert t.schema.field("feedback_level").type == pa.int8()   # types kept


# --- merge keeps its checks ----------------------------------------------------------------

def test_merge_shards_and_records_the_verb(tmp_path, cli):
    shards = []
    for i in range(2):
        rows = [{"id": r, "nfb_row": r, "reward": float(r)} for r in range(i, 6, 2)]
        shards.append(write_scored(tmp_path / f"s{i}.parquet", rows,
                                   _meta(shard=f"{i}/2", fingerprint=f"f{i}")))
    out = tmp_path / "m.parquet"
    r = cli("merge", *reversed(shards), "-o", out)
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).column("id").to_pylist() == list(range(6))
    meta = read_metadata(str(out))
    assert meta["verbs"][-1]["verb"] == "merge" and meta["fingerprint"] == "sfp"
    r = cli("merge", shards[0], "-o", tmp_path / "x.parquet")
    assert r.exit_code == 2 and "missing shard(s) 1/2" in r.output


# --- order, equivalence, odd inputs ----------------------------------------------------------

def test_best_of_n_matches_hand_written_sql_and_keeps_input_order(tmp_path):
    import duckdb

    rng = np.random.default_rng(1)
    files = []
    for f in range(3):
        n = 6_000
        r = rng.normal(size=n)
        r[::50] = np.nan
        rows = rows_of([f"p{(f * n + i) % 997}" for i in range(n)], r.tolist(), start=f * n)
        files.append(write_scored(tmp_path / f"s{f}.parquet", rows, _meta()))
    out = tmp_path / "best.parquet"
    nfb.filter(files, out, best_of_n=True, group_by="prompt", where="source = 'web'")
    got = pq.read_table(out).column("id").to_pylist()
    assert got == sorted(got)                        # input order across files
    want = duckdb.sql(
        f"SELECT id FROM read_parquet({[str(f) for f in files]!r}) WHERE source = 'web' AND "
        "NOT isnan(reward) QUALIFY row_number() OVER (PARTITION BY prompt ORDER BY reward DESC, "
        "id) = 1 ORDER BY id").fetchall()
    assert got == [x[0] for x in want]


def test_stdin_jsonl_through_the_cli(tmp_path):
    import subprocess
    import sys

    rows = rows_of(["a", "a", "b"], [1.0, 2.0, 3.0], errors=[None, "null_field", None])
    data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    p = subprocess.run([sys.executable, "-m", "nfb", "filter", "-", "--where",
                        "reward >= 1 AND prompt = 'a'", "-o", "-"], input=data,
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert [orjson.loads(x)["id"] for x in p.stdout.splitlines()] == [0, 1]


def test_rows_without_columns(tmp_path, cli):
    f = tmp_path / "e.jsonl"
    f.write_bytes(b"{}\n{}\n")
    assert api.stats(str(f))["rows"] == 2
    r = cli("filter", f, "-o", tmp_path / "o.jsonl", "--where", "1=1")
    assert r.exit_code == 2 and "no columns" in r.output


def test_empty_pipe_gives_an_empty_output(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "nfb", "filter", "-", "--drop-errors", "-o", "-"],
                       input=b"", capture_output=True, timeout=120)
    assert p.returncode == 0 and p.stdout == b"", p.stderr.decode()
