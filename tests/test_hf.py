"""The Hugging Face ecosystem: a directory written by `datasets.save_to_disk` reads as input
(also one built by hand per the format, for machines without `datasets`), and `--card`
writes a dataset card whose YAML metadata matches the output (parsed with PyYAML, and read
by `datasets.load_dataset` where it is installed)."""

from __future__ import annotations

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import sample_rows, write_jsonl

FAST = ["--max-tokens", "8", "--temperature", "0"]


def _rows(n: int):
    return [{**r, "messages_n": i, "tags": [f"t{i}"] * (i % 3)} for i, r in
            enumerate(sample_rows(n))]


def _save_by_hand(directory, table: pa.Table, shards: int = 2) -> None:
    """What save_to_disk writes: Arrow IPC stream shards, state.json, dataset_info.json."""
    directory.mkdir(parents=True)
    names, step = [], -(-len(table) // shards)
    for i in range(shards):
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        with pa.OSFile(str(directory / name), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as w:
            for batch in table.slice(i * step, step).to_batches(max_chunksize=3):
                w.write_batch(batch)
        names.append({"filename": name})
    (directory / "state.json").write_bytes(orjson.dumps(
        {"_data_files": names, "_fingerprint": "x", "_format_columns": None,
         "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
         "_split": None}))
    (directory / "dataset_info.json").write_bytes(orjson.dumps({"features": {}}))


def _same_as_jsonl_run(stub_cli, model, src, rows, tmp_path):
    out = tmp_path / "from_disk.parquet"
    r = stub_cli("feedback", src, "-o", out, "--model", model, *FAST)
    assert r.exit_code == 0, r.output
    ref = tmp_path / "from_jsonl.parquet"
    r = stub_cli("feedback", write_jsonl(tmp_path / "in.jsonl", rows), "-o", ref,
                 "--model", model, *FAST)
    assert r.exit_code == 0, r.output
    a, b = pq.read_table(out), pq.read_table(ref)
    assert a.column("nfb_row").to_pylist() == list(range(len(rows)))
    cols = [c for c in b.column_names if c != "tags"]
    assert a.select(cols).to_pylist() == b.select(cols).to_pylist()
    assert a.column("tags").to_pylist() == [r["tags"] for r in rows]
    return a


def test_save_to_disk_directory_reads_as_input(stub_cli, tiny_tokenizer_model, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _rows(13)
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    assert len(list((tmp_path / "ds").glob("*.arrow"))) == 3
    _same_as_jsonl_run(stub_cli, tiny_tokenizer_model, tmp_path / "ds", rows, tmp_path)
    # a DatasetDict: name a split
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    r = stub_cli("feedback", tmp_path / "dd", "-o", tmp_path / "o.parquet", "--model",
                 tiny_tokenizer_model, *FAST)
    assert r.exit_code == 1
    assert "a saved DatasetDict (splits train, test)" in r.output and "Traceback" not in r.output
    r = stub_cli("feedback", tmp_path / "dd" / "test", "-o", tmp_path / "o.parquet",
                 "--model", tiny_tokenizer_model, *FAST)
    assert r.exit_code == 0, r.output
    assert pq.read_table(tmp_path / "o.parquet").num_rows == 13


def test_hand_built_save_to_disk_directory_and_a_truncated_shard(stub_cli, tiny_tokenizer_model,
                                                                 tmp_path):
    rows = _rows(11)
    _save_by_hand(tmp_path / "ds", pa.Table.from_pylist(rows), shards=2)
    _same_as_jsonl_run(stub_cli, tiny_tokenizer_model, tmp_path / "ds", rows, tmp_path)
    # the second shard breaks off inside its second record batch: the first batch is kept,
    # then one error row, and the plan counts the same
    shard = tmp_path / "ds" / "data-00001-of-00002.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * 0.6)])
    out = tmp_path / "t.parquet"
    r = stub_cli("feedback", tmp_path / "ds", "-o", out, "--model", tiny_tokenizer_model, *FAST)
    assert r.exit_code == 0, r.output
    errs = pq.read_table(out).column("nfb_error").to_pylist()
    assert errs[-1] == "truncated_file:data-00001-of-00002.arrow"
    assert errs[:-1] == [None] * (len(errs) - 1) and 6 < len(errs) < 12
    r = stub_cli("feedback", tmp_path / "ds", "-o", tmp_path / "p.parquet", "--model",
                 tiny_tokenizer_model, *FAST, "--dry-run", "--json")
    plan = orjson.loads(r.stdout)
    assert plan["rows"] == len(errs) and plan["errors"] == {"truncated_file": 1}


def _card(path):
    text = path.read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_card_for_feedback_matches_the_output(stub_cli, tiny_tokenizer_model, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(20) + [{"prompt": "no response"}])
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "scored.parquet"
    r = stub_cli("feedback", src, "-o", out, "--model", tiny_tokenizer_model, *FAST, "--card")
    assert r.exit_code == 0, r.output
    meta, body = _card(tmp_path / "out" / "README.md")
    t = pq.read_table(out)
    nfb = meta["nfb"]
    assert meta["configs"][0]["data_files"][0]["path"] == "scored.parquet"
    assert nfb["task"] == "feedback" and nfb["model"] == str(tiny_tokenizer_model)
    assert [c["name"] for c in nfb["columns"]] == t.column_names
    assert [c["type"] for c in nfb["columns"]] == [str(f.type) for f in t.schema]
    assert {c["name"] for c in nfb["columns"] if c["added_by_nfb"]} == \
        {"nfb_row", "nfb_error", "feedback", "feedback_level", "feedback_label"}
    assert nfb["counts"] == {"rows": 21, "error_rows": 1, "errors": {"missing_field": 1}}
    levels = t.column("feedback_level").to_pylist()
    got = {int(k.split()[0]): v for k, v in nfb["levels"].items() if k != "unparsed"}
    assert got == {lv: levels.count(lv) for lv in range(1, 6)}
    assert nfb["sampling"]["max_tokens"] == 8
    assert "scored.parquet" in body
    # the same command again refreshes the card; someone else's README is never replaced
    r = stub_cli("feedback", src, "-o", out, "--model", tiny_tokenizer_model, *FAST, "--card")
    assert r.exit_code == 0, r.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "README.md").write_text("# mine\n")
    r = stub_cli("feedback", src, "-o", tmp_path / "other" / "o.parquet", "--model",
                 tiny_tokenizer_model, *FAST, "--card")
    assert r.exit_code == 2 and "was not written by nfb" in r.output
    assert not (tmp_path / "other" / "o.parquet").exists()
    assert (tmp_path / "other" / "README.md").read_text() == "# mine\n"
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(str(tmp_path / "out"), split="train")
    assert ds.num_rows == 21 and ds.column_names == t.column_names


def test_card_for_score_has_the_quantiles(stub_cli, models, tmp_path):
    import numpy as np

    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(30))
    out = tmp_path / "scored.jsonl"
    r = stub_cli("score", src, "-o", out, "--model", models["rm9"], "--card",
                 "--weights", "llama3-70b-steerlm")
    assert r.exit_code == 0, r.output
    nfb = _card(tmp_path / "README.md")[0]["nfb"]
    rewards = [orjson.loads(x)["reward"] for x in out.read_bytes().splitlines()]
    q = nfb["quantiles"]["reward"]
    assert q["count"] == 30
    for name, p in (("p0", 0), ("p5", 5), ("p50", 50), ("p95", 95), ("p100", 100)):
        assert q[name] == pytest.approx(float(np.percentile(rewards, p)), rel=1e-9, abs=1e-12)
    assert nfb["weights"] and nfb["counts"]["rows"] == 30
