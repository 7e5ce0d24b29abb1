"""nfb report: the page's content from a hand-made table, and its rendering in a real
headless browser (Debian's chromium driven by Playwright; no network allowed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nfb.errors import UsageError
from nfb.verbs.report import chart_ids, collect, report

ATTRS = ["helpfulness", "correctness", "verbosity"]


@pytest.fixture
def scored(tmp_path):
    rng = np.random.default_rng(0)
    n = 120
    length = rng.integers(10, 400, n)
    reward = length / 100 + rng.normal(0, 0.1, n)          # a strong length bias
    t = pa.table({
        "prompt": [f"p{i % 30}" for i in range(n)],
        "response": ["x" * int(k) for k in length],
        "nfb_row": pa.array(range(n), pa.int64()),
        "nfb_error": [None] * 110 + ["prompt_too_long:9 tokens > 8"] * 7
        + ["missing_field:<script>alert(1)</script>"] * 3,
        "helpfulness": rng.normal(2, 1, n), "correctness": rng.normal(2, 1, n),
        "verbosity": -reward, "reward": reward,
        "feedback_level": pa.array([1, 2, 3, 4, 5, None] * 20, pa.int8()),
    })
    meta = {"model": "nvidia/rm</title><script>alert(1)</script>", "task": "score",
            "prompt": "Evaluate </pre><b>x</b>", "nfb_version": "9.9",
            "task_settings": {"weights": [0.65, 0.8, -0.4], "attributes": ATTRS},
            "columns": ["nfb_row", "nfb_error", *ATTRS, "reward", "feedback_level"]}
    p = tmp_path / "scored.parquet"
    pq.write_table(t.replace_schema_metadata({b"nfb": json.dumps(meta).encode()}), p)
    return str(p)


def test_content(scored, tmp_path):
    data = collect([scored])
    assert chart_ids(data) == [*(f"dist-{a}" for a in ATTRS), "dist-reward", "levels",
                               "length-reward", "correlations", "errors"]
    assert data["errors"] == {"prompt_too_long": 7, "missing_field": 3}
    assert data["levels"] == {1: 20, 2: 20, 3: 20, 4: 20, 5: 20}
    assert data["unparsed"] == 18                           # 20 null levels, 2 on error rows
    names, m = data["matrix"]
    assert m[names.index("verbosity"), names.index("reward")] == pytest.approx(-1.0)
    page = open(report(scored, str(tmp_path / "r.html")), encoding="utf-8").read()
    assert "<script" not in page.lower()                    # data is escaped, no script
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)    # nothing remote
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    ln = data["length"]["reward"]
    from scipy import stats
    r = stats.pearsonr(ln[1], ln[2])[0]
    assert r > 0.9 and f"Pearson r = {r:.3g}" in page


def test_bad_output(scored, tmp_path):
    with pytest.raises(UsageError, match=".html"):
        report(scored, str(tmp_path / "r.pdf"))


def test_cli(scored, tmp_path):
    out = tmp_path / "r.html"
    p = subprocess.run([sys.executable, "-m", "nfb", "report", scored, "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert out.exists() and "report ->" in p.stderr
    p = subprocess.run([sys.executable, "-m", "nfb", "report", scored, "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--overwrite" in p.stderr


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (CI "
                    "installs it with .ci/setup-browser: apt-get install chromium)")
def test_renders_in_browser(scored, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    # a second shape: chosen/rejected fields, no levels, no errors
    t = pa.table({"prompt": ["a", "b", "c"], "chosen": ["xx", "xxxx", "x"],
                  "rejected": ["y", "yyy", "yy"], "chosen_reward": [1.0, 2.0, 0.5],
                  "rejected_reward": [0.0, 1.0, 0.7]})
    fields = tmp_path / "fields.parquet"
    pq.write_table(t, fields)
    pages = [(report(scored, str(tmp_path / "a.html")), collect([scored])),
             (report(str(fields), str(tmp_path / "b.html")), collect([str(fields)]))]
    assert "length-chosen_reward" in chart_ids(pages[1][1])
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(),
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            for path, data in pages:
                page = browser.new_page()
                problems: list[str] = []
                requests: list[str] = []
                page.on("console", lambda m, out=problems: out.append(m.text)
                        if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e, out=problems: out.append(str(e)))
                page.on("request", lambda r, out=requests: out.append(r.url))
                page.goto("file://" + os.path.abspath(path))
                page.wait_for_load_state("load")
                assert problems == []
                assert all(u.startswith("file://") for u in requests), requests
                ids = page.eval_on_selector_all("figure.chart",
                                                "fs => fs.map(f => f.dataset.chart)")
                assert ids == chart_ids(data)
                for cid in ids:
                    fig = page.locator(f'figure[data-chart="{cid}"]')
                    assert fig.is_visible(), cid
                    svg = fig.locator("svg")
                    assert svg.count() == 1 and svg.is_visible(), cid
                    box = svg.bounding_box()
                    assert box["width"] > 100 and box["height"] > 50, (cid, box)
                    marks = svg.locator("rect, circle").count()
                    assert marks > 0 or cid == "errors", cid
                if data["errors"]:
                    assert page.locator('figure[data-chart="errors"] rect.bar').count() == \
                        len(data["errors"])
                for s, (_, ln, _) in data["length"].items():
                    assert page.locator(f'figure[data-chart="length-{s}"] circle').count() == \
                        len(ln)
                if data["has_levels"]:
                    assert page.locator('figure[data-chart="levels"] rect.bar').count() == 6
                assert page.locator("#provenance").is_visible() == bool(data["meta"])
                assert page.title().startswith("nfb report")
                page.close()
        finally:
            browser.close()
