"""--too-long error|drop-context|truncate on the stub engine (a real tokenizer and chat
template; the stub's output is a hash of the exact token ids it gets), and the character
bound that refuses a row before rendering it.

The reference for a shortened row is built here by hand with transformers (the chat template
rendered, then tokenized through the tokenizer's own call), never with nfb's code: the row
scored by nfb must get the output of the hand-shortened row."""

import math

import orjson
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl
from stub_engine import stub_heads, stub_text

import nfb
from nfb.errors import NfbError
from nfb.tasks.feedback import EVAL_PROMPT

WORDS = ("sea", "photosynthesis", "Paris", "fox", "numbers", "sun", "rain", "capital", "plants",
         "quick", "brown", "lazy", "dog", "water", "air", "sugar", "France", "poem")


def text(n: int, seed: int = 0) -> str:
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    import tiny_models
    return tiny_models.build_reward_model(tmp_path_factory.mktemp("rm") / "rm1", 1)


@pytest.fixture(scope="module")
def tok(rm):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(rm)


def ids_of(tok, messages, generation=False) -> list[int]:
    s = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    return tok(s, add_special_tokens=False)["input_ids"]


def read(out):
    return pq.read_table(out).to_pylist()


def history_row():
    return [{"role": "system", "content": "You are brief."},
            {"role": "user", "content": text(30, 1)},
            {"role": "assistant", "content": text(30, 2)},
            {"role": "user", "content": text(30, 3)},
            {"role": "assistant", "content": text(30, 4)},
            {"role": "user", "content": text(30, 5)},
            {"role": "assistant", "content": text(30, 6)},
            {"role": "user", "content": "And the final question about the sea?"},
            {"role": "assistant", "content": "The sea is large and blue."}]


@pytest.mark.parametrize("verb", ["score", "feedback"])
def test_drop_context_drops_the_oldest_exchanges_until_the_row_fits(stub_cli, rm, tok,
                                                                    tmp_path, verb):
    msgs = history_row()
    short = [{"role": "user", "content": "Tell me about the sun."},
             {"role": "assistant", "content": "It is a star."}]
    src = write_jsonl(tmp_path / "in.jsonl", [{"messages": msgs}, {"messages": short}])

    def seen(m):   # what the model sees for a conversation m
        if verb == "score":
            return ids_of(tok, m)
        return ids_of(tok, [*m, {"role": "user", "content": EVAL_PROMPT}], generation=True)

    # by hand: the system turn, then the history without its 2 oldest exchanges
    hand = [msgs[0], *msgs[5:]]
    budget = len(seen(hand)) + 1
    assert len(seen([msgs[0], *msgs[3:]])) > budget     # one exchange fewer does not fit
    out = tmp_path / "o.parquet"
    kw = dict(model=rm, messages_field="messages", too_long="drop-context")
    if verb == "score":
        result = nfb.score(src, out, max_model_len=budget, **kw)
    else:
        result = nfb.feedback(src, out, max_model_len=budget + 8, max_tokens=8,
                              temperature=0, **kw)
    rows = read(out)
    assert [r["nfb_error"] for r in rows] == [None, None]
    assert rows[0]["nfb_truncated"] == len(seen(msgs)) - len(seen(hand))
    assert rows[1]["nfb_truncated"] is None            # fitted as it was
    if verb == "score":
        assert rows[0]["reward"] == stub_heads(seen(hand), 1)[0]
        assert rows[1]["reward"] == stub_heads(seen(short), 1)[0]
    else:
        assert rows[0]["feedback"] == stub_text(seen(hand))
    assert result.truncated == 1
    meta = orjson.loads(pq.read_schema(out).metadata[b"nfb"])
    assert meta["summary"]["truncated"] == 1 and meta["too_long"] == "drop-context"


def test_drop_context_without_history_is_an_error_row(stub_cli, rm, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": text(200), "response": "ok"},
                                              {"prompt": "hi", "response": "hello"}])
    out = tmp_path / "o.parquet"
    nfb.score(src, out, model=rm, max_model_len=64, too_long="drop-context")
    rows = read(out)
    assert rows[0]["nfb_error"].startswith("prompt_too_long:")
    assert "no earlier turn left" in rows[0]["nfb_error"]
    assert rows[0]["nfb_truncated"] is None and rows[1]["nfb_error"] is None


def middle_cut(tok, prompt: str, removed: int) -> str:
    """The prompt without `removed` tokens from its middle (first half kept, then the last)."""
    spans = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    keep = len(spans) - removed
    left, right = math.ceil(keep / 2), keep // 2
    return prompt[:spans[left - 1][1]] + prompt[spans[len(spans) - right][0]:]


