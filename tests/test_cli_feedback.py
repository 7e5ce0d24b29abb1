"""nfb feedback end to end: real vLLM on a tiny random Llama, through the CLI."""

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import sample_rows, write_jsonl

from nfb.tasks.feedback import EVAL_PROMPT, parse_level

FAST = ["--max-tokens", "12", "--temperature", "0", "--dtype", "float32"]


def read(path):
    return pq.read_table(path)


@pytest.mark.slow
def test_output_matches_input_row_by_row(cli, models, tmp_path):
    rows = sample_rows(40)
    rows[5]["response"] = None
    rows[9] = {"id": 9, "prompt": "only a prompt"}
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    r = cli("feedback", src, "-o", out, "--model", models["causal"], *FAST)
    assert r.exit_code == 0, r.output
    t = read(out)
    assert t.num_rows == 40
    got = t.to_pylist()
    for i, (inp, o) in enumerate(zip(rows, got)):
        assert o["nfb_row"] == i
        for k, v in inp.items():
            assert o[k] == v
        if i == 5:
            assert o["nfb_error"] == "null_field:response" and o["feedback"] is None
        elif i == 9:
            assert o["nfb_error"] == "missing_field:response"
        else:
            assert o["nfb_error"] is None and isinstance(o["feedback"], str)
            assert o["feedback_level"] == parse_level(o["feedback"])
    assert t.schema.field("feedback_level").type == pa.int8()
    meta = orjson.loads(t.schema.metadata[b"nfb"])
    assert meta["model"] == str(models["causal"]) and meta["prompt"] == EVAL_PROMPT
    assert meta["sampling"]["temperature"] == 0.0 and meta["sampling"]["max_tokens"] == 12
    assert meta["inputs"] == [str(src)] and meta["nfb_version"]
    assert not (tmp_path / "out.parquet.nfb").exists()
    assert "rows with errors" in r.output


@pytest.mark.slow
def test_same_text_as_llm_chat(cli, models, tmp_path):
    """nfb renders the chat itself; the model must see exactly what LLM.chat would send."""
    from conftest import shared_engine
    from vllm import SamplingParams

    from nfb.config import EngineConfig

    rows = sample_rows(6)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    assert cli("feedback", src, "-o", out, "--model", models["causal"], *FAST).exit_code == 0
    eng = shared_engine(EngineConfig(model=str(models["causal"]), dtype="float32"), "generate")
    convs = [[{"role": "user", "content": r["prompt"]},
              {"role": "assistant", "content": r["response"]},
              {"role": "user", "content": EVAL_PROMPT}] for r in rows]
    ref = eng.llm.chat(convs, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert read(out).column("feedback").to_pylist() == [o.outputs[0].text for o in ref]


@pytest.mark.slow
def test_messages_field_and_parquet_types_kept(cli, models, tmp_path):
    msgs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Sea?"},
             {"role": "assistant", "content": "Big and blue."}],
            [{"role": "user", "content": "Q"}],  # no response to judge
            [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]]
    t = pa.table({"conv": msgs, "score": pa.array([1, 2, 3], pa.int16()),
                  "ts": pa.array([1, 2, 3], pa.timestamp("ms"))})
    src = tmp_path / "multi.parquet"
    pq.write_table(t, src)
    out = tmp_path / "out.parquet"
    r = cli("feedback", src, "-o", out, "--messages-field", "conv", "--model", models["causal"],
            *FAST)
    assert r.exit_code == 0, r.output
    o = read(out)
    assert o.schema.field("score").type == pa.int16()
    assert o.schema.field("ts").type == pa.timestamp("ms")
    assert o.column("conv").to_pylist() == msgs
    assert o.column("nfb_error").to_pylist() == [
        None, "bad_messages:last turn is not from the assistant", None]


@pytest.mark.slow
def test_samples_and_seed(cli, models, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(5))
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.parquet"
        r = cli("feedback", src, "-o", out, "--model", models["causal"], "--samples", "3",
                "--seed", "7", "--temperature", "1.0", "--max-tokens", "8", "--dtype", "float32")
        assert r.exit_code == 0, r.output
        outs.append(read(out))
    a, b = outs
    assert a.column("feedback_samples").to_pylist() == b.column("feedback_samples").to_pylist()
    for row in a.to_pylist():
        assert len(row["feedback_samples"]) == 3 and row["feedback"] == row["feedback_samples"][0]
        assert row["feedback_levels"] == [parse_level(x) for x in row["feedback_samples"]]
    assert a.schema.field("feedback_level_mean").type == pa.float64()


@pytest.mark.slow
def test_constrain_level_gives_every_row_a_level(cli, models, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(8))
    out = tmp_path / "out.jsonl"
    r = cli("feedback", src, "-o", out, "--model", models["causal"], "--constrain-level",
            "--max-tokens", "20", "--dtype", "float32", "--seed", "1")
    assert r.exit_code == 0, r.output
    rows = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert len(rows) == 8
    assert all(x["feedback"].startswith("The response is ") for x in rows)
    assert all(x["feedback_level"] in range(1, 6) for x in rows)
    meta = orjson.loads((tmp_path / "out.jsonl.nfb.json").read_bytes())
    assert meta["sampling"]["regex"].startswith("The response is (not|slightly")


@pytest.mark.slow
def test_prompt_too_long_is_an_error_row(cli, models, tmp_path):
    rows = sample_rows(3)
    rows[1]["prompt"] = "word " * 3000
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    r = cli("feedback", src, "-o", out, "--model", models["causal"], *FAST)
    assert r.exit_code == 0, r.output
    errs = read(out).column("nfb_error").to_pylist()
    assert errs[0] is None and errs[2] is None and errs[1].startswith("prompt_too_long:")


def test_column_clash_fails_before_loading(stub_cli, engines, tiny_tokenizer_model, tmp_path):
    def boom(*a):
        raise AssertionError("the model must not load")
    engines("vllm", boom)
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "response": "r", "feedback": "x"}])
    r = stub_cli("feedback", src, "-o", tmp_path / "o.parquet", "--model",
                 tiny_tokenizer_model, *FAST)
    assert r.exit_code == 2 and "--prefix" in r.output


@pytest.mark.slow
def test_prefix_avoids_the_clash(cli, models, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl",
                      [{"prompt": "p", "response": "r", "feedback": "old", "nfb_row": 99}])
    out = tmp_path / "o.parquet"
    r = cli("feedback", src, "-o", out, "--model", models["causal"], "--prefix", "fb2_", *FAST)
    assert r.exit_code == 0, r.output
    row = read(out).to_pylist()[0]
    assert row["feedback"] == "old" and row["nfb_row"] == 99
    assert row["fb2_nfb_row"] == 0 and isinstance(row["fb2_feedback"], str)
