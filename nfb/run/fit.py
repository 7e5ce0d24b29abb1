"""Rows too long for the model: a character bound checked before any templating, and the
`--too-long` policies (`error`, `drop-context`, `truncate`).

**The character bound.** No token of a tokenizer covers more characters than its longest
vocabulary entry (byte-level BPE: an entry is one character per byte, so at least as long as
the text it covers; SentencePiece/Metaspace: one character per character, byte-fallback
entries `<0xNN>` longer than their one byte; added tokens such as `<|eot_id|>` are in the
vocabulary too). So a prompt of C characters has at least C / L tokens, L being that length
(WordPiece: at least `max_input_chars_per_word`, the most one `[UNK]` covers; a normalizer
that may merge characters, NFC/NFKC, multiplies L by 4, the most characters Unicode composes
into one). nfb counts only characters the template certainly renders: each turn's content
without surrounding whitespace (templates often `trim` it), and of an assistant turn only the
text after its last `</think>` (templates such as Qwen3's leave earlier reasoning out). A row
with more than `budget x L` such characters cannot fit, whatever the template adds: it is
refused (or shortened) without being rendered or tokenized, so a huge row costs memory in
proportion to the budget, not to its size. A row under the bound is rendered and its exact
token count decides. A tokenizer with a normalizer nfb cannot bound (e.g. one that strips
accents) gets no character bound: its rows are always rendered.

**The policies** (what a row over the token budget becomes):

- `error` (default): an error row `prompt_too_long`.
- `drop-context`: the oldest turns before the final prompt (the last user turn) are dropped,
  a whole exchange at a time (the history left always starts at a user turn), until the row
  fits; a leading system turn is kept (it is an instruction, not history). If the row does not
  fit with no earlier turn left, an error row.
- `truncate`: as `drop-context`; if the row still does not fit, the final prompt's text is cut
  by tokens **in its middle** (its first and last halves kept): a long prompt usually states
  its task at the start and asks its question at the end, which a cut from either end would
  lose (LongBench truncates the middle for the same reason). The judged response is never
  cut: when the row does not fit even with nothing of the prompt's text left, an error row.

A shortened row records in `nfb_truncated` how many prompt tokens were removed (its longest
request's tokens before, minus after); a row over the character bound was never tokenized
whole, so the text removed before its first rendering is counted by tokenizing that text on
its own (in pieces of 256 Ki characters; the markup of dropped turns not counted).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from nfb.prompts import Prompt, render
from nfb.records import Conversation

POLICIES = ("error", "drop-context", "truncate")
_PIECE = 1 << 18          # characters tokenized at once when counting removed text
_MERGING = {"NFC": 4, "NFKC": 4}        # normalizers that may merge characters: factor
_KEEPING = {"NFD", "NFKD", "Lowercase", "Prepend", "Replace", "Sequence"}


def _normalizer_factor(spec: dict | None) -> int | None:
    """How many times fewer characters a normalizer may leave (1: none fewer), or None when
    nfb cannot say."""
    if not spec:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for sub in spec.get("normalizers") or []:
            f = _normalizer_factor(sub)
            if f is None:
                return None
            factor *= f
        return factor
    if kind == "Replace":
        pattern = (spec.get("pattern") or {}).get("String")
        content = spec.get("content")
        # " " -> "▁" and alike keep the length; a regex or a shorter content may not
        if pattern is None or content is None or len(content) < len(pattern):
            return None
        return 1
    if kind in _MERGING:
        return _MERGING[kind]
    if kind in _KEEPING:
        return 1
    return None


def chars_per_token(tokenizer) -> int | None:
    """An upper bound on the characters one token covers, or None when nfb cannot bound it
    (see the module's note)."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary to read
        return None
    if not vocab:
        return None
    longest = max(len(t) for t in vocab)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return longest   # a slow (SentencePiece) tokenizer: pieces are characters
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001
        return None
    model = spec.get("model") or {}
    if model.get("type") == "WordPiece":
        longest = max(longest, int(model.get("max_input_chars_per_word") or 100))
    factor = _normalizer_factor(spec.get("normalizer"))
    return None if factor is None else longest * factor


def _turn_chars(turn: dict) -> int:
    text = turn.get("content") or ""
    if turn.get("role") not in ("user", "system") and "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return len(text.strip())


def prompt_chars(prompts: list[Prompt]) -> int:
    """The characters of the longest prompt that its template certainly renders."""
    return max((len(p.text) if p.messages is None else sum(map(_turn_chars, p.messages))
                for p in prompts), default=0)


def count_tokens(tokenizer, texts: list[str]) -> int:
    """Tokens of `texts`, each tokenized on its own in pieces (bounded memory)."""
    pieces = [t[i:i + _PIECE] for t in texts for i in range(0, len(t), _PIECE)]
    n = 0
    for s in range(0, len(pieces), 8):
        n += sum(len(ids) for ids in render(tokenizer, [Prompt(text=p)
                                                       for p in pieces[s:s + 8]]))
    return n


class Fitter:
    """The character bound and the policy for one run (one tokenizer and budget)."""

    def __init__(self, tokenizer, budget: int, policy: str = "error"):
        if policy not in POLICIES:
            raise ValueError(f"too_long={policy!r}: use one of {', '.join(POLICIES)}")
        self.tokenizer = tokenizer
        self.budget = budget
        self.policy = policy
        self.per_token = chars_per_token(tokenizer)
        self.char_limit = budget * self.per_token if self.per_token else None

    def over_chars(self, chars: int) -> bool:
        return self.char_limit is not None and chars > self.char_limit

    def char_reason(self, chars: int) -> str:
        least = math.ceil(chars / self.per_token)
        return f"prompt_too_long:{chars} characters, at least {least} tokens > {self.budget}"

    def token_reason(self, tokens: int) -> str:
        return f"prompt_too_long:{tokens} tokens > {self.budget}"

    # --- shortening --------------------------------------------------------------------------

    def shorten(self, conv: Conversation, make: Callable[[Conversation], list[Prompt]],
                full_len: int | None) -> tuple[list[list[int]], int] | str:
        """(token ids per request, tokens removed), or the error reason. `full_len`: the
        longest request's tokens as rendered (None: over the character bound, not rendered).
        """
        ctx = list(conv.context)
        final = max(i for i, t in enumerate(ctx) if t["role"] == "user")
        start = 1 if ctx[0]["role"] == "system" and final > 0 else 0
        head, history, tail = ctx[:start], ctx[start:final], ctx[final:]
        # the drops that leave a history starting at a user turn (all of it dropped last)
        cuts = [k for k in range(len(history) + 1)
                if k in (0, len(history)) or history[k]["role"] == "user"]

        def at(k: int, prompt_text: str | None = None) -> Conversation:
            t = list(tail)
            if prompt_text is not None:
                t[0] = {**t[0], "content": prompt_text}
            return Conversation((*head, *history[k:], *t), conv.response, conv.alternatives)

        def measure(c: Conversation) -> tuple[list[list[int]], int]:
            ids = render(self.tokenizer, make(c))
            return ids, max(len(x) for x in ids)

        ids_at: dict[int, list[list[int]]] = {}
        len_at: dict[int, int] = {} if full_len is None else {0: full_len}

        def fits(i: int) -> bool:
            k = cuts[i]
            if k not in len_at:
                ids_at[k], len_at[k] = measure(at(k))
            return len_at[k] <= self.budget

        # 1. the fewest turns dropped that pass the character bound (found without rendering)
        first = next((i for i, k in enumerate(cuts)
                      if not self.over_chars(prompt_chars(make(at(k))))), None)
        pre = 0          # tokens of the text removed before the first rendering
        base = full_len  # the longest request's tokens at the first rendering
        if first is not None and base is None:
            pre = count_tokens(self.tokenizer, [t["content"] for t in history[:cuts[first]]])
            fits(first)
            base = len_at[cuts[first]]
        # 2. the fewest turns dropped that fit (a row's tokens grow with the turns it keeps)
        if first is not None and self.policy != "error":
            lo, hi = first, len(cuts) - 1
            if fits(hi):
                while lo < hi:
                    mid = (lo + hi) // 2
                    if fits(mid):
                        hi = mid
                    else:
                        lo = mid + 1
                k = cuts[lo]
                return ids_at[k], pre + base - len_at[k]
        if self.policy != "truncate":
            n = len_at.get(cuts[-1])
            return (f"{self.token_reason(n)} with no earlier turn left" if n is not None else
                    f"prompt_too_long:over {self.budget} tokens with no earlier turn left")
        # 3. truncate: no earlier turn left; cut the final prompt's text in its middle
        k = cuts[-1]
        text = tail[0]["content"]
        if base is None:   # over the character bound even with no earlier turn left
            pre = count_tokens(self.tokenizer, [t["content"] for t in history])
            excess = prompt_chars(make(at(k))) - self.char_limit
            if excess >= len(text):
                return self._alone()
            a = (len(text) - excess + 1) // 2   # characters no rendering could keep
            pre += count_tokens(self.tokenizer, [text[a:a + excess]])
            text = text[:a] + text[a + excess:]
            ids, n = measure(at(k, text))
            base = n
        else:
            ids, n = ids_at.get(k), len_at[k]   # (over the budget)
        if n <= self.budget:
            return ids, pre + base - n
        piece = _Pieces(self.tokenizer, text)

        def cut(r: int) -> tuple[list[list[int]], int]:
            keep = piece.n - r
            return measure(at(k, piece.ends((keep + 1) // 2, keep // 2)))

        failed, remove = 0, n - self.budget   # `failed` tokens removed are known too few
        for _ in range(64):
            if remove >= piece.n:
                return self._alone()
            ids, n = cut(remove)
            if n <= self.budget:
                while remove - 1 > failed:   # the seams of a cut: fewer may fit too
                    ids2, n2 = cut(remove - 1)
                    if n2 > self.budget:
                        break
                    remove, ids, n = remove - 1, ids2, n2
                return ids, pre + base - n
            failed, remove = remove, remove + max(1, n - self.budget)
        return self.token_reason(n)

    def _alone(self) -> str:
        return (f"prompt_too_long:over {self.budget} tokens with no earlier turn and none of "
                "the prompt's text left")


class _Pieces:
    """A text's first and last tokens (tokenized on its own), as text."""

    def __init__(self, tokenizer, text: str):
        self.text = text
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and getattr(tokenizer, "is_fast", False):
            self.spans = list(backend.encode(text, add_special_tokens=False).offsets)
            self.n = len(self.spans)
        else:   # a slow tokenizer: the pieces decoded
            self.spans = None
            self.tokenizer = tokenizer
            self.ids = tokenizer.encode(text, add_special_tokens=False)
            self.n = len(self.ids)

    def ends(self, left: int, right: int) -> str:
        """The text of the first `left` and the last `right` tokens."""
        if self.spans is None:
            dec = self.tokenizer.decode
            return (dec(self.ids[:left]) if left else "") + \
                (dec(self.ids[self.n - right:]) if right else "")
        t, sp = self.text, self.spans
        return (t[:sp[left - 1][1]] if left else "") + (t[sp[self.n - right][0]:] if right else "")
