import pytest

from nfb.records import Conversation
from nfb.tasks.feedback import (
    EVAL_PROMPT,
    FeedbackColumns,
    eval_messages,
    feedback_values,
    label_of,
    parse_level,
)


@pytest.mark.parametrize("word,level", [("not", 1), ("slightly", 2), ("partially", 3),
                                        ("mostly", 4), ("perfectly", 5)])
def test_each_level(word, level):
    assert parse_level(f"The response is {word} helpful. It explains the topic.") == level
    assert label_of(level) == word


@pytest.mark.parametrize("text,level", [
    ("the response is MOSTLY helpful", 4),
    ("THE RESPONSE IS NOT HELPFUL!", 1),
    ("**The response is perfectly helpful.** Great.", 5),
    ("  \n> The response is  partially\nhelpful; it misses a step.", 3),
    ('"The response is slightly helpful," because...', 2),
    ("- The response is mostly helpful: clear.", 4),
])
def test_case_whitespace_and_punctuation(text, level):
    assert parse_level(text) == level


@pytest.mark.parametrize("text", [
    None, "", "Great answer.", "The response is helpful.", "The response is very helpful.",
    "The response is not perfectly helpful.",   # no level word right before "helpful"
    "The response is mostlyhelpful",
])
def test_no_level(text):
    assert parse_level(text) is None
    assert label_of(parse_level(text)) is None


def test_leading_statement_wins_over_later_mentions():
    text = ("The response is mostly helpful. It is not perfect: the response is partially "
            "helpful at best.")
    assert parse_level(text) == 4


def test_two_levels_without_a_leading_statement_is_ambiguous():
    text = "Hmm. The response is mostly helpful, or maybe the response is slightly helpful."
    assert parse_level(text) is None


def test_agreeing_statements_later_in_the_text_count():
    text = "Overall: the response is partially helpful. Again, the response is partially helpful."
    assert parse_level(text) == 3


def test_eval_prompt_is_the_model_card_text():
    assert EVAL_PROMPT == (
        "Evaluate the response to the previous prompt in terms of how helpful it is overall. "
        "Start the evaluation with the statement - The response is {not / slightly / partially "
        "/ mostly / perfectly} helpful. Then provide a brief explanation of the evaluation in 2 "
        "to 10 sentences.")


def test_eval_messages_shape():
    conv = Conversation(({"role": "system", "content": "s"}, {"role": "user", "content": "p"}), "r")
    msgs = eval_messages(conv)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"] == "r" and msgs[3]["content"] == EVAL_PROMPT


def test_sample_aggregation():
    texts = ["The response is mostly helpful.", "The response is perfectly helpful.", "no level"]
    v = feedback_values(texts, 3)
    assert v["feedback"] == texts[0] and v["feedback_level"] == 4
    assert v["feedback_label"] == "mostly"
    assert v["feedback_levels"] == [4, 5, None]
    assert v["feedback_level_mean"] == 4.5
    assert feedback_values(["x", "y"], 2)["feedback_level_mean"] is None
    assert set(feedback_values(None, 3)) == set(FeedbackColumns(3).schema().names)
    assert FeedbackColumns(1).schema("p_").names == ["p_feedback", "p_feedback_level",
                                                     "p_feedback_label"]
