"""ShareGPT: the truncated-array reader against cuts at every byte, the warning,
vLLM's length filters and seeded order, and (slow) the real file's counts."""
import dataclasses
import json
import logging
import random
import statistics

import numpy as np
import pytest

from wallperf.harness.loadgen.sharegpt import (ShareGPTError, is_valid_pair, load_conversations, read_records,
                                      sample_sharegpt)
from wallperf.harness.loadgen.workload import length_distribution


def _records(n):
    # Non-ASCII text, so byte offsets differ from character offsets and cuts fall inside UTF-8 sequences.
    return [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"frage {i} ü€ \"q\" " * (i + 1)},
                                              {"from": "gpt", "value": "antwort ✓ " * (2 * i + 1)}]}
            for i in range(n)]


def _array_bytes(records):
    """The file as json.dump(indent=2) writes it, and the byte offsets where each record starts and ends."""
    text = json.dumps(records, indent=2, ensure_ascii=False).encode()
    starts, ends = [], []
    for r in records:
        piece = json.dumps(r, indent=2, ensure_ascii=False).replace("\n", "\n  ").encode()
        starts.append(text.index(piece, ends[-1] if ends else 0))
        ends.append(starts[-1] + len(piece))
    return text, starts, ends


@pytest.mark.parametrize("chunk_size", [7, 1 << 20])
def test_every_cut_keeps_exactly_the_complete_records(tmp_path, chunk_size):
    records = _records(3)
    text, starts, ends = _array_bytes(records)
    path = tmp_path / "cut.json"
    for cut in range(1, len(text)):
        path.write_bytes(text[:cut])
        readout = read_records(path, chunk_size)
        complete = sum(end <= cut for end in ends)
        assert readout.records == records[:complete], cut
        assert readout.cut_at == cut
        inside = complete < len(records) and cut > starts[complete]
        assert readout.partial_record_at == (starts[complete] if inside else cut), cut
        assert readout.lost == int(inside)


def test_whole_array_is_not_a_cut(tmp_path):
    records = _records(3)
    path = tmp_path / "whole.json"
    path.write_bytes(json.dumps(records).encode())
    readout = read_records(path, 5)
    assert readout.records == records and readout.cut_at is None and readout.lost == 0


@pytest.mark.parametrize("text, words", [
    (b'{"a": 1}', "not a JSON array"),
    (b"", "not a JSON array"),
    (b'[{"a": 1} {"b": 2}]', "expected ',' or ']'"),
    (b'[{"a": 1}, {"b": tru}, {"c": 3}]', "malformed JSON in the record at byte 11"),
    (b'[{"a": "\xff\xfe"}]', "not UTF-8"),
])
def test_malformed_files_are_errors(tmp_path, text, words):
    path = tmp_path / "bad.json"
    path.write_bytes(text)
    with pytest.raises(ShareGPTError, match=words):
        read_records(path, 4)


def test_cut_warns_once_with_counts(tmp_path, caplog):
    records = _records(3)
    text, _, ends = _array_bytes(records)
    path = tmp_path / "cut.json"
    path.write_bytes(text[:ends[1] + 20])
    with caplog.at_level(logging.WARNING):
        conversations, stats = load_conversations(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"cut at byte {ends[1] + 20}" in warnings[0]
    assert "kept 2 complete records, lost 1 partial record" in warnings[0]
    assert len(conversations) == 2 and stats["records"] == 2 and stats["cut_at_byte"] == ends[1] + 20


def test_the_pair_is_the_first_human_turn_answered_by_gpt(tmp_path):
    def turn(who, text):
        return {"from": who, "value": text}
    records = [{"id": "a", "conversations": [turn("human", "x")]},
               {"id": "b", "conversations": [turn("gpt", "g0"), turn("human", "h1"), turn("gpt", "g1")]},
               {"id": "c"},
               {"id": "d", "conversations": [turn("human", "p"), turn("gpt", "r"), turn("human", "p2")]},
               {"id": "e", "conversations": [turn("human", "p"), turn("human", "q"), turn("system", "s")]}]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(records))
    conversations, stats = load_conversations(path)
    assert [(c.id, c.prompt, c.reply) for c in conversations] == [("b", "h1", "g1"), ("d", "p", "r")]
    assert stats["records_skipped"] == {"fewer than two turns": 2, "no human turn answered by gpt": 1}


@pytest.mark.parametrize("prompt, output, valid", [
    (3, 10, False), (4, 4, True), (4, 3, False), (1024, 1024, True), (1025, 4, False), (1000, 1049, False),
])
def test_vllm_length_filter(prompt, output, valid):
    assert is_valid_pair(prompt, output) is valid


