"""nfb eval: metrics on hand-made tables, checked against exact values and scipy."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from nfb.errors import UsageError
from nfb.verbs.evaluate import evaluate, figures, pearson, rankdata, spearman

RM = [3.1, 2.0, 0.5, 4.0, 1.2, None, 2.2, 2.2]
HU = [3, 2, 1, 4, 0, 2, 1, 3]


@pytest.fixture
def helpsteer(tmp_path):
    t = pa.table({"helpfulness": HU, "rm_helpfulness": RM,
                  "verbosity": [1, 1, 2, 2, 3, 3, 4, 4],
                  "rm_verbosity": [4.0, 4.0, 3.0, 3.0, 2.0, 2.0, 1.0, 1.0],
                  "human_level": ["mostly", "2", "perfectly", None, "1", "3", "not", "4"],
                  "rm_feedback_level": pa.array([4, 2, 5, 4, 1, None, 3, 4], pa.int8()),
                  "nfb_error": [None] * 5 + ["x"] + [None] * 2})
    p = tmp_path / "h.parquet"
    pq.write_table(t, p)
    return str(p)


@pytest.fixture
def rewardbench(tmp_path):
    t = pa.table({"prompt": list("abcdefgh"),
                  "rm_chosen_reward": [1.0, 2, 3, 4, 5, 6, None, 1],
                  "rm_rejected_reward": [0.0, 3, 3, 1, 1, 1, 0, 0],
                  "subset": ["chat", "chat", "math", "math", "math", "chat", "chat", "math"]})
    p = tmp_path / "rb.parquet"
    pq.write_table(t, p)
    return str(p)


def test_rank_and_correlations_match_scipy():
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = rng.integers(0, 5, 30).astype(float)        # many ties
        y = x + rng.normal(0, 1.5, 30)
        np.testing.assert_allclose(rankdata(x), stats.rankdata(x))
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert np.isnan(pearson(np.ones(4), np.arange(4.0)))   # constant: undefined, not 0


def test_attributes(helpsteer):
    d = evaluate(helpsteer, human=["helpfulness", "verbosity"], prefix="rm_", bootstrap=200)
    h, v = d["attributes"]
    assert (h["model"], h["human"], h["n"], h["skipped"]) == ("rm_helpfulness", "helpfulness",
                                                              7, 1)
    x = np.array([3.1, 2.0, 0.5, 4.0, 1.2, 2.2, 2.2])
    y = np.array([3, 2, 1, 4, 0, 1, 3], float)
    assert h["mae"]["value"] == pytest.approx(np.abs(x - y).mean())
    assert h["mae"]["value"] == pytest.approx((0.1 + 0 + 0.5 + 0 + 1.2 + 1.2 + 0.8) / 7)
    assert h["pearson"]["value"] == pytest.approx(stats.pearsonr(x, y)[0])
    assert h["spearman"]["value"] == pytest.approx(stats.spearmanr(x, y)[0])
    # verbosity: exactly reversed ranks
    assert v["spearman"]["value"] == pytest.approx(-1.0)
    assert v["pearson"]["value"] == pytest.approx(-1.0)
    assert v["mae"]["value"] == pytest.approx(2.0)   # |4-1| |4-1| |3-2| |3-2| ... = 3,3,1,1,1,1,3,3
    for f in ("mae", "pearson", "spearman"):
        assert h[f]["low"] <= h[f]["value"] <= h[f]["high"]
    # the same seed gives the same interval; another seed another
    again = evaluate(helpsteer, pair=["rm_helpfulness=helpfulness"], bootstrap=200)
    assert again["attributes"][0] == h
    other = evaluate(helpsteer, pair=["rm_helpfulness=helpfulness"], bootstrap=200, seed=1)
    assert other["attributes"][0]["pearson"]["low"] != h["pearson"]["low"]


def test_bootstrap_interval_is_percentiles_of_resamples():
    x = np.array([1.0, 2, 3, 4, 5, 6])
    y = np.array([1.0, 3, 2, 5, 4, 6])
    f = figures(x, y, {"pearson": pearson}, bootstrap=300, seed=7, confidence=0.9)
    rng = np.random.default_rng(7)
    draws = []
    for _ in range(300):
        i = rng.integers(0, 6, size=6)
        draws.append(stats.pearsonr(x[i], y[i])[0] if np.ptp(x[i]) and np.ptp(y[i])
                     else np.nan)
    d = np.array(draws)
    d = d[~np.isnan(d)]
    assert f["pearson"]["low"] == pytest.approx(np.quantile(d, 0.05))
    assert f["pearson"]["high"] == pytest.approx(np.quantile(d, 0.95))


def test_levels(helpsteer):
    d = evaluate(helpsteer, human_level="human_level", prefix="rm_", bootstrap=0)
    lv = d["levels"][0]
    # pairs (model, human): (4,4) (2,2) (5,5) (1,1) (3,1) (4,4); row 3 no human, row 5 no model
    assert (lv["n"], lv["skipped"]) == (6, 2)
    assert lv["exact"]["value"] == pytest.approx(5 / 6)
    assert lv["within_one"]["value"] == pytest.approx(5 / 6)
    assert lv["mae"]["value"] == pytest.approx(2 / 6)
    assert lv["spearman"]["value"] == pytest.approx(
        stats.spearmanr([4, 2, 5, 1, 3, 4], [4, 2, 5, 1, 1, 4])[0])
    assert lv["exact"]["low"] is None                     # --bootstrap 0: no interval


def test_pairwise_accuracy(rewardbench):
    d = evaluate(rewardbench, prefix="rm_", subset="subset", bootstrap=200)
    p = d["pairwise"]
    # 7 pairs with both scores: wins a, d, e, f, h; loss b; tie c (a tie is wrong)
    assert (p["n"], p["ties"], p["skipped"]) == (7, 1, 1)
    assert p["accuracy"]["value"] == pytest.approx(5 / 7)
    subs = {s["subset"]: s for s in p["subsets"]}
    assert subs["chat"]["accuracy"]["value"] == pytest.approx(2 / 3)   # a, f win; b loses
    assert subs["chat"]["skipped"] == 1
    assert subs["math"]["accuracy"]["value"] == pytest.approx(3 / 4)   # d, e, h; c ties
    assert 0 <= p["accuracy"]["low"] <= 5 / 7 <= p["accuracy"]["high"] <= 1


@pytest.mark.parametrize("kw, match", [
    ({"human": ["helpfulness"]}, "--prefix"),
    ({"human": ["nope"], "prefix": "rm_"}, "no column rm_nope"),
    ({"pair": ["rm_helpfulness"]}, "MODEL_COLUMN=HUMAN_COLUMN"),
    ({"pair": ["rm_helpfulness=human_level"]}, "not numbers"),
    ({}, "nothing to evaluate"),
    ({"human": ["helpfulness"], "prefix": "rm_", "subset": "x"}, "no column x"),
])
def test_bad_input(helpsteer, kw, match):
    with pytest.raises(UsageError, match=match):
        evaluate(helpsteer, bootstrap=0, **kw)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nfb", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli(helpsteer, rewardbench):
    p = _cli("eval", helpsteer, "--human", "helpfulness", "--prefix", "rm_", "--json",
             "--bootstrap", "50")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["attributes"][0]["n"] == 7 and d["bootstrap"] == 50
    p = _cli("eval", rewardbench, "--prefix", "rm_", "--subset", "subset", "--bootstrap", "50")
    assert p.returncode == 0, p.stderr
    assert "pairwise accuracy" in p.stdout and "71.4%" in p.stdout and "math" in p.stdout
    p = _cli("eval", helpsteer, "--pair", "rm_helpfulness=human_level")
    assert p.returncode == 2 and "not numbers" in p.stderr and "Traceback" not in p.stderr
    p = _cli("eval", "/nonexistent.parquet", "--human", "x")
    assert p.returncode == 1 and "no such file" in p.stderr
