"""nfb score end to end on tiny reward models, checked against transformers directly."""

import orjson
import pyarrow.parquet as pq
import pytest
import torch
from conftest import sample_rows, write_jsonl

from nfb.models.steerlm import STEERLM_ATTRIBUTES
from nfb.tasks.reward import PRESETS

W = ["--weights", "llama3-70b-steerlm"]   # a 9-head model no recipe names needs its weights
F32 = ["--dtype", "float32"]


def hf_outputs(model_dir, row, causal_token=None):
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(model_dir)
    msgs = [{"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["response"]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        if causal_token is None:
            m = LlamaForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
            return m(ids).logits[0].tolist()
        m = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return [m(ids).logits[0, -1, causal_token].item()]


@pytest.fixture
def src(tmp_path):
    rows = sample_rows(12)
    rows[4]["prompt"] = None
    return write_jsonl(tmp_path / "in.jsonl", rows), rows


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["llama3-70b-steerlm", "nemotron-4-340b",
                                  "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                                  "helpfulness=1,verbosity=-0.5", None])
def test_nine_heads_and_every_weight_form(cli, models, src, tmp_path, spec):
    path, rows = src
    out = tmp_path / "out.parquet"
    args = ["score", path, "-o", out, "--model", models["rm9"], *F32]
    if spec:
        args += ["--weights", spec]
    r = cli(*args)
    if spec is None:   # no recipe names this model: no card's weights, so none by default
        assert r.exit_code == 2 and "give --weights" in r.output, r.output
        return
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    assert t.num_rows == len(rows)
    names = list(STEERLM_ATTRIBUTES)
    assert t.column_names[-10:] == [*names, "reward"]
    if spec in PRESETS or spec is None:
        w = PRESETS[spec or "llama3-70b-steerlm"][0]
    elif "=" in spec:
        w = [0, 0, 0, 0, 1, 0, 0, 0, -0.5]
    else:
        w = [float(x) for x in spec.split(",")]
    for i, row in enumerate(t.to_pylist()):
        if i == 4:
            assert row["nfb_error"] == "null_field:prompt" and row["reward"] is None
            continue
        heads = [row[n] for n in names]
        assert row["reward"] == pytest.approx(sum(a * b for a, b in zip(heads, w)), abs=1e-9)
    meta = orjson.loads(t.schema.metadata[b"nfb"])
    assert meta["task_settings"]["attributes"] == names
    assert list(meta["task_settings"]["weights"].values()) == pytest.approx(list(w))


@pytest.mark.slow
def test_heads_equal_transformers(cli, models, src, tmp_path):
    path, rows = src
    out = tmp_path / "out.parquet"
    assert cli("score", path, "-o", out, "--model", models["rm9"], *W, *F32).exit_code == 0
    got = pq.read_table(out).to_pylist()
    for i in (0, 7):
        ref = hf_outputs(models["rm9"], rows[i])
        assert [got[i][n] for n in STEERLM_ATTRIBUTES] == pytest.approx(ref, abs=2e-3)
    # raw regression outputs: no softmax (would sum to 1) and no sigmoid (would be in 0..1)
    vals = [got[0][n] for n in STEERLM_ATTRIBUTES]
    assert abs(sum(vals) - 1) > 1e-3 and (min(vals) < 0 or max(vals) > 1)


@pytest.mark.slow
def test_scalar_model(cli, models, src, tmp_path):
    path, rows = src
    out = tmp_path / "out.parquet"
    r = cli("score", path, "-o", out, "--model", models["rm1"], *F32)
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    assert t.column_names[-3:] == ["nfb_row", "nfb_error", "reward"]
    assert t.column("reward")[0].as_py() == pytest.approx(hf_outputs(models["rm1"], rows[0])[0],
                                                         abs=2e-3)
    r = cli("score", path, "-o", out, "--model", models["rm1"], "--weights", "1", *F32)
    assert r.exit_code == 2 and "single output" in r.output


@pytest.mark.slow
def test_token_logit_route(cli, models, src, tmp_path):
    from transformers import AutoTokenizer

    path, rows = src
    out = tmp_path / "out.parquet"
    r = cli("score", path, "-o", out, "--model", models["causal"], "--reward-token", "5", *F32)
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    ref = hf_outputs(models["causal"], rows[1], causal_token=5)[0]
    assert t.column("reward")[1].as_py() == pytest.approx(ref, abs=2e-3)
    # the same token named as a string gives the same rewards
    name = AutoTokenizer.from_pretrained(models["causal"]).convert_ids_to_tokens(5)
    out2 = tmp_path / "out2.parquet"
    r = cli("score", path, "-o", out2, "--model", models["causal"], "--reward-token", name, *F32)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args,match", [
    (["--weights", "1,2,3"], "has 3 values but the model has 9 heads"),
    (["--weights", "bogus"], "unknown preset"),
    (["--weights", "nope=1"], "not an attribute"),
    (["--attributes", "a,b"], "names 2 heads"),
])
def test_bad_weights_exit_2_before_loading(cli, engines, models, src, tmp_path, args, match):
    engines("vllm", lambda *a: (_ for _ in ()).throw(AssertionError))
    r = cli("score", src[0], "-o", tmp_path / "o.parquet", "--model", models["rm9"], *args)
    assert r.exit_code == 2 and match in r.output.replace("\n", " ")


def test_causal_model_without_reward_token_is_refused(cli, models, src, tmp_path):
    r = cli("score", src[0], "-o", tmp_path / "o.parquet", "--model", models["causal"])
    assert r.exit_code == 2 and "--reward-token" in r.output


@pytest.mark.slow
def test_prefix_for_helpsteer_style_inputs(cli, models, tmp_path):
    rows = [dict(r, helpfulness=3, verbosity=1) for r in sample_rows(3)]
    path = write_jsonl(tmp_path / "hs.jsonl", rows)
    out = tmp_path / "o.parquet"
    r = cli("score", path, "-o", out, "--model", models["rm9"], *W, *F32)
    assert r.exit_code == 2 and "--prefix" in r.output
    r = cli("score", path, "-o", out, "--model", models["rm9"], "--prefix", "rm_", *W, *F32)
    assert r.exit_code == 0, r.output
    row = pq.read_table(out).to_pylist()[0]
    assert row["helpfulness"] == 3 and isinstance(row["rm_helpfulness"], float)
    assert isinstance(row["rm_reward"], float) and row["rm_nfb_row"] == 0
