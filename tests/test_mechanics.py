"""Mechanics of a run on the stub engine (real tokenizer and chat template, no vLLM):
ordering, resume bookkeeping, fingerprints, engine deaths and restarts, exit codes."""

import functools

import orjson
import pyarrow.parquet as pq
import pytest
from conftest import sample_rows, write_jsonl
from stub_engine import StubEngine, stub_heads

import nfb


@pytest.fixture
def src(tmp_path):
    rows = sample_rows(60)
    rows[5]["response"] = None
    return write_jsonl(tmp_path / "in.jsonl", rows)


def table(path):
    return pq.read_table(path)


def test_python_api_one_call(stub_cli, tiny_tokenizer_model, src, tmp_path):
    out = tmp_path / "o.parquet"
    result = nfb.feedback(src, out, model=tiny_tokenizer_model, max_tokens=64, batch_rows=7)
    assert result.rows == 60 and result.errors == {"null_field": 1}
    t = table(out)
    assert t.column("nfb_row").to_pylist() == list(range(60))
    assert t.column("nfb_error").to_pylist()[5] == "null_field:response"
    assert sum(result.levels.values()) == 59


@pytest.mark.parametrize("batch_rows,in_flight", [(1, 1), (7, 3), (64, 1024)])
def test_batch_rows_and_window_never_change_the_output(stub_cli, tiny_tokenizer_model, src,
                                                       tmp_path, batch_rows, in_flight):
    ref = tmp_path / "ref.parquet"
    nfb.feedback(src, ref, model=tiny_tokenizer_model, max_tokens=64)
    out = tmp_path / "o.parquet"
    nfb.feedback(src, out, model=tiny_tokenizer_model, max_tokens=64, batch_rows=batch_rows,
                 max_in_flight=in_flight, checkpoint_every=0)
    assert table(out).drop_columns([]).to_pylist() == table(ref).to_pylist()
    a = orjson.loads(table(out).schema.metadata[b"nfb"])
    b = orjson.loads(table(ref).schema.metadata[b"nfb"])
    assert a["fingerprint"] == b["fingerprint"]


def test_weights_spelled_two_ways_are_one_run(stub_cli, tmp_path, src, engines):
    """--weights llama3-70b-steerlm and its vector resume each other (the same run)."""
    import tiny_models
    rm = tiny_models.build_reward_model(tmp_path / "rm9", 9)
    out = tmp_path / "o.parquet"
    calls = []

    def dies_once(cfg, runner):
        calls.append(1)
        return StubEngine(cfg, runner, die_after=20 if len(calls) == 1 else None)
    engines("vllm", dies_once)
    r = stub_cli("score", src, "-o", out, "--model", rm, "--weights", "llama3-70b-steerlm",
                 "--batch-rows", "4", "--max-in-flight", "2", "--checkpoint-every", "0")
    assert r.exit_code == 1 and "rows are saved" in r.output, r.output
    assert (tmp_path / "o.parquet.nfb").exists()
    # the same run spelled as the vector: resumes
    r = stub_cli("score", src, "-o", out, "--model", rm, "--weights",
                 "0,0,0,0,0.65,0.8,0.45,0.55,-0.4")
    assert r.exit_code == 0, r.output
    assert "rows already done" in r.output
    t = table(out)
    assert t.column("nfb_row").to_pylist() == list(range(60))
    r = stub_cli("score", src, "-o", out, "--model", rm, "--weights", "llama3-70b-steerlm")
    assert r.exit_code == 0 and "already complete" in r.output, r.output
    # another weight vector is another run
    r = stub_cli("score", src, "-o", out, "--model", rm, "--weights", "helpfulness=1")
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_engine_death_saves_rows_and_exits_1(stub_cli, tiny_tokenizer_model, src, tmp_path,
                                             engines):
    engines("vllm", functools.partial(StubEngine, die_after=25))
    out = tmp_path / "o.parquet"
    args = ["feedback", src, "-o", out, "--model", tiny_tokenizer_model, "--max-tokens", "64",
            "--batch-rows", "5", "--max-in-flight", "2", "--checkpoint-every", "0"]
    r = stub_cli(*args)
    assert r.exit_code == 1, r.output
    line = " ".join(r.output.split())
    assert "the stub engine died" in line and "rows are saved" in line
    assert "run the same command again to go on" in line and "Traceback" not in r.output
    parts = list((tmp_path / "o.parquet.nfb").glob("part-*.parquet"))
    saved = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    assert 0 < saved < 60
    engines("vllm", StubEngine)
    r = stub_cli(*args)
    assert r.exit_code == 0, r.output
    ref = tmp_path / "ref.parquet"
    nfb.feedback(src, ref, model=tiny_tokenizer_model, max_tokens=64)
    assert table(out).to_pylist() == table(ref).to_pylist()


def test_engine_restarts_finish_the_run(stub_cli, tiny_tokenizer_model, src, tmp_path,
                                        engines):
    starts = []

    def flaky(cfg, runner):
        starts.append(1)
        return StubEngine(cfg, runner, die_after=15 if len(starts) <= 2 else None)
    engines("vllm", flaky)
    out = tmp_path / "o.parquet"
    r = stub_cli("feedback", src, "-o", out, "--model", tiny_tokenizer_model, "--max-tokens",
                 "64", "--batch-rows", "5", "--max-in-flight", "2", "--engine-restarts", "2")
    assert r.exit_code == 0, r.output
    assert len(starts) == 3 and r.output.count("restarting the engine") == 2
    engines("vllm", StubEngine)
    ref = tmp_path / "ref.parquet"
    res = nfb.feedback(src, ref, model=tiny_tokenizer_model, max_tokens=64)
    assert table(out).to_pylist() == table(ref).to_pylist()
    meta = orjson.loads(table(out).schema.metadata[b"nfb"])
    assert meta["summary"]["errors"] == {"null_field": 1}
    assert meta["summary"]["levels"] == {str(k): v for k, v in sorted(res.levels.items())}


