"""Tiny random Llama models with a Llama-3 style tokenizer and chat template, built offline.

Used by the tests and benchmarks: real vLLM runs on them in seconds on a CPU, so every code
path (chat template, tensor parallel, pooling heads) is exercised without real weights.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<|pad|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] "
    "| trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

_CORPUS = (
    "The response is not helpful. The response is slightly helpful. The response is partially "
    "helpful. The response is mostly helpful. The response is perfectly helpful. "
    "Evaluate the response to the previous prompt in terms of how helpful it is overall. "
    "Write a poem about the sea. Explain photosynthesis to a child. What is the capital of "
    "France? Paris is the capital of France. Plants use sunlight to make sugar from water and "
    "air. The quick brown fox jumps over the lazy dog. 0123456789 user assistant system "
    "Héllo wörld ñ 漢字 😀 — “quotes” "
)


def build_tokenizer(out: Path, corpus: str = _CORPUS, vocab_size: int = 512,
                    chat_template: str = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([corpus] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|pad|>")
    fast.chat_template = chat_template
    fast.save_pretrained(out)
    return fast


def _config(tok, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, torch_dtype="float32",
        **extra)


def build_causal_lm(out: Path, seed: int = 0) -> Path:
    """A random LlamaForCausalLM (feedback model, and the token-logit reward route)."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out)
    tok = build_tokenizer(out)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(tok))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_reward_model(out: Path, num_labels: int = 9, seed: int = 0,
                       id2label: dict[int, str] | None = None) -> Path:
    """A random LlamaForSequenceClassification with `num_labels` regression heads."""
    import torch
    from transformers import LlamaForSequenceClassification

    out = Path(out)
    tok = build_tokenizer(out)
    torch.manual_seed(seed)
    extra = {"num_labels": num_labels, "problem_type": "regression"}
    if id2label:
        extra["id2label"] = id2label
        extra["label2id"] = {v: k for k, v in id2label.items()}
    model = LlamaForSequenceClassification(_config(tok, **extra))
    with torch.no_grad():  # spread the head so the heads differ visibly
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(out, safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    return out


# --- recipes (nfb.models.recipes): tiny models of each recipe's architecture class ----------

# Qwen3's chat template in miniature: the last assistant turn gets a <think></think> block,
# and enable_thinking=False closes an empty one after a generation prompt.
QWEN3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)


def _set_name_or_path(out: Path, name_or_path: str | None) -> None:
    if name_or_path:
        path = out / "config.json"
        cfg = json.loads(path.read_text())
        cfg["_name_or_path"] = name_or_path
        path.write_text(json.dumps(cfg, indent=2))


def build_token_reward_lm(out: Path, name_or_path: str | None = None, seed: int = 3) -> Path:
    """A random LlamaForCausalLM read through one token's logit (Llama-3.x-Nemotron-70B-Reward
    and -Select: token id 0), whose config names the hub model it stands for."""
    out = build_causal_lm(Path(out), seed=seed)
    _set_name_or_path(out, name_or_path)
    return out


