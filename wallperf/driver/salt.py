"""Per-query salt, as MLPerf Endpoints defines it (endpoints_rules.md 2.9.5.1):
64 random bits or more placed between the system prompt and the user's content,
so that a server's prefix cache can reuse the system prompt across queries and
nothing past it.

The salt is spliced into the token ids the client sends, so no worker needs a
tokenizer: "salt:" and 16 hex digits, each digit one token id of the model's
own vocabulary (the 64 bits can be read back from the ids). Where the user's
content starts is found from the chat template: the ids of the template's text
before a user message. A prompt that does not begin with those ids (a data set
without the chat template) takes the salt after the prefix all prompts share,
and at position 0 when they share none.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

SALT_BITS = 64
_HEX = "0123456789abcdef"
_SENTINEL = "\u2063SALT-SENTINEL\u2063"


@dataclass(frozen=True)
class SaltPlan:
    # Per prompt: the index its salt goes at.
    positions: tuple[int, ...]
    marker: tuple[int, ...]
    # The ids of "0".."f", in order.
    digits: tuple[int, ...]

    def salted(self, sample: int, prompt, bits: int) -> list[int]:
        """`prompt` (the data set's `sample`) with the 64-bit salt `bits` at its place."""
        at = self.positions[sample]
        # Most significant digit first: the text reads as the salt's hex value.
        salt = [self.digits[(bits >> (4 * k)) & 15] for k in reversed(range(SALT_BITS // 4))]
        return [*prompt[:at], *self.marker, *salt, *prompt[at:]]

    def read(self, ids: list[int]) -> int | None:
        """The salt in `ids` (a salted prompt), or None where there is none."""
        m = len(self.marker)
        for i in range(len(ids) - m - SALT_BITS // 4 + 1):
            if tuple(ids[i:i + m]) == self.marker:
                digits = ids[i + m:i + m + SALT_BITS // 4]
                if all(d in self.digits for d in digits):
                    return int("".join(_HEX[self.digits.index(d)] for d in digits), 16)
        return None


def salt_plan(prompts: list, tokenizer) -> SaltPlan:
    """Where each prompt's salt goes, and its tokens in the model's vocabulary."""
    digits = tuple(_one_id(tokenizer, c) for c in _HEX)
    if len(set(digits)) != len(_HEX):
        raise ValueError("the tokenizer does not give 16 distinct single tokens for the hex digits")
    marker = tuple(tokenizer.encode("salt:"))
    shared = _common_prefix([list(map(int, p)) for p in prompts])
    head = None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}])
        head = tokenizer.encode(text[:text.index(_SENTINEL)], add_special_tokens=False)
    except (ValueError, AttributeError, TypeError):
        head = None
    positions = tuple(len(head) if head and [int(t) for t in p[:len(head)]] == head else shared for p in prompts)
    return SaltPlan(positions, marker, digits)


def salt_bits(rng: random.Random) -> int:
    return rng.getrandbits(SALT_BITS)


def _one_id(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer encodes {text!r} as {len(ids)} tokens, not one")
    return ids[0]


def _common_prefix(prompts: list[list[int]]) -> int:
    if len(prompts) < 2:
        return 0
    first, n = prompts[0], min(map(len, prompts))
    for i in range(n):
        if any(p[i] != first[i] for p in prompts[1:]):
            return i
    return n