def test_truncate_cuts_the_final_prompt_in_its_middle_never_the_response(stub_cli, rm, tok,
                                                                         tmp_path):
    prompt, response = text(120, 3), "The answer is a fox, a dog and the sea."
    history = [{"role": "user", "content": text(20, 8)},
               {"role": "assistant", "content": text(20, 9)}]
    rows = [{"messages": [*history, {"role": "user", "content": prompt},
                          {"role": "assistant", "content": response}]},
            # the response alone is over the budget: still an error row
            {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": text(300)}]}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    full = ids_of(tok, rows[0]["messages"])
    budget = 100
    # by hand: the history goes, then the fewest tokens from the prompt's middle
    removed = next(r for r in range(1, 200)
                   if len(ids_of(tok, [{"role": "user", "content": middle_cut(tok, prompt, r)},
                                       {"role": "assistant", "content": response}])) <= budget)
    hand = [{"role": "user", "content": middle_cut(tok, prompt, removed)},
            {"role": "assistant", "content": response}]
    out = tmp_path / "o.parquet"
    result = nfb.score(src, out, model=rm, max_model_len=budget, too_long="truncate",
                       messages_field="messages")
    got = read(out)
    assert got[0]["nfb_error"] is None
    assert got[0]["reward"] == stub_heads(ids_of(tok, hand), 1)[0]
    assert got[0]["nfb_truncated"] == len(full) - len(ids_of(tok, hand))
    assert got[1]["nfb_error"].startswith("prompt_too_long:") and got[1]["nfb_truncated"] is None
    assert result.truncated == 1 and result.errors == {"prompt_too_long": 1}
    # the prompt's start and end are both kept
    kept = hand[0]["content"]
    assert kept.startswith(prompt[:30]) and kept.endswith(prompt[-30:])


def test_truncate_a_row_over_the_character_bound(stub_cli, rm, tok, tmp_path):
    """A prompt far over the budget (more characters than any tokenization of the budget
    covers) is cut by characters first, then by tokens; what nfb_truncated reports is close
    to the tokens really removed (the part cut before tokenizing is counted on its own)."""
    prompt = text(3000, 5)
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": prompt, "response": "fine"}])
    full = len(ids_of(tok, [{"role": "user", "content": prompt},
                            {"role": "assistant", "content": "fine"}]))
    out = tmp_path / "o.parquet"
    nfb.score(src, out, model=rm, max_model_len=64, too_long="truncate")
    row = read(out)[0]
    assert row["nfb_error"] is None and row["reward"] is not None
    assert full - 64 <= row["nfb_truncated"] <= full - 64 + 12


def test_error_policy_refuses_before_rendering_and_adds_no_column(stub_cli, rm, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": text(3000), "response": "x"},
                                              {"prompt": text(40), "response": "x"},
                                              {"prompt": "hi", "response": "x"}])
    out = tmp_path / "o.parquet"
    result = nfb.score(src, out, model=rm, max_model_len=32)
    rows = read(out)
    assert "nfb_truncated" not in rows[0]
    # over the character bound: refused on its characters, never tokenized
    assert rows[0]["nfb_error"].startswith("prompt_too_long:")
    assert "characters" in rows[0]["nfb_error"] and rows[0]["nfb_error"].endswith("> 32")
    # under it: refused on its exact token count
    assert rows[1]["nfb_error"].startswith("prompt_too_long:")
    assert "tokens > 32" in rows[1]["nfb_error"] and "characters" not in rows[1]["nfb_error"]
    assert rows[2]["nfb_error"] is None
    assert result.truncated is None and "truncated" not in result.summary()


def test_the_policy_is_part_of_the_fingerprint(stub_cli, rm, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": text(40), "response": "x"}])
    out = tmp_path / "o.parquet"
    nfb.score(src, out, model=rm, max_model_len=32)
    again = nfb.score(src, out, model=rm, max_model_len=32)
    assert again.already_done
    with pytest.raises(NfbError, match="not written by this command"):
        nfb.score(src, out, model=rm, max_model_len=32, too_long="truncate")


def test_bad_policy_is_a_usage_error(stub_cli, rm, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi", "response": "x"}])
    r = stub_cli("score", src, "-o", tmp_path / "o.parquet", "--model", rm,
                 "--too-long", "shorten")
    assert r.exit_code == 2 and "--too-long 'shorten'" in r.output


# --- real vLLM: a shortened row scores as the same row shortened by hand ---------------------

F32 = ["--dtype", "float32"]   # test_cli_score's engine settings: the same shared engine


@pytest.mark.slow
def test_truncated_rows_score_as_rows_shortened_by_hand_on_vllm(cli, models, tmp_path):
    """The tiny reward model's own context (4,096 tokens) is the budget, so the engine is the
    one test_cli_score starts. Row 0: a prompt over the context (cut in its middle); row 1:
    a long history (its oldest exchanges dropped); row 2 fits as it is."""
    from transformers import AutoTokenizer

    rm = models["rm1"]
    tok = AutoTokenizer.from_pretrained(rm)
    budget = 4096
    response = "The answer is a fox, a dog and the sea."
    prompt = text(4500, 2)
    long_prompt = [{"role": "user", "content": prompt},
                   {"role": "assistant", "content": response}]
    history = []
    for i in range(4):
        history += [{"role": "user", "content": text(700, 2 * i)},
                    {"role": "assistant", "content": text(700, 2 * i + 1)}]
    final = [{"role": "user", "content": "So which of them is the best?"},
             {"role": "assistant", "content": response}]
    fits = [{"role": "user", "content": "Tell me about the sun."},
            {"role": "assistant", "content": "It is a star."}]
    rows = [{"messages": long_prompt}, {"messages": [*history, *final]}, {"messages": fits}]
    # by hand, with transformers: the fewest tokens cut from the prompt's middle, and the
    # fewest oldest exchanges dropped, that fit
    over = len(ids_of(tok, long_prompt)) - budget
    assert over > 0
    removed = next(r for r in range(max(1, over - 10), over + 50)
                   if len(ids_of(tok, [{"role": "user", "content": middle_cut(tok, prompt, r)},
                                       long_prompt[1]])) <= budget)
    hand0 = [{"role": "user", "content": middle_cut(tok, prompt, removed)}, long_prompt[1]]
    drop = next(k for k in range(1, 5) if len(ids_of(tok, [*history[2 * k:], *final])) <= budget)
    assert 0 < drop < 4             # some, not all, of the history goes
    hand1 = [*history[2 * drop:], *final]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "o.parquet"
    r = cli("score", src, "-o", out, "--model", rm, "--messages-field", "messages",
            "--too-long", "truncate", *F32)
    assert r.exit_code == 0, r.output
    got = read(out)
    assert [g["nfb_error"] for g in got] == [None, None, None]
    assert got[0]["nfb_truncated"] == len(ids_of(tok, long_prompt)) - len(ids_of(tok, hand0))
    assert got[1]["nfb_truncated"] == (len(ids_of(tok, [*history, *final]))
                                       - len(ids_of(tok, hand1)))
    assert got[2]["nfb_truncated"] is None
    hand = write_jsonl(tmp_path / "hand.jsonl", [{"messages": hand0}, {"messages": hand1},
                                                 {"messages": fits}])
    ref = tmp_path / "ref.parquet"
    r = cli("score", hand, "-o", ref, "--model", rm, "--messages-field", "messages", *F32)
    assert r.exit_code == 0, r.output
    want = read(ref)
    assert all(w["nfb_error"] is None for w in want)
    for g, w in zip(got, want):
        assert g["reward"] == pytest.approx(w["reward"], abs=1e-5)
    # and the default policy: the same long rows are error rows
    r = cli("score", src, "-o", tmp_path / "e.parquet", "--model", rm, "--messages-field",
            "messages", *F32)
    errs = [g["nfb_error"] for g in read(tmp_path / "e.parquet")]
    assert errs[0].startswith("prompt_too_long:") and errs[1].startswith("prompt_too_long:")
    assert errs[2] is None


# --- the character bound (pure) ---------------------------------------------------------------

def test_the_character_bound_never_refuses_a_row_that_fits(tok):
    """Soundness: no text has more characters than (tokens x the bound per token), for
    texts built to pack many characters into few tokens (the longest entries, special
    tokens, multi-byte characters, whitespace)."""
    import random

    from nfb.run.fit import chars_per_token
    per = chars_per_token(tok)
    vocab = sorted(tok.get_vocab(), key=len)
    assert per == len(vocab[-1]) == len("<|start_header_id|>")
    rng = random.Random(0)
    pieces = ["<|start_header_id|>", "<|eot_id|>", " photosynthesis", "漢字", "😀", "\n\n",
              "  ", "é", "Paris", "0123456789", " the"]
    for _ in range(300):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 60)))
        n = len(tok(s, add_special_tokens=False)["input_ids"])
        assert len(s) <= per * n


def test_normalizers_the_bound_knows():
    from nfb.run.fit import _normalizer_factor
    assert _normalizer_factor(None) == 1
    assert _normalizer_factor({"type": "NFC"}) == 4                 # Qwen's tokenizers
    assert _normalizer_factor({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}) == 1   # Llama 2
    # one that may remove characters outright: no bound (rows always rendered)
    assert _normalizer_factor({"type": "BertNormalizer", "strip_accents": True}) is None
    assert _normalizer_factor({"type": "Replace", "pattern": {"Regex": r"\s+"},
                               "content": " "}) is None