class _WordTokenizer:
    """One token per whitespace-separated word; the chat template adds two."""

    def apply_chat_template(self, messages):
        return "<user> " + messages[0]["content"] + " <assistant>"

    def encode(self, text):
        return list(range(len(text.split())))


def test_sampling_follows_the_seeded_shuffle_and_the_filters(tmp_path):
    rng = random.Random(1)
    records = [{"id": f"r{i}", "conversations": [
        {"from": "human", "value": "w " * rng.randint(0, 1200)}, {"from": "gpt", "value": "w " * rng.randint(0, 1500)}]}
        for i in range(300)]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(records))
    chosen = sample_sharegpt(path, _WordTokenizer(), 40, seed=7)
    # The reference: vLLM's procedure written out independently.
    order = list(range(300))
    random.seed(7)
    random.shuffle(order)
    expected = []
    for i in order:
        p = len(records[i]["conversations"][0]["value"].split()) + 2
        o = len(records[i]["conversations"][1]["value"].split())
        if 4 <= p <= 1024 and o >= 4 and p + o <= 2048:
            expected.append((f"r{i}", p, o))
        if len(expected) == 40:
            break
    assert [(i, len(p), o) for i, p, o in zip(chosen.ids, chosen.prompts, chosen.output_lengths)] == expected
    assert all(p.dtype == np.int32 for p in chosen.prompts)
    assert chosen.stats["sampled"] == 40 and sum(chosen.stats["dropped"].values()) == chosen.stats["tried"] - 40
    assert sample_sharegpt(path, _WordTokenizer(), 40, seed=8).ids != chosen.ids


def test_length_distribution_matches_the_statistics_module():
    values = [5, 1, 9, 4, 4, 100, 7]
    d = length_distribution(values)
    assert d["min"] == 1 and d["max"] == 100 and d["count"] == 7
    assert d["mean"] == pytest.approx(statistics.fmean(values))
    assert d["p50"] == statistics.median(values)
    # numpy's linear percentile is statistics.quantiles' "inclusive" method.
    assert d["p90"] == pytest.approx(statistics.quantiles(values, n=10, method="inclusive")[8])
    assert length_distribution([]) is None


@pytest.mark.slow
def test_real_sharegpt_file_counts(sharegpt_path):
    raw = sharegpt_path.read_bytes()
    # Independently: the last record closed at the top level ends with "\n  }" (indent 2).
    last = raw.rindex(b"\n  },\n  {") + len(b"\n  }")
    expected = json.loads(raw[:last] + b"\n]")
    readout = read_records(sharegpt_path)
    assert len(readout.records) == len(expected) == 17671
    assert readout.records[-1] == expected[-1]
    assert readout.cut_at == len(raw) == 125509632


@pytest.mark.slow
def test_real_sample_lengths_match_an_independent_count(sharegpt_path, smollm2_gguf_path):
    """The set a run draws from, against the same records and filters applied here from scratch:
    json.loads on the complete part, the pair search, vLLM's shuffle, the statistics module."""
    from wallperf.harness.config import load_dataset_config
    from wallperf.harness.loadgen.workload import load_workload
    from wallperf.sut.loading.load import load_tokenizer

    tok = load_tokenizer(smollm2_gguf_path)
    raw = sharegpt_path.read_bytes()
    records = json.loads(raw[:raw.rindex(b"\n  },\n  {") + len(b"\n  }")] + b"\n]")
    pairs = []
    for r in records:
        turns = r.get("conversations") or []
        for a, b in zip(turns, turns[1:]):
            if a.get("from") == "human" and b.get("from") == "gpt":
                pairs.append((a["value"], b["value"]))
                break
    random.seed(0)
    random.shuffle(pairs)
    inputs, outputs = [], []
    for prompt, reply in pairs:
        p = len(tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}])))
        o = len(tok.encode(reply))
        if 4 <= p <= 1024 and o >= 4 and p + o <= 2048:
            inputs.append(p)
            outputs.append(o)
        if len(inputs) == 60:
            break
    dataset = dataclasses.replace(load_dataset_config("sharegpt"), max_samples=60)
    lengths = load_workload(dataset, sharegpt_path, tok, seed=0).description["lengths"]
    for got, values in ((lengths["input"], inputs), (lengths["output"], outputs)):
        assert (got["count"], got["min"], got["max"]) == (len(values), min(values), max(values))
        assert got["mean"] == pytest.approx(statistics.fmean(values))
        assert got["p50"] == pytest.approx(statistics.median(values))
        assert got["p90"] == pytest.approx(statistics.quantiles(values, n=10, method="inclusive")[8])
