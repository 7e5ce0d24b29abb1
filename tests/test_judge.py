"""`nfb judge`: generative reward models (GenRM) that reason, then write their scores.

Parsing is pure (unit and property tests on the formats NVIDIA's GenRMs write); mechanics run
on a stub engine that answers with chosen judgement texts; truth runs real vLLM on a tiny GenRM
trained to write the boxed format, compared row by row with transformers generating from the
same chat template."""

from __future__ import annotations

import functools
import json
import re

import orjson
import pyarrow.parquet as pq
import pytest
import tiny_models
from conftest import sample_rows, write_jsonl
from hypothesis import assume, given
from hypothesis import strategies as st
from stub_engine import StubEngine

from nfb.tasks.judge import JudgeColumns, Unreadable, parse_judgement, preferred

GENRM = "nvidia/Llama-3_3-Nemotron-Super-49B-GenRM"
F32 = ["--dtype", "float32"]

BOXED_2 = ("<think>\nLet me compare. Draft: [The Begin of Individual Scores]\n\\boxed{1, 1}\n"
           "[The End of Individual Scores]\n</think>\n\n"
           "[The Begin of Analysis on Response 1]\nCorrect.\n[The End of Analysis on Response 1]\n"
           "[The Begin of Analysis on Response 2]\nWrong sum.\n[The End of Analysis on Response 2]"
           "\n\n[The Begin of Individual Scores]\n\\boxed{5, 1}\n[The End of Individual Scores]\n"
           "\n[The Begin of Ranking Score]\n\\boxed{1} \n[The End of Ranking Score]")
JSON_2 = ('Reasoning here.</think>\n```json\n{"response_1_analysis": "ok {fine}", '
          '"response_2_analysis": "bad", "score_1": 2, "score_2": 4, "ranking": 5}\n```')


# --- parsing (pure) -------------------------------------------------------------------------

def test_boxed_two_responses_reads_the_blocks_after_the_reasoning():
    j = parse_judgement(BOXED_2, 2)
    assert j.helpfulness == (5.0, 1.0) and j.ranking == 1.0   # not the draft in the reasoning
    assert preferred(j.ranking) == 1


def test_json_two_responses_and_single_response_formats():
    j = parse_judgement(JSON_2, 2)
    assert j.helpfulness == (2.0, 4.0) and j.ranking == 5.0 and preferred(5.0) == 2
    one = ("<think>ok</think>\n[The Begin of Individual Scores]\n\\boxed{3} \n"
           "[The End of Individual Scores]\n")
    assert parse_judgement(one, 1).helpfulness == (3.0,)
    assert parse_judgement(one, 1).ranking is None
    # a template that keeps the reasoning out of the text: the whole text is read
    assert parse_judgement("[The Begin of Individual Scores]\\boxed{4.5}[The End of "
                           "Individual Scores]", 1).helpfulness == (4.5,)


def test_a_reasoning_model_cut_off_before_its_answer_is_never_read():
    """A GenRM whose template opens <think> itself writes no <think>; cut off at --max-tokens
    its text has no </think> either, and a draft in the reasoning must not pass for scores."""
    cut = 'Let me think. Draft: {"score_1": 5, "score_2": 1, "ranking": 1}. But wait, response'
    with pytest.raises(Unreadable, match="^unfinished_reasoning"):
        parse_judgement(cut, 2, reasons=True)
    assert parse_judgement(cut, 2).ranking == 1.0   # an unknown model without think tags


def test_the_ranking_belongs_to_the_last_scores_block():
    revised = ("</think>[The Begin of Individual Scores]\\boxed{1, 5}[The End of Individual "
               "Scores][The Begin of Ranking Score]\\boxed{6}[The End of Ranking Score] On "
               "second thought: [The Begin of Individual Scores]\\boxed{5, 1}[The End of "
               "Individual Scores]")
    with pytest.raises(Unreadable, match="^no_ranking"):
        parse_judgement(revised, 2)
    one_box_each = ("</think>[The Begin of Individual Scores]\\boxed{4}, \\boxed{2}[The End "
                    "of Individual Scores][The Begin of Ranking Score]\\boxed{2}[The End of "
                    "Ranking Score]")
    j = parse_judgement(one_box_each, 2)
    assert j.helpfulness == (4.0, 2.0) and j.ranking == 2.0


