"""NeMo-Aligner's SteerLM text format: what a SteerLM reward model (Llama3-70B-SteerLM-RM) sees.

Source: NVIDIA/NeMo-Aligner `examples/nlp/data/steerlm/common.py` (the templates and attribute
names below, verbatim) and `examples/nlp/data/steerlm/attribute_annotate.py` (how a
conversation is rendered for the reward-model server), checked at commit af2b3bd96ad7 (2025-05-16):

    text = SYSTEM_PROMPT_TEMPLATE.format(value=SYSTEM_PROMPT)
    for turn in obj["conversations"]:
        text += USER_TURN_TEMPLATE / ASSISTANT_TURN_TEMPLATE .format(value=turn["value"])
        if the turn is labelled: sample = text + LABEL_PREFIX

The string is sent as is: no BOS or EOS is added, and `<extra_id_N>` are plain text for a Llama 3
tokenizer (they are not among its special tokens), so it is tokenized with
`add_special_tokens=False`. The model reads its heads at the last token (the `<extra_id_2>`
pieces), after the final norm (NeMo-Aligner `nemo_aligner/models/nlp/gpt/gpt_reward_model.py`,
`RewardModelHead._compute_attributes`, `output_sequence=False`).

`attribute_annotate.py` clips each head to [0, 4] and rounds it for its own labels; nfb keeps
the raw values (ranking and filtering need them).

The system prompt is always NeMo-Aligner's: `attribute_annotate.py` and
`examples/nlp/data/steerlm/process_to_regression_format.py` both render
`SYSTEM_PROMPT_TEMPLATE.format(value=SYSTEM_PROMPT)` whatever the data holds, and the
HelpSteer2 rows the SteerLM reward models were trained on all carry that prompt. A leading
`system` turn in the data is therefore left out (`has_system_turn` tells the caller, which
counts and reports it), never put in place of SYSTEM_PROMPT.
"""

from __future__ import annotations

# --- verbatim from NeMo-Aligner examples/nlp/data/steerlm/common.py ---
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SYSTEM_PROMPT_TEMPLATE = "<extra_id_0>System\n{value}\n"
USER_TURN_TEMPLATE = "<extra_id_1>User\n{value}\n"
ASSISTANT_TURN_TEMPLATE = "<extra_id_1>Assistant\n{value}\n"
LABEL_PREFIX = "<extra_id_2>"
OPEN_ASSISTANT_ATTRIBUTES = ("quality", "toxicity", "humor", "creativity")
HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
ALL_STEERLM_ATTRIBUTES = OPEN_ASSISTANT_ATTRIBUTES + HELPSTEER_ATTRIBUTES
# --- end of verbatim constants ---

# the heads of a SteerLM reward model, in its checkpoints' order: defined here only
STEERLM_ATTRIBUTES = ALL_STEERLM_ATTRIBUTES


def has_system_turn(messages: list[dict]) -> bool:
    """Whether the conversation opens with a `system` turn (which SteerLM leaves out)."""
    return bool(messages) and messages[0].get("role") == "system"


def steerlm_prompt(messages: list[dict]) -> str:
    """The SteerLM text for a conversation whose last turn is the assistant response judged.

    `messages` are `{"role", "content"}` dicts: an optional leading `system` turn (left out:
    the text always opens with NeMo-Aligner's SYSTEM_PROMPT, see the module), then `user` and
    `assistant` turns. Earlier assistant turns are rendered plainly; only the last one is
    followed by `<extra_id_2>`. No BOS/EOS: tokenize with add_special_tokens=False.
    """
    if not messages:
        raise ValueError("steerlm_prompt: no messages")
    turns = list(messages)
    system = SYSTEM_PROMPT
    if has_system_turn(turns):
        turns = turns[1:]
    if not turns or turns[-1].get("role") != "assistant":
        raise ValueError("steerlm_prompt: the last turn must be the assistant response judged")
    parts = [SYSTEM_PROMPT_TEMPLATE.format(value=system)]
    for i, turn in enumerate(turns):
        role, content = turn.get("role"), turn.get("content")
        if role == "user":
            parts.append(USER_TURN_TEMPLATE.format(value=content))
        elif role == "assistant":
            parts.append(ASSISTANT_TURN_TEMPLATE.format(value=content))
        else:
            raise ValueError(f"steerlm_prompt: turn {i} has role {role!r} "
                             "(SteerLM knows system, user, assistant)")
    parts.append(LABEL_PREFIX)
    return "".join(parts)
