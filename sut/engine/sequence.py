"""What the engine schedules: a request's sampling parameters, its sequence of
tokens and cache blocks, and the events it emits.

These are the engine's nouns (vLLM and nano-vllm name them the same way); every
backend speaks them, so they sit apart from the scheduler and the model runner.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int
    # EOS is suppressed until this many tokens exist (LoadGen needs n_tokens > 1).
    min_new_tokens: int = 0
    # Decode exactly max_new_tokens, as serving benchmarks' ignore_eos does.
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens: {self}")


def checked_prompt(request_id: int, prompt_ids, params: SamplingParams, max_seq_len: int) -> list:
    """The prompt as a list, or ValueError if it is empty or it and its new tokens overflow max_seq_len
    (every backend's add_request check)."""
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError(f"request {request_id}: empty prompt")
    if len(prompt) + params.max_new_tokens > max_seq_len:
        raise ValueError(f"request {request_id}: prompt of {len(prompt)} tokens + {params.max_new_tokens} "
                         f"new tokens exceeds max_seq_len {max_seq_len}")
    return prompt


@dataclass(slots=True)
class Sequence:
    request_id: int
    prompt_ids: list
    params: SamplingParams
    output_ids: list = field(default_factory=list)
    block_table: list = field(default_factory=list)
    # Tokens whose keys and values are in the cache.
    num_cached: int = 0
    # Speculative decoding: the drafter's own cache (a draft model's blocks, how
    # many of this sequence's tokens it holds, and the first of them it reads: a
    # draft model may skip the start of a long prompt).
    draft_block_table: list = field(default_factory=list)
    draft_cached: int = 0
    draft_start: int = 0

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def decoding(self) -> bool:
        """Everything but the last sampled token is cached: the next step feeds it."""
        return bool(self.output_ids) and self.num_cached == self.length - 1

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def tokens(self) -> list:
        return self.prompt_ids + self.output_ids


@dataclass(frozen=True, slots=True)
class TokenEvent:
    request_id: int
    token_id: int
    # 1 for the first generated token.
    index: int
    finished: bool