@pytest.mark.parametrize("text,responses,code", [
    ("", 1, "empty"),
    ("<think>still thinking about response 1", 1, "unfinished_reasoning"),
    ("</think>The response is good.", 1, "no_scores"),
    (BOXED_2, 1, "wrong_count"),
    ("</think>[The Begin of Individual Scores]\\boxed{4, 2}[The End of Individual Scores]", 2,
     "no_ranking"),
    ("</think>[The Begin of Individual Scores]\\boxed{7}[The End of Individual Scores]", 1,
     "out_of_range"),
    ("</think>[The Begin of Individual Scores]\\boxed{good}[The End of Individual Scores]", 1,
     "not_a_number"),
    ('</think>{"score_1": true}', 1, "not_a_number"),
    ('</think>{"score_1": 3, "score_2": 3, "ranking": 0}', 2, "out_of_range"),
    ("</think>[The Begin of Individual Scores]none[The End of Individual Scores]", 1,
     "bad_scores"),
])
def test_unreadable_judgements_say_why(text, responses, code):
    with pytest.raises(Unreadable) as e:
        parse_judgement(text, responses)
    assert str(e.value).split(":", 1)[0] == code


@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 6), st.text(max_size=200),
       st.text(st.characters(blacklist_characters="["), max_size=200))
def test_card_format_round_trips(x, y, z, reasoning, analysis):
    """Any reasoning (braces, drafts, tags) and any analysis without block markers."""
    assume("</think>" not in reasoning)
    text = (f"<think>{reasoning}</think>{analysis}\n"
            + tiny_models.genrm_target([x, y], z).split("</think>", 1)[1])
    j = parse_judgement(text, 2)
    assert j.helpfulness == (x, y) and j.ranking == z
    assert preferred(z) == (1 if z <= 3 else 2)


def test_votes_average_the_samples_that_parse():
    cols = JudgeColumns(responses=2, samples=3)
    texts = ["</think>no scores", BOXED_2, JSON_2]
    v = cols.values(texts)
    assert v["helpfulness_1"] == 3.5 and v["helpfulness_2"] == 2.5 and v["ranking"] == 3.0
    assert v["preferred"] == 1 and v["judge_votes"] == 2 and v["judge_error"] is None
    assert v["helpfulness_1_samples"] == [None, 5.0, 2.0]
    assert v["judgements"][0] == "no scores"
    assert v["judgement"] == BOXED_2.split("</think>")[1].strip()   # a sample that counted
    none = cols.values(["</think>x", "</think>y", "<think>z"])
    assert none["ranking"] is None and none["preferred"] is None and none["judge_votes"] == 0
    assert none["judge_error"].startswith("no_scores:no sample of 3 readable")
    assert set(v) == set(cols.schema().names) == set(none)


# --- NVIDIA's rules, read from their code and written out here (independent expectations) ---

def nvidia_final_answer(response: str) -> str:
    """NeMo-RL nemo_rl/environments/genrm_rlhf_environment.py: `if reasoning_split_word in
    response: response = response.split(reasoning_split_word)[-1].lstrip()` ("</think>");
    NeMo Gym genrm_compare utils.extract_output_text: "None" when the answer is empty."""
    if "</think>" in response:
        response = response.split("</think>")[-1].lstrip()
    if not response or not response.strip():
        return "None"
    return response


def nvidia_aggregate(results: list[tuple[float, float, float]]) -> tuple[float, float]:
    """NeMo Gym genrm_compare utils.aggregate_scores (simple_tiebreaker) for one pair judged
    len(results) times (num_judges_per_comparison), each result (score_1, score_2, ranking),
    an unparsable one already replaced by (default_score 3.0, 3.0, default_ranking 3.5)."""
    acc, n = [0.0, 0.0], 0
    for score_1, score_2, ranking in results:
        if score_1 == score_2:
            adjustment = 3.5 - ranking
            score_1 = score_1 + adjustment
            score_2 = score_2 - adjustment
        acc[0] += score_1
        acc[1] += score_2
        n += 1
    return acc[0] / n, acc[1] / n


@pytest.mark.parametrize("response", [
    "<think>\nweigh it</think>\n\n  The answer is 4.", "no reasoning here", "<think>a</think>",
    "x</think>y</think>  z", "</think>", "  ", "<think>never closed"])
