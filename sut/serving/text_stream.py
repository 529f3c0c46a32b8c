"""Token ids to text as they stream: what each server-sent event of `wallperf serve` carries."""
from __future__ import annotations


class TextStream:
    """Incremental detokenization over a sliding window (as TGI and vLLM do), so each
    token costs a short decode. Byte-level BPE may split a character over tokens:
    text ending in U+FFFD is held back until the character is whole."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        # ids[prefix:read] is text already sent, decoded again for context.
        self.prefix = self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        sent = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(sent) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(sent):]

    def flush(self) -> str:
        sent = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(sent):]