def test_score_values_and_bias_from_a_converted_config(stub_cli, tmp_path, src):
    """A directory made by `nfb convert` carries its head bias and prompt format; both are
    applied and recorded."""
    import json

    import tiny_models
    rm = tiny_models.build_reward_model(tmp_path / "rm9", 9)
    cfg = json.loads((rm / "config.json").read_text())
    bias = [0.5 * i for i in range(9)]
    cfg["nfb"] = {"prompt_format": "chat", "head_bias": bias, "recipe": "test"}
    (rm / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.parquet"
    r = stub_cli("score", src, "-o", out, "--model", rm, "--weights", "llama3-70b-steerlm")
    assert r.exit_code == 0, r.output
    t = table(out)
    meta = orjson.loads(t.schema.metadata[b"nfb"])
    assert meta["task_settings"]["head_bias"] == bias
    from transformers import AutoTokenizer

    from nfb.models.steerlm import STEERLM_ATTRIBUTES
    from nfb.tasks.reward import PRESETS
    tok = AutoTokenizer.from_pretrained(rm)
    row = t.to_pylist()[0]
    msgs = [{"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["response"]}]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)
    heads = [h + b for h, b in zip(stub_heads(ids["input_ids"], 9), bias)]
    assert [row[a] for a in STEERLM_ATTRIBUTES] == pytest.approx(heads)
    w = PRESETS["llama3-70b-steerlm"][0]
    assert row["reward"] == pytest.approx(sum(a * b for a, b in zip(heads, w)))


def test_several_responses_per_row(stub_cli, tiny_tokenizer_model, tmp_path):
    """--response-field chosen --response-field rejected and --responses-field: each response
    judged on its own, columns per response; the same texts as one-response runs."""
    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}",
             "all": [f"good {i}", f"bad {i}", f"other {i}"]} for i in range(9)]
    rows[4]["rejected"] = None
    rows[6]["all"] = []
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "o.parquet"
    m = ["--model", tiny_tokenizer_model, "--max-tokens", "64"]
    r = stub_cli("feedback", src, "-o", out, "--response-field", "chosen", "--response-field",
                 "rejected", *m)
    assert r.exit_code == 0, r.output
    t = table(out).to_pylist()
    assert t[4]["nfb_error"] == "null_field:rejected" and t[4]["chosen_feedback"] is None
    for name in ("chosen", "rejected"):
        single = tmp_path / f"{name}.parquet"
        r = stub_cli("feedback", src, "-o", single, "--response-field", name, *m)
        want = table(single).to_pylist()
        for i, row in enumerate(t):
            if i != 4:
                assert row[f"{name}_feedback"] == want[i]["feedback"]
                assert row[f"{name}_feedback_level"] == want[i]["feedback_level"]
    meta = orjson.loads(table(out).schema.metadata[b"nfb"])
    assert meta["task_settings"]["responses"] == ["chosen", "rejected"]
    out2 = tmp_path / "l.parquet"
    r = stub_cli("feedback", src, "-o", out2, "--responses-field", "all", *m)
    assert r.exit_code == 0, r.output
    t2 = table(out2).to_pylist()
    assert t2[6]["nfb_error"] == "empty_field:all" and t2[6]["all_feedback"] is None
    assert [len(x["all_feedback_level"]) for i, x in enumerate(t2) if i != 6] == [3] * 8
    assert t2[0]["all_feedback"][:2] == [t[0]["chosen_feedback"], t[0]["rejected_feedback"]]
    r = stub_cli("feedback", src, "-o", tmp_path / "x.parquet", "--responses-field", "all",
                 "--response-field", "chosen", *m)
    assert r.exit_code == 2 and "not both" in r.output


def test_several_responses_scored(stub_cli, models, tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out, single = tmp_path / "o.parquet", tmp_path / "s.parquet"
    r = stub_cli("score", src, "-o", out, "--model", models["rm1"], "--response-field",
                 "chosen", "--response-field", "rejected")
    assert r.exit_code == 0, r.output
    assert stub_cli("score", src, "-o", single, "--model", models["rm1"], "--response-field",
                    "rejected").exit_code == 0
    t = table(out)
    assert t.column_names[-4:] == ["nfb_row", "nfb_error", "chosen_reward", "rejected_reward"]
    assert t.column("rejected_reward").to_pylist() == table(single).column("reward").to_pylist()


def test_a_chat_template_that_refuses_a_row_gives_an_error_row(stub_cli, tiny_tokenizer_model,
                                                              tmp_path):
    """Templates such as Gemma's raise for some conversations: that row gets
    template_error, the others are scored (the run never dies on one row)."""
    import json
    import shutil

    model = tmp_path / "strict"
    shutil.copytree(tiny_tokenizer_model, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    import tiny_models
    cfg["chat_template"] = ("{% for m in messages %}{% if 'BOOM' in m['content'] %}"
                            "{{ raise_exception('roles must alternate') }}{% endif %}"
                            "{% endfor %}" + tiny_models.CHAT_TEMPLATE)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    for extra in model.glob("chat_template.*"):
        extra.unlink()
    rows = sample_rows(6)
    rows[2]["response"] = "BOOM"
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "o.parquet"
    r = stub_cli("feedback", src, "-o", out, "--model", model, "--max-tokens", "64")
    assert r.exit_code == 0, r.output
    errs = table(out).column("nfb_error").to_pylist()
    assert errs[2] == "template_error:roles must alternate"
    assert [e for i, e in enumerate(errs) if i != 2] == [None] * 5