def test_judged_responses_are_their_final_answer_as_nvidia_sends_them(response):
    from nfb.records import Conversation
    from nfb.tasks.judge import final_answer, judge_messages

    assert final_answer(response) == nvidia_final_answer(response)
    conv = Conversation(({"role": "user", "content": "Q?"},), response, (response, "<think>"
                                                                         "b</think>B"))
    msgs = judge_messages(conv, conv.alternatives)
    assert [m["content"] for m in msgs[1:]] == [nvidia_final_answer(response), "B"]


def test_nvidia_votes_are_nemo_gyms_aggregate_scores():
    def boxed(x, y, z):
        return (f"<think>t</think>[The Begin of Individual Scores]\n\\boxed{{{x}, {y}}}\n"
                f"[The End of Individual Scores]\n[The Begin of Ranking Score]\n\\boxed{{{z}}}"
                "\n[The End of Ranking Score]")
    cases = [
        [(4, 4, 2), (3, 5, 5), None],         # a tie broken by the ranking; one unreadable
        [(2, 2, 6), (2, 2, 1)],               # two ties, opposite ways
        [None, None],                         # nothing readable: the fallback values
        [(5, 1, 1)],
    ]
    for case in cases:
        texts = [boxed(*c) if c else "</think>no scores" for c in case]
        cols = JudgeColumns(responses=2, samples=len(texts), votes="nvidia")
        v = cols.values(texts)
        results = [c if c else (3.0, 3.0, 3.5) for c in case]
        h1, h2 = nvidia_aggregate(results)
        assert (v["helpfulness_1"], v["helpfulness_2"]) == pytest.approx((h1, h2))
        assert v["ranking"] == pytest.approx(sum(r[2] for r in results) / len(results))
        mean = JudgeColumns(responses=2, samples=len(texts)).values(texts)
        parsed = [c for c in case if c]
        if parsed:   # the default: the model's own scores, the unreadable ones left out
            assert mean["helpfulness_1"] == pytest.approx(sum(c[0] for c in parsed)
                                                          / len(parsed))
        else:
            assert mean["helpfulness_1"] is None and v["judge_error"] is not None
    one = JudgeColumns(responses=1, samples=2, votes="nvidia").values(["</think>x", one_text(5)])
    assert one["helpfulness"] == 4.0   # (3.0 fallback + 5) / 2


def one_text(score) -> str:
    return ("<think>hm</think>[The Begin of Individual Scores]\n\\boxed{" + str(score)
            + "}\n[The End of Individual Scores]")


# --- mechanics (stub engine) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def genrm_dir(tmp_path_factory):
    """A model directory with a GenRM chat template (weights unused by the stub engine)."""
    out = tiny_models.build_causal_lm(tmp_path_factory.mktemp("judge") / "Llama-3_3-Nemotron-"
                                      "Super-49B-GenRM")
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = tiny_models.GENRM_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


def answering(answers: dict[str, list[str]]):
    """A stub engine whose judgement for a prompt is the one keyed by a text in the prompt."""
    class Answering(StubEngine):
        def generate(self, requests, sampling, can_feed):
            for key, ids in self._stream(requests, can_feed):
                prompt = self.tokenizer.decode(ids)
                hits = [v for k, v in answers.items() if k in prompt]
                assert len(hits) == 1, prompt
                yield key, hits[0][:sampling.samples]
    return Answering


def one(score) -> str:
    return ("<think>hm</think>[The Begin of Individual Scores]\n\\boxed{" + str(score)
            + "}\n[The End of Individual Scores]")


def test_one_response(stub_cli, engines, genrm_dir, tmp_path):
    rows = sample_rows(4)
    rows[2]["response"] = None
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    engines("vllm", answering({"number 0": [one(4)], "number 1": ["</think>It is fine."],
                               "number 3": ['<think>x</think>{"score_1": 2}']}))
    out = tmp_path / "o.parquet"
    r = stub_cli("judge", path, "-o", out, "--model", genrm_dir, "--max-tokens", "512")
    assert r.exit_code == 0, r.output
    assert "recipe llama-3.3-nemotron-super-49b-genrm" in r.output
    [line] = [x for x in r.output.splitlines() if "rows with no readable judgement" in x]
    assert re.findall(r"\d+", line) == ["1"]
    strict = stub_cli("judge", path, "-o", tmp_path / "s.parquet", "--model", genrm_dir,
                      "--max-tokens", "512", "--strict")
    assert strict.exit_code == 3, strict.output
    t = pq.read_table(out)
    got = t.to_pylist()
    assert [x["helpfulness"] for x in got] == [4.0, None, None, 2.0]
    assert got[1]["judge_error"].startswith("no_scores:") and got[1]["nfb_error"] is None
    assert got[1]["judgement"] == "It is fine."
    assert got[2]["nfb_error"] == "null_field:response" and got[2]["judge_error"] is None
    assert got[0]["judgement"].startswith("[The Begin of Individual Scores]")
    assert [x["id"] for x in got] == [0, 1, 2, 3]
    meta = orjson.loads(t.schema.metadata[b"nfb"])
    assert meta["task"] == "judge"
    assert meta["task_settings"]["recipe"] == "llama-3.3-nemotron-super-49b-genrm"
    assert meta["task_settings"]["card"] == "https://huggingface.co/" + GENRM
    assert meta["task_settings"]["responses"] == {"response_1": "response"}
    assert meta["summary"]["unreadable"] == 1


