import pytest

from nfb.records import FieldMap, to_conversation

PR = FieldMap()


def test_prompt_response():
    conv, err = to_conversation({"prompt": "hi", "response": "hello"}, PR)
    assert err is None
    assert conv.messages() == [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "hello"}]


def test_custom_fields():
    conv, err = to_conversation({"q": "hi", "a": "yo"}, FieldMap("q", "a"))
    assert err is None and conv.response == "yo"


@pytest.mark.parametrize("row,code", [
    ({"response": "r"}, "missing_field:prompt"),
    ({"prompt": "p"}, "missing_field:response"),
    ({"prompt": None, "response": "r"}, "null_field:prompt"),
    ({"prompt": "p", "response": 3}, "bad_type:response"),
    ({"prompt": ["p"], "response": "r"}, "bad_type:prompt"),
    ({"prompt": "  ", "response": "r"}, "empty_field:prompt"),
    ({"prompt": "p", "response": ""}, "empty_field:response"),
])
def test_field_errors(row, code):
    conv, err = to_conversation(row, PR)
    assert conv is None and err == code


def test_messages_last_assistant_is_response():
    msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"}]
    conv, err = to_conversation({"messages": msgs}, FieldMap(messages="messages"))
    assert err is None
    assert conv.response == "d"
    assert [m["content"] for m in conv.context] == ["be nice", "a", "b", "c"]


@pytest.mark.parametrize("value,prefix", [
    ("text", "bad_messages:messages is not a list"),
    ([], "bad_messages:messages is empty"),
    ([1], "bad_messages:turn 0 is not an object"),
    ([{"role": "bot", "content": "x"}], "bad_messages:turn 0 has role"),
    ([{"role": "user", "content": 5}], "bad_messages:turn 0 content"),
    ([{"role": "user", "content": "a"}], "bad_messages:last turn is not from the assistant"),
    ([{"role": "assistant", "content": "a"}], "bad_messages:no user turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
      {"role": "assistant", "content": "b"}], "bad_messages:turn 1 is a system turn"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}],
     "bad_messages:last assistant turn is empty"),
    (None, "null_field:messages"),
])
def test_bad_messages(value, prefix):
    conv, err = to_conversation({"messages": value}, FieldMap(messages="messages"))
    assert conv is None and err.startswith(prefix)


def test_missing_messages_field():
    assert to_conversation({}, FieldMap(messages="conv"))[1] == "missing_field:conv"


def test_not_an_object():
    assert to_conversation([1, 2], PR)[1] == "not_an_object"