def build_principle_lm(out: Path, name_or_path: str | None = None, seed: int = 4) -> Path:
    """A random LlamaForCausalLM whose vocabulary has the tokens "Yes" and "No"
    (Llama-3.3-Nemotron-70B-Reward-Principle reads their logits)."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out)
    tok = build_tokenizer(out)
    tok.add_tokens(["Yes", "No"])
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(tok))
    with torch.no_grad():  # spread the output rows so logit differences are visible
        model.lm_head.weight.normal_(0, 1.0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    _set_name_or_path(out, name_or_path)
    return out


def build_qwen3_reward(out: Path, name_or_path: str | None = None, seed: int = 5) -> Path:
    """A random Qwen3ForSequenceClassification with one head (Qwen-3-Nemotron-32B-Reward's
    class) and a Qwen3-style chat template."""
    import torch
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    out = Path(out)
    tok = build_tokenizer(out)
    tok.chat_template = QWEN3_TEMPLATE
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, torch_dtype="float32",
        num_labels=1, problem_type="regression")
    model = Qwen3ForSequenceClassification(cfg)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(out, safe_serialization=True)
    _set_name_or_path(out, name_or_path)
    return out


# --- GenRM (nfb judge): a tiny generative reward model that writes NVIDIA's score format ----

# A GenRM chat template in miniature: the conversation becomes one user turn that lists the
# context and the judged responses (roles response_1, response_2), as the real GenRM templates
# do (NVIDIA's GenRM prompt: "#### Conversation Context ####", "[The Begin of Response i]").
GENRM_TEMPLATE = (
    "{{ bos_token }}<|start_header_id|>user<|end_header_id|>\n\n"
    "Judge the responses: helpfulness 1-5 each; ranking 1-6 for two.\n"
    "#### Conversation Context ####\n"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + '\n' }}{% endif %}"
    "{% endfor %}#### Responses to be Scored ####\n"
    "{% for m in messages %}{% if m['role'].startswith('response_') %}"
    "{{ '[The Begin of Response ' + m['role'][9:] + ']\n' + m['content'] + '\n[The End of "
    "Response ' + m['role'][9:] + ']\n' }}{% endif %}{% endfor %}<|eot_id|>"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

_GENRM_CORPUS = (
    "<think>\nThe first response is fine.\n</think>\n[The Begin of Individual Scores]\n"
    "\\boxed{4, 2}\n[The End of Individual Scores]\n[The Begin of Ranking Score]\n\\boxed{2}\n"
    "[The End of Ranking Score]\n#### Conversation Context ####\n#### Responses to be Scored "
    "####\n[The Begin of Response 1]\n[The End of Response 1]\n"
)


def genrm_target(scores: list[int], ranking: int | None) -> str:
    """What the tiny GenRM learns to write: a short reasoning, then the boxed blocks."""
    text = ("<think>\nThe first response is fine.\n</think>\n[The Begin of Individual Scores]\n"
            f"\\boxed{{{', '.join(map(str, scores))}}}\n[The End of Individual Scores]")
    if ranking is not None:
        text += f"\n[The Begin of Ranking Score]\n\\boxed{{{ranking}}}\n[The End of Ranking Score]"
    return text


def build_genrm(out: Path, conversations: list[tuple[list[dict], str]],
                name_or_path: str | None = None, seed: int = 6, steps: int = 400) -> Path:
    """A tiny LlamaForCausalLM with a GenRM chat template, trained for a few seconds until
    greedy decoding writes each given judgement after each given conversation (messages with
    roles user/assistant/response_1/response_2; the target text). Real vLLM then produces
    parseable judgements, so `nfb judge` is checked end to end against transformers."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out)
    tok = build_tokenizer(out, _CORPUS + _GENRM_CORPUS, 640, GENRM_TEMPLATE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(tok))
    _train(model, tok, conversations, steps)
    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    _set_name_or_path(out, name_or_path)
    return out


def _train(model, tok, conversations: list[tuple[list[dict], str]], steps: int,
           stop_loss: float = 2e-3) -> None:
    """Teach `model` to write each target after its chat-templated conversation (greedy)."""
    import torch

    seqs = []
    for messages, target in conversations:
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        t_ids = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append((p_ids, t_ids))
    width = max(len(p) + len(t) for p, t in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, t) in enumerate(seqs):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t)
        labels[i, len(p):n] = torch.tensor(t)
        mask[i, :n] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < stop_loss:
            break
    model.eval()


# --- the Principle GenRM (nfb judge --principle): Qwen3, "Final Judgement: Yes/No" ----------

_PRINCIPLE_CORPUS = (
    "<think>\nThe response is fine.\n</think>\nFinal Judgement: Yes <think>\nThe response "
    "is wrong.\n</think>\nFinal Judgement: No principle correctness brevity Yes No "
)


def principle_target(yes: bool) -> str:
    """What the tiny Principle GenRM learns to write: a short reasoning, then its answer."""
    return ("<think>\nThe response is fine.\n</think>\nFinal Judgement: Yes" if yes else
            "<think>\nThe response is wrong.\n</think>\nFinal Judgement: No")


def build_principle_genrm(out: Path, conversations: list[tuple[list[dict], str]],
                          name_or_path: str | None = None, seed: int = 7, steps: int = 300
                          ) -> Path:
    """A tiny Qwen3ForCausalLM (Qwen3-Nemotron-32B-GenRM-Principle's class) whose chat
    template renders the role `principle`, trained until greedy decoding writes each target
    (then the end of turn) after each conversation [user, assistant, principle]."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(out)
    tok = build_tokenizer(out, _CORPUS + _PRINCIPLE_CORPUS * 4, 640)
    assert all(len(tok.encode(w, add_special_tokens=False)) == 1 for w in (" Yes", " No"))
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, torch_dtype="float32")
    model = Qwen3ForCausalLM(cfg)
    _train(model, tok, conversations, steps, stop_loss=5e-3)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    _set_name_or_path(out, name_or_path)
    return out