def test_two_responses_with_votes(stub_cli, engines, genrm_dir, tmp_path):
    rows = [{"prompt": f"Question {i}?", "a": f"Answer A{i}.", "b": f"Answer B{i}."}
            for i in range(3)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    engines("vllm", answering({"A0.": ["</think>none", BOXED_2, JSON_2],
                               "A1.": [JSON_2] * 3,
                               "A2.": ["<think>cut", "<think>cut", "<think>cut"]}))
    out = tmp_path / "o.parquet"
    r = stub_cli("judge", path, "-o", out, "--model", genrm_dir, "--response-field", "a",
                 "--response-field", "b", "--samples", "3", "--max-tokens", "512")
    assert r.exit_code == 0, r.output
    got = pq.read_table(out).to_pylist()
    assert (got[0]["helpfulness_1"], got[0]["helpfulness_2"], got[0]["ranking"]) == \
        (3.5, 2.5, 3.0)
    assert got[0]["judge_votes"] == 2 and got[0]["preferred"] == 1
    assert got[0]["judgement"].startswith("[The Begin of Analysis on Response 1]")
    assert got[1]["ranking"] == 5.0 and got[1]["preferred"] == 2 and got[1]["judge_votes"] == 3
    assert got[2]["ranking"] is None and got[2]["judge_error"].startswith("unfinished_reasoning")
    assert got[2]["judgements"] == ["<think>cut"] * 3


def test_judged_prompt_is_the_models_own_template(genrm_dir):
    """What the model sees: the conversation, then response_1 (and response_2), through the
    model's chat template with a generation prompt."""
    from transformers import AutoTokenizer

    from nfb.config import SamplingConfig
    from nfb.prompts import render
    from nfb.records import Conversation
    from nfb.tasks.judge import JudgeTask

    tok = AutoTokenizer.from_pretrained(genrm_dir)
    conv = Conversation(({"role": "user", "content": "Q?"},), "A1", ("A1", "A2"))
    [prompt] = JudgeTask(SamplingConfig(), fields=("a", "b")).prompts(conv)
    expected = tok.apply_chat_template(
        [{"role": "user", "content": "Q?"}, {"role": "response_1", "content": "A1"},
         {"role": "response_2", "content": "A2"}], add_generation_prompt=True, return_dict=False)
    assert render(tok, [prompt]) == [expected]
    text = tok.decode(expected)
    assert "[The Begin of Response 2]\nA2\n[The End of Response 2]" in text


# --- what does not fit exits 2 before loading -----------------------------------------------

@pytest.fixture
def no_engine(engines):
    def refuse(*_a, **_k):
        raise AssertionError("the engine was started")
    engines("vllm", refuse)


@pytest.fixture(scope="module")
def plain_template_dir(tmp_path_factory):
    out = tiny_models.build_causal_lm(tmp_path_factory.mktemp("judge") / "plain")
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{% if m['role'] in ['user', 'assistant'] %}"
                            "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


@pytest.mark.parametrize("model,args,match", [
    ("genrm", ["--recipe", "qwen3-nemotron-235b-a22b-genrm"], "two responses at once"),
    ("genrm", ["--recipe", "qwen3-nemotron-32b-genrm-principle"], "--principle TEXT"),
    ("genrm", ["--recipe", "qwen3-nemotron-32b-genrm-principle", "--principle", "x"],
     "drops the 'principle' turn"),
    ("genrm", ["--principle", "x"], "for the Principle GenRM"),
    ("genrm", ["--votes", "median"], "--votes 'median'"),
    ("genrm", ["--recipe", "llama-3.3-nemotron-70b-reward"], "nfb score"),
    ("genrm", ["--recipe", "llama-3.3-nemotron-70b-feedback"], "nfb feedback"),
    ("genrm", ["--recipe", "nope"], "unknown"),
    ("genrm", ["--response-field", "a", "--response-field", "b", "--response-field", "c"],
     "one response or two"),
    ("genrm", ["--response-field", "a", "--response-field", "b", "--messages-field", "m"],
     "--messages-field"),
    ("genrm", ["--responses-field", "r"], "No such option"),
    ("genrm", ["--max-tokens", "4096"], "no room for a prompt"),
    ("plain", [], "drops the judged response"),
])
def test_what_does_not_fit_exits_2(stub_cli, no_engine, genrm_dir, plain_template_dir,
                                   tmp_path, model, args, match):
    path = write_jsonl(tmp_path / "in.jsonl", sample_rows(2))
    m = genrm_dir if model == "genrm" else plain_template_dir
    r = stub_cli("judge", path, "-o", tmp_path / "o.parquet", "--model", m, "--max-tokens", "512",
                 *args)
    assert r.exit_code == 2, r.output
    assert match in r.output


def test_other_verbs_send_a_genrm_to_judge(stub_cli, no_engine, genrm_dir, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", sample_rows(2))
    r = stub_cli("score", path, "-o", tmp_path / "o.parquet", "--model", genrm_dir)
    assert r.exit_code == 2 and "nfb judge" in r.output, r.output
    r = stub_cli("feedback", path, "-o", tmp_path / "o.parquet", "--model", GENRM)
    assert r.exit_code == 2 and "nfb judge" in r.output, r.output


# --- truth: real vLLM against transformers --------------------------------------------------

ROWS = sample_rows(6)
SECOND = "No idea."


def _conversations():
    convs = []
    for i, r in enumerate(ROWS):
        ctx = [{"role": "user", "content": r["prompt"]}]
        first = {"role": "response_1", "content": r["response"]}
        convs.append(([*ctx, first], tiny_models.genrm_target([i % 5 + 1], None)))
        convs.append(([*ctx, first, {"role": "response_2", "content": SECOND}],
                      tiny_models.genrm_target([i % 5 + 1, 2], i % 6 + 1)))
    return convs


@pytest.fixture(scope="module")
def trained_genrm(tmp_path_factory):
    return tiny_models.build_genrm(tmp_path_factory.mktemp("judge") / "genrm", _conversations(),
                                   GENRM)


def _transformers_texts(model_dir, conversations, max_new_tokens):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = []
    for messages, _ in conversations:
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                      return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        texts.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


@pytest.mark.slow
def test_judge_equals_transformers(cli, trained_genrm, tmp_path):
    convs = _conversations()
    expected = _transformers_texts(trained_genrm, convs, 120)
    assert expected == [t for _, t in convs]   # the tiny GenRM writes the card's format
    rows = [{**r, "second": SECOND} for r in ROWS]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    greedy = ["--temperature", "0", "--max-tokens", "120", *F32]

    out1 = tmp_path / "one.parquet"
    r = cli("judge", path, "-o", out1, "--model", trained_genrm, *greedy)
    assert r.exit_code == 0, r.output
    got = pq.read_table(out1).to_pylist()
    for i, row in enumerate(got):
        hf = expected[2 * i]
        assert row["judgement"] == hf.split("</think>")[1].strip()
        assert row["helpfulness"] == parse_judgement(hf, 1).helpfulness[0] == i % 5 + 1
        assert row["judge_error"] is None

    out2 = tmp_path / "two.parquet"
    r = cli("judge", path, "-o", out2, "--model", trained_genrm, "--response-field",
            "response", "--response-field", "second", *greedy)
    assert r.exit_code == 0, r.output
    for i, row in enumerate(pq.read_table(out2).to_pylist()):
        j = parse_judgement(expected[2 * i + 1], 2)
        assert (row["helpfulness_1"], row["helpfulness_2"], row["ranking"]) == \
            (*j.helpfulness, j.ranking) == (i % 5 + 1, 2, i % 6 + 1)
        assert row["preferred"] == (1 if i % 6 + 1 <= 3 else 2)

    # cut off while reasoning: a null score and the reason, never a guess
    out3 = tmp_path / "cut.parquet"
    r = cli("judge", path, "-o", out3, "--model", trained_genrm, "--temperature", "0",
            "--max-tokens", "4", *F32)
    assert r.exit_code == 0, r.output
    for row in pq.read_table(out3).to_pylist():
        assert row["helpfulness"] is None and row["nfb_error"] is None
        assert row["judge_error"].startswith("unfinished_reasoning:")


@pytest.mark.slow
def test_recipe_flag_runs_a_model_as_the_pairwise_genrm(cli, trained_genrm, tmp_path):
    """--recipe: the model runs as the 235B recipe says (two responses only; its context
    limit and card in the provenance)."""
    rows = [{**r, "second": SECOND} for r in ROWS[:2]]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "o.parquet"
    r = cli("judge", path, "-o", out, "--model", trained_genrm, "--recipe",
            "nvidia/Qwen3-Nemotron-235B-A22B-GenRM", "--response-field", "response",
            "--response-field", "second", "--temperature", "0", "--max-tokens", "120", *F32)
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    assert [x["ranking"] for x in t.to_pylist()] == [1.0, 2.0]
    meta = orjson.loads(t.schema.metadata[b"nfb"])
    assert meta["task_settings"]["recipe"] == "qwen3-nemotron-235b-a22b-genrm"
    assert meta["task_settings"]["context_limit"] == 131072


def test_shards_merge_and_resume(stub_cli, engines, genrm_dir, tmp_path):
    """Judged shards merge into one output whose summary counts the unreadable judgements; a
    finished command run again does nothing."""
    rows = sample_rows(6)
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    engines("vllm", answering({f"number {i}": [one(i % 5 + 1) if i % 3 else "</think>?"]
                               for i in range(6)}))
    parts = []
    for k in range(2):
        parts.append(tmp_path / f"part{k}.parquet")
        r = stub_cli("judge", path, "-o", parts[-1], "--model", genrm_dir, "--max-tokens",
                     "512", "--shard", f"{k}/2")
        assert r.exit_code == 0, r.output
    again = stub_cli("judge", path, "-o", parts[0], "--model", genrm_dir, "--max-tokens",
                     "512", "--shard", "0/2")
    assert again.exit_code == 0 and "already complete" in again.output
    # killed half way, then resumed: the rows from the checkpoint count in the summary too
    judged = {f"number {i}": [one(i % 5 + 1) if i % 3 else "</think>?"] for i in range(6)}
    engines("vllm", functools.partial(answering(judged), die_after=3))
    whole = tmp_path / "whole.parquet"
    args = ["judge", path, "-o", whole, "--model", genrm_dir, "--max-tokens", "512",
            "--batch-rows", "2", "--max-in-flight", "1", "--checkpoint-every", "0"]
    assert stub_cli(*args).exit_code == 1
    assert list((tmp_path / "whole.parquet.nfb").glob("part-*.parquet"))
    engines("vllm", answering(judged))
    r = stub_cli(*args)
    assert r.exit_code == 0 and "rows from checkpoint" in r.output, r.output
    assert orjson.loads(pq.read_table(whole).schema.metadata[b"nfb"])["summary"][
        "unreadable"] == 2
    merged = tmp_path / "all.parquet"
    r = stub_cli("merge", *parts, "-o", merged)
    assert r.exit_code == 0, r.output
    t = pq.read_table(merged)
    assert t.column("id").to_pylist() == list(range(6))
    assert t.column("helpfulness").to_pylist() == [None, 2.0, 3.0, None, 5.0, 1.0]
    assert orjson.loads(t.schema.metadata[b"nfb"])["summary"]["unreadable"] == 2


def test_history_must_end_with_the_users_request(stub_cli, engines, genrm_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "number 0"}]},
            {"messages": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"},
                          {"role": "assistant", "content": "number 1"}]}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    engines("vllm", answering({"number 0": [one(5)], "number 1": [one(1)]}))
    out = tmp_path / "o.parquet"
    r = stub_cli("judge", path, "-o", out, "--model", genrm_dir, "--max-tokens", "512",
                 "--messages-field", "messages")
    assert r.exit_code == 0, r.output
    got = pq.read_table(out).to_pylist()
    assert got[0]["helpfulness"] == 5.0 and got[0]["nfb_error"] is None
    assert got[1]["nfb_error"].startswith("bad_messages:the turn before the judged response")


