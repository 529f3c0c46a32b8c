"""ShareGPT conversations as serving requests: a prompt and an output length each.

The published file (`ShareGPT_V3_unfiltered_cleaned_split.json`) is one JSON
array of about 94k records; the copy we can reach is cut off inside a string,
so `json.load` refuses it whole. `read_records` walks the array one record at
a time with the standard library's decoder over a growing buffer, keeps every
record that parses completely, and reports where the array stops, so a cut is
never silent and never yields half a record.

Sampling follows vLLM's benchmark (`ShareGPTDataset` in vllm/benchmarks/datasets.py):
records with at least two turns, shuffled with a seeded Python `random`, taken
in that order; the first turn is the prompt, the token count of the second is
the output length; pairs are dropped when the prompt has fewer than 4 or more
than 1024 tokens, the output fewer than 4, or both together more than 2048.
Where this differs from vLLM (README, "Data sets"): the prompt goes through the
model's chat template and its length is counted after it; the pair is the
first human turn that a gpt turn answers (vLLM takes turns 0 and 1 whatever
their roles, and a third of this file's records, the later parts of split
conversations, open with a gpt turn); when fewer pairs pass than were asked
for, we use those and say so (vLLM repeats requests until it has enough).
"""
from __future__ import annotations

import codecs
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wallperf.harness.loadgen.qsl import DatasetError

log = logging.getLogger(__name__)

MIN_TOKENS = 4
MAX_PROMPT_TOKENS = 1024
MAX_TOTAL_TOKENS = 2048
_CHUNK = 1 << 20
_WHITESPACE = " \t\n\r"


class ShareGPTError(DatasetError):
    """The file is not a ShareGPT JSON array, or is malformed before its end."""


@dataclass(frozen=True, slots=True)
class Conversation:
    """A record's first human turn that a gpt turn answers, and that answer."""

    id: str
    prompt: str
    reply: str


@dataclass(frozen=True)
class ArrayReadout:
    """What one pass over the array found."""

    records: list
    # Byte offset where the file stops short of the array's end (None: the array is
    # whole), and where the record it cuts starts (cut_at itself for a cut between records).
    cut_at: int | None = None
    partial_record_at: int | None = None
    file_bytes: int = 0

    @property
    def lost(self) -> int:
        """Records begun but not complete: the one the cut falls in, if it falls in
        one. Records that followed it are not in the file, so they cannot be counted."""
        return int(self.cut_at is not None and self.partial_record_at < self.cut_at)


def read_records(path: Path, chunk_size: int = _CHUNK) -> ArrayReadout:
    """Every complete record of a (possibly truncated) top-level JSON array, in order."""
    return _ArrayReader(Path(path), chunk_size).read()


