"""Input row -> Conversation, with field mapping and row-level validation errors.

A row is a dict (JSONL) or one row of an Arrow table (Parquet). Validation never raises:
a row that cannot become a conversation yields an error code that ends in `nfb_error`.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """The context (earlier turns) and the assistant response being judged or scored."""

    context: tuple[dict[str, str], ...]
    response: str
    # several responses to the same context (--response-field a --response-field b, or
    # --responses-field): each is judged or scored on its own; `response` is the first
    alternatives: tuple[str, ...] = ()

    def messages(self) -> list[dict[str, str]]:
        return [*self.context, {"role": "assistant", "content": self.response}]

    def with_response(self, response: str) -> Conversation:
        return Conversation(self.context, response)


@dataclass(frozen=True)
class FieldMap:
    """Which input fields hold the conversation."""

    prompt: str = "prompt"
    response: str = "response"
    messages: str | None = None
    responses: tuple[str, ...] = ()        # several named response fields (2 or more)
    responses_list: str | None = None      # one field holding a list of responses

    @property
    def needed(self) -> tuple[str, ...]:
        if self.messages:
            return (self.messages,)
        if self.responses_list:
            return (self.prompt, self.responses_list)
        if self.responses:
            return (self.prompt, *self.responses)
        return (self.prompt, self.response)


_MISSING = object()


def _absent(row_value: object, name: str) -> str | None:
    """The error code of a field that is missing or null, else None."""
    if row_value is _MISSING:
        return f"missing_field:{name}"
    if row_value is None:
        return f"null_field:{name}"
    return None


def _text(row_value: object, name: str) -> tuple[str | None, str | None]:
    """(value, None) for a usable string field, else (None, error code)."""
    err = _absent(row_value, name)
    if err:
        return None, err
    if not isinstance(row_value, str):
        return None, f"bad_type:{name}"
    if not row_value.strip():
        return None, f"empty_field:{name}"
    return row_value, None


def field_error(row: dict, name: str) -> str | None:
    """Why row[name] is not a usable string (missing, null, not a string, blank), or None."""
    return _text(row.get(name, _MISSING), name)[1]


def _from_messages(value: object, name: str) -> tuple[Conversation | None, str | None]:
    err = _absent(value, name)
    if err:
        return None, err
    if not isinstance(value, (list, tuple)):
        return None, f"bad_messages:{name} is not a list"
    if not value:
        return None, f"bad_messages:{name} is empty"
    turns: list[dict[str, str]] = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return None, f"bad_messages:turn {i} is not an object"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return None, f"bad_messages:turn {i} has role {role!r}"
        if not isinstance(content, str):
            return None, f"bad_messages:turn {i} content is not a string"
        if role == "system" and i != 0:
            return None, f"bad_messages:turn {i} is a system turn after the start"
        turns.append({"role": role, "content": content})
    if turns[-1]["role"] != "assistant":
        return None, "bad_messages:last turn is not from the assistant"
    if not turns[-1]["content"].strip():
        return None, "bad_messages:last assistant turn is empty"
    if not any(t["role"] == "user" for t in turns[:-1]):
        return None, "bad_messages:no user turn before the response"
    return Conversation(tuple(turns[:-1]), turns[-1]["content"]), None


def to_conversation(row: dict, fields: FieldMap) -> tuple[Conversation | None, str | None]:
    """Map one input row to a Conversation, or return (None, error code)."""
    if not isinstance(row, dict):
        return None, "not_an_object"
    if fields.messages:
        return _from_messages(row.get(fields.messages, _MISSING), fields.messages)
    prompt, err = _text(row.get(fields.prompt, _MISSING), fields.prompt)
    if err:
        return None, err
    context = ({"role": "user", "content": prompt},)
    if fields.responses_list:
        name = fields.responses_list
        value = row.get(name, _MISSING)
        err = _absent(value, name)
        if err:
            return None, err
        if not isinstance(value, (list, tuple)):
            return None, f"bad_type:{name}"
        if not value:
            return None, f"empty_field:{name}"
        for i, v in enumerate(value):
            _, err = _text(v, f"{name}[{i}]")
            if err:
                return None, err
        return Conversation(context, value[0], tuple(value)), None
    if fields.responses:
        values = []
        for name in fields.responses:
            v, err = _text(row.get(name, _MISSING), name)
            if err:
                return None, err
            values.append(v)
        return Conversation(context, values[0], tuple(values)), None
    response, err = _text(row.get(fields.response, _MISSING), fields.response)
    if err:
        return None, err
    return Conversation(context, response), None