def test_template_checked_on_the_engines_tokenizer(stub_cli, engines, plain_template_dir,
                                                  tmp_path, monkeypatch):
    """A hub id's template is only known once the engine has its tokenizer: checked there."""
    import nfb.api

    monkeypatch.setattr(nfb.api, "_check_judge_template", lambda *a: None)
    engines("vllm", answering({}))
    path = write_jsonl(tmp_path / "in.jsonl", sample_rows(2))
    out = tmp_path / "o.parquet"
    r = stub_cli("judge", path, "-o", out, "--model", plain_template_dir, "--max-tokens", "512")
    assert r.exit_code == 2 and "drops the judged response" in r.output, r.output
    assert not out.exists()


# --- the Principle GenRM (nvidia/Qwen3-Nemotron-32B-GenRM-Principle) -------------------------

PRINCIPLE_GENRM = "nvidia/Qwen3-Nemotron-32B-GenRM-Principle"


def card_reward(scores, yes: int, no: int) -> float:
    """The card's Quick Start on one position's scores: clip(s[Yes] - max, -50) -
    clip(s[No] - max, -50) (scores: any sequence of floats, by token id)."""
    best = max(scores)
    return max(scores[yes] - best, -50.0) - max(scores[no] - best, -50.0)


def nemo_rl_reward(text: str, top20: dict[int, float], yes: int, no: int) -> float:
    """NeMo-RL principle_genrm_for_rlhf_environment.py verify_with_principle: 0.0 without
    "Final Judgement:"; logprob(Yes) - logprob(No) at position -2 when both are in its top-20
    dict; 0.0 when either is missing (-inf)."""
    if "Final Judgement:" not in text:
        return 0.0
    y = top20.get(yes, float("-inf"))
    n = top20.get(no, float("-inf"))
    if y == float("-inf") or n == float("-inf"):
        return 0.0
    return y - n