class _ArrayReader:
    """One pass over the file: `buf` holds decoded text from byte `offset` on,
    `pos` is the parse position in it; what lies before `pos` is dropped on refill."""

    def __init__(self, path: Path, chunk_size: int):
        self.path, self.chunk_size = path, chunk_size
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.decoder = json.JSONDecoder()
        self.buf, self.pos, self.offset = "", 0, 0

    def read(self) -> ArrayReadout:
        with open(self.path, "rb") as self.file:
            size = self.path.stat().st_size
            if self._next_char() != "[":
                raise ShareGPTError(f"{self.path}: not a JSON array")
            self.pos += 1
            records: list = []
            while True:
                c = self._next_char()
                if c == "]":
                    return ArrayReadout(records, file_bytes=size)
                if c is not None and records:
                    if c != ",":
                        raise ShareGPTError(f"{self.path}: expected ',' or ']' after record {len(records)} "
                                            f"at byte {self._byte(self.pos)}, found {c!r}")
                    self.pos += 1
                    c = self._next_char()
                if c is None:  # the array stops between records
                    return ArrayReadout(records, cut_at=size, partial_record_at=size, file_bytes=size)
                record = self._record()
                if record is None:
                    return ArrayReadout(records, cut_at=size, partial_record_at=self._byte(self.pos),
                                        file_bytes=size)
                records.append(record)

    def _record(self):
        """The value at `pos`, or None when the file ends inside it."""
        while True:
            try:
                value, self.pos = self.decoder.raw_decode(self.buf, self.pos)
                return value
            except json.JSONDecodeError as e:
                if self._fill():
                    continue
                if e.msg.startswith("Unterminated string") or e.pos >= len(self.buf.rstrip()) - 8:
                    return None
                raise ShareGPTError(f"{self.path}: malformed JSON in the record at byte {self._byte(self.pos)}: "
                                    f"{e.msg} at byte {self._byte(e.pos)}") from None

    def _next_char(self) -> str | None:
        """The next non-blank character (None at the end of the file)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return None

    def _fill(self) -> bool:
        """Drop the parsed text and append the next chunk; False at the end of the file."""
        self.offset += len(self.buf[:self.pos].encode())
        self.buf, self.pos = self.buf[self.pos:], 0
        chunk = self.file.read(self.chunk_size)
        if not chunk:
            return False
        try:
            self.buf += self.utf8.decode(chunk)
        except UnicodeDecodeError as e:
            raise ShareGPTError(f"{self.path}: not UTF-8 near byte {self.offset + len(self.buf.encode())}: "
                                f"{e.reason}") from None
        return True

    def _byte(self, pos: int) -> int:
        return self.offset + len(self.buf[:pos].encode())


@dataclass(frozen=True)
class ShareGPTSet:
    """The pairs a run uses, and how they were chosen."""

    ids: list
    prompts: list  # int32 token ids, chat template applied
    output_lengths: list  # the gpt reply's token count
    stats: dict = field(default_factory=dict)


def load_conversations(path: Path) -> tuple[list[Conversation], dict]:
    """The usable (human prompt, gpt reply) pairs of every complete record, and the
    counts behind them; warns once when the array is cut short."""
    readout = read_records(path)
    if readout.cut_at is not None:
        where = (f"inside the record starting at byte {readout.partial_record_at}" if readout.lost
                 else "between two records")
        log.warning("%s: the JSON array is cut at byte %d (%s): kept %d complete records, lost %d partial "
                    "record; records after the cut are not in the file",
                    path, readout.cut_at, where, len(readout.records), readout.lost)
    skipped: Counter = Counter()
    conversations = []
    for record in readout.records:
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            skipped["fewer than two turns"] += 1
            continue
        pair = _first_exchange(turns)
        if pair is None:
            skipped["no human turn answered by gpt"] += 1
        else:
            conversations.append(Conversation(str(record.get("id", "")), *pair))
    stats = {"records": len(readout.records), "cut_at_byte": readout.cut_at,
             "partial_record_at_byte": readout.partial_record_at, "records_lost": readout.lost,
             "pairs": len(conversations), "records_skipped": dict(skipped)}
    return conversations, stats


def _first_exchange(turns: list) -> tuple[str, str] | None:
    """The text of the first human turn that a gpt turn answers, and of that answer."""
    for first, second in zip(turns, turns[1:]):
        if not (isinstance(first, dict) and isinstance(second, dict)):
            return None
        if (first.get("from"), second.get("from")) == ("human", "gpt") and \
                isinstance(first.get("value"), str) and isinstance(second.get("value"), str):
            return first["value"], second["value"]
    return None


def is_valid_pair(prompt_len: int, output_len: int) -> bool:
    """vLLM's filter: both sides at least 4 tokens, the prompt at most 1024, the pair at most 2048."""
    return (prompt_len >= MIN_TOKENS and output_len >= MIN_TOKENS and prompt_len <= MAX_PROMPT_TOKENS
            and prompt_len + output_len <= MAX_TOTAL_TOKENS)


def sample_sharegpt(path: Path, tokenizer, n: int | None, seed: int) -> ShareGPTSet:
    """`n` pairs (all that pass when None), in vLLM's seeded order, tokenized with `tokenizer`."""
    conversations, stats = load_conversations(path)
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    ids, prompts, outputs, dropped, tried = [], [], [], Counter(), 0
    for i in order:
        if n is not None and len(prompts) >= n:
            break
        tried += 1
        conv = conversations[i]
        text = tokenizer.apply_chat_template([{"role": "user", "content": conv.prompt}])
        prompt = tokenizer.encode(text)
        output_len = len(tokenizer.encode(conv.reply))
        if not is_valid_pair(len(prompt), output_len):
            dropped[_reason(len(prompt), output_len)] += 1
            continue
        ids.append(conv.id)
        prompts.append(np.asarray(prompt, dtype=np.int32))
        outputs.append(output_len)
    if not prompts:
        raise ShareGPTError(f"{path}: no prompt/reply pair passes the length filters")
    if n is not None and len(prompts) < n:
        log.warning("%s: only %d pairs pass the length filters, fewer than the %d asked for; using those",
                    path, len(prompts), n)
    stats.update(seed=seed, asked=n, tried=tried, sampled=len(prompts), dropped=dict(dropped))
    return ShareGPTSet(ids, prompts, outputs, stats)


def _reason(prompt_len: int, output_len: int) -> str:
    if prompt_len < MIN_TOKENS:
        return f"prompt under {MIN_TOKENS} tokens"
    if output_len < MIN_TOKENS:
        return f"output under {MIN_TOKENS} tokens"
    if prompt_len > MAX_PROMPT_TOKENS:
        return f"prompt over {MAX_PROMPT_TOKENS} tokens"
    return f"prompt and output over {MAX_TOTAL_TOKENS} tokens"