def test_principle_reward_is_the_cards_and_nemo_rls():
    from nfb.config import SamplingConfig
    from nfb.engines.base import Sample
    from nfb.tasks.principle import PrincipleJudgeTask

    yes, no, other = 11, 12, 13
    top = {other: -0.2, yes: -1.9, no: -3.1}
    eos = {0: -0.01}
    cases = [
        Sample("<think>x</think>Final Judgement: Yes", ({}, top, eos)),
        Sample("<think>x</think>Final Judgement: No", ({}, {no: -0.1, other: -2.5}, eos)),
        Sample("<think>x</think>It depends.", ({}, top, eos)),   # no Final Judgement
    ]
    for votes in ("mean", "nvidia"):
        task = PrincipleJudgeTask(SamplingConfig(samples=1, logprobs=20), principle="p",
                                  votes=votes)
        task.ids = (yes, no)
        got = [task.parse([[c]]) for c in cases]
        # both in the top 20: the card's formula (log-probabilities are logits less one
        # constant at a position) and NeMo-RL's difference agree
        logits = [0.0] * 14
        for i, lp in top.items():
            logits[i] = lp + 7.0
        for i in range(14):
            if i not in top:
                logits[i] = -60.0
        assert got[0]["reward"] == pytest.approx(card_reward(logits, yes, no))
        assert got[0]["reward"] == pytest.approx(nemo_rl_reward(cases[0].text, top, yes, no))
        if votes == "nvidia":   # NeMo-RL's 0.0 for a missing token or Final Judgement
            assert got[1]["reward"] == nemo_rl_reward(cases[1].text, cases[1].tail[1], yes, no)
            assert got[2]["reward"] == nemo_rl_reward(cases[2].text, top, yes, no) == 0.0
        else:                   # nfb's default: no made-up reward, the reason instead
            assert got[1]["reward"] is None and got[1]["judge_error"].startswith("not_in_top_20")
            assert got[2]["reward"] is None
            assert got[2]["judge_error"].startswith("no_final_judgement")
    clipped = PrincipleJudgeTask(SamplingConfig(logprobs=20), principle="p")
    clipped.ids = (yes, no)
    far = Sample("Final Judgement: Yes", ({other: -0.01, yes: -70.0, no: -90.0}, eos))
    # both over 50 below the top token: the card clips both to -50
    assert clipped.parse([[far]])["reward"] == 0.0


PRINCIPLES = ("correctness", "brevity")


def _principle_conversations():
    convs = []
    for i, r in enumerate(ROWS[:4]):
        for k, p in enumerate(PRINCIPLES):
            m = [{"role": "user", "content": r["prompt"]},
                 {"role": "assistant", "content": r["response"]},
                 {"role": "principle", "content": p}]
            convs.append((m, tiny_models.principle_target((i + k) % 2 == 0)))
    return convs


@pytest.fixture(scope="module")
def principle_genrm(tmp_path_factory):
    return tiny_models.build_principle_genrm(tmp_path_factory.mktemp("judge") / "pgenrm",
                                             _principle_conversations(), PRINCIPLE_GENRM)


@pytest.mark.slow
def test_principle_genrm_mechanics(stub_cli, engines, principle_genrm, tmp_path):
    """--principle or --principle-field; what the model sees ([conversation, assistant: the
    final answer, principle]); the reasoning of a judged response left out and counted."""
    from transformers import AutoTokenizer

    rows = [{"prompt": "Q?", "response": "<think>draft</think>\n The answer.", "rule": "brevity"},
            {"prompt": "R?", "response": "Plain.", "rule": None}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    seen = []

    class Seeing(StubEngine):
        def generate(self, requests, sampling, can_feed):
            def spy():
                for key, ids in requests:
                    seen.append(self.tokenizer.decode(ids))
                    yield key, ids
            assert sampling.logprobs == 20 and sampling.temperature == 0.0
            assert sampling.max_tokens == 200      # NeMo-RL's defaults
            yield from StubEngine.generate(self, spy(), sampling, can_feed)
    engines("vllm", Seeing)
    out = tmp_path / "o.parquet"
    r = stub_cli("judge", path, "-o", out, "--model", principle_genrm, "--principle-field", "rule")
    assert r.exit_code == 0, r.output
    assert r.output.count("final answer only") == 1
    t = pq.read_table(out)
    got = t.to_pylist()
    assert got[1]["nfb_error"] == "null_field:rule"
    assert isinstance(got[0]["reward"], float) and got[0]["judge_error"] is None
    tok = AutoTokenizer.from_pretrained(principle_genrm)
    assert seen == [tok.apply_chat_template(
        [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "The answer."},
         {"role": "principle", "content": "brevity"}], tokenize=False,
        add_generation_prompt=True)]
    meta = orjson.loads(t.schema.metadata[b"nfb"])
    assert meta["summary"]["notes"] == {"response_reasoning_left_out": 1}
    assert meta["task_settings"]["recipe"] == "qwen3-nemotron-32b-genrm-principle"
    assert meta["task_settings"]["sampling"]["logprobs"] == 20


@pytest.mark.slow
def test_principle_genrm_equals_transformers_generate(cli, principle_genrm, tmp_path):
    """`nfb judge --principle` through vLLM == transformers generate(output_scores=True) with
    the card's formula at scores[-2], on a tiny Qwen3ForCausalLM trained to answer."""
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(principle_genrm)
    model = Qwen3ForCausalLM.from_pretrained(principle_genrm, dtype=torch.float32)
    yes, no = (tok.encode(w, add_special_tokens=False)[0] for w in (" Yes", " No"))
    refs = {}
    for messages, _ in _principle_conversations():
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                      return_tensors="pt")
        with torch.no_grad():
            g = model.generate(**enc, max_new_tokens=200, do_sample=False, output_scores=True,
                               return_dict_in_generate=True)
        text = tok.decode(g.sequences[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        # the card's format, closed by the end of turn (so scores[-2] is the answer)
        assert text.endswith(("Final Judgement: Yes", "Final Judgement: No"))
        assert g.sequences[0, -1] == tok.eos_token_id
        scores = g.scores[-2][0].tolist()
        top20 = set(torch.topk(g.scores[-2][0], 20).indices.tolist())
        assert yes in top20 and no in top20    # the comparison is of the formula, not the 0
        refs[(messages[0]["content"], messages[2]["content"])] = card_reward(scores, yes, no)
    rows = [{"prompt": r["prompt"], "response": r["response"], "p": p}
            for r in ROWS[:4] for p in PRINCIPLES]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "o.parquet"
    r = cli("judge", path, "-o", out, "--model", principle_genrm, "--principle-field", "p", *F32)
    assert r.exit_code == 0, r.output
    got = pq.read_table(out).to_pylist()
    assert {x["reward"] > 0 for x in got} == {True, False}      # Yes and No answers both
    for x in got:
        assert x["judge_error"] is None
        assert x["reward"] == pytest.approx(refs[(x["prompt"], x["p"])], abs=2e-3)
