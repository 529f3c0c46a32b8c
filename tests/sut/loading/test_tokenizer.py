"""wallperf.sut.loading.tokenizer against independent references.

The real model is checked against HF transformers' tokenizer loaded from the
same GGUF, and, where the two differ on purpose (digits, see below), against
llama.cpp's pre-tokenizer rule written out here with the `regex` module. The
fast tests build tiny vocabularies whose expected ids are worked out by hand.
"""
import json

import jinja2
import pytest

from wallperf.sut.loading.tokenizer import Tokenizer

# -- synthetic vocabulary -----------------------------------------------------


def gpt2_byte_alphabet() -> list[str]:
    # GPT-2's bytes_to_unicode (openai/gpt-2 encoder.py): printable bytes stand
    # for themselves, the others are shifted past U+00FF in byte order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"]
SPECIAL_TYPES = [3, 3, 3, 4]  # control x3, user-defined
MERGED = ["he", "ll", "hell", "hello", "Ġw", "12", "ĠĠ"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "1 2", "Ġ Ġ"]
TOKENS = SPECIALS + gpt2_byte_alphabet() + MERGED
TYPES = SPECIAL_TYPES + [1] * (len(TOKENS) - len(SPECIALS))


def ids(*tokens: str) -> list[int]:
    return [TOKENS.index(t) for t in tokens]


def synthetic(**overrides) -> Tokenizer:
    kwargs = dict(pre="smollm", bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    return Tokenizer.from_vocab(TOKENS, MERGES, TYPES, **kwargs)


def test_synthetic_merges_and_special_tokens():
    tok = synthetic()
    assert tok.encode("hello world") == ids("hello", "Ġw", "o", "r", "l", "d")
    assert tok.encode("<|im_start|>hello<|im_end|>") == [1, *ids("hello"), 2]
    assert tok.decode([1, *ids("hello"), 2]) == "hello"
    assert tok.decode([1, *ids("hello"), 2], skip_special_tokens=False) == "<|im_start|>hello<|im_end|>"
    # User-defined tokens are matched whole but are text, so decode keeps them.
    assert tok.encode("a<tool>b") == ids("a", "<tool>", "b")
    assert tok.decode(ids("a", "<tool>", "b")) == "a<tool>b"
    assert tok.decode(tok.encode("é ☃")) == "é ☃"
    assert tok.vocab_size == len(TOKENS)


# Expected pieces per llama.cpp's regex lists (llama-vocab.cpp): gpt-2 keeps a
# space with the number that follows; smollm isolates each digit first; default
# also cuts number runs off, but leaves "12" whole.
@pytest.mark.parametrize(
    "pre, text, expected",
    [
        ("gpt-2", "x 12", ["x", "Ġ", "12"]),
        ("gpt-2", "a  1", ["a", "Ġ", "Ġ", "1"]),
        ("smollm", "x 12", ["x", "Ġ", "1", "2"]),
        ("smollm", "a  1", ["a", "ĠĠ", "1"]),
        ("default", "x 12", ["x", "Ġ", "12"]),
        ("default", "a  1", ["a", "Ġ", "Ġ", "1"]),
    ],
)
def test_synthetic_pre_tokenizer_rules(pre, text, expected):
    assert synthetic(pre=pre).encode(text) == ids(*expected)


def test_bos_added_only_when_metadata_asks():
    plain, with_bos = synthetic(), synthetic(add_bos_token=True)
    assert plain.encode("he", add_special_tokens=True) == ids("he")
    assert with_bos.encode("he", add_special_tokens=True) == [1, *ids("he")]
    assert with_bos.encode("he") == ids("he")


def test_unsupported_pre_tokenizer_is_named():
    with pytest.raises(ValueError, match="'deepseek-llm'"):
        synthetic(pre="deepseek-llm")


def test_eos_ids_add_the_turn_end_the_template_writes():
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    assert synthetic(eos_token_id=0, chat_template=template).eos_token_ids == {0, 2}
    assert synthetic(eos_token_id=0).eos_token_ids == {0}


def test_chat_template_environment():
    template = (
        "{{ bos_token }}{% for m in messages %}\n"
        "{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}\n"
        "    {{ m['role'] }}: {{ m | tojson }}{{ eos_token }}\n"
        "{% endfor %}\n"
        "  {% if add_generation_prompt %}>{% endif %}"
    )
    tok = synthetic(chat_template=template)
    messages = [{"role": "user", "content": "café <b>"}]
    # trim_blocks drops the newline after each tag, lstrip_blocks the indent
    # before one; tojson keeps non-ASCII and HTML characters as they are.
    expected = '<|im_start|>    user: {"role": "user", "content": "café <b>"}<|im_end|>\n'
    assert tok.apply_chat_template(messages) == expected + ">"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected
    with pytest.raises(jinja2.exceptions.TemplateError, match="no tools"):
        tok.apply_chat_template([{"role": "tool", "content": ""}])
    with pytest.raises(ValueError, match="no chat template"):
        synthetic().apply_chat_template(messages)


def write_gguf(path, model="gpt2", pre="smollm", template=None):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types(TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    if template is not None:
        writer.add_chat_template(template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_from_gguf_reads_the_metadata(tmp_path):
    write_gguf(tmp_path / "t.gguf", template="{{ bos_token }}")
    tok = Tokenizer.from_gguf(tmp_path / "t.gguf")
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (1, 2, {2})
    assert tok.encode("a  12", add_special_tokens=True) == [1, *ids("a", "ĠĠ", "1", "2")]
    assert tok.apply_chat_template([]) == "<|im_start|>"


def test_from_gguf_refuses_sentencepiece(tmp_path):
    write_gguf(tmp_path / "spm.gguf", model="llama")
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_gguf(tmp_path / "spm.gguf")


def test_from_tokenizer_json_reads_the_files_beside_it(tmp_path):
    synthetic().backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<|im_start|>"},
        "eos_token": "<|endoftext|>",
        "chat_template": "{{ eos_token }}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 3]}))
    tok = Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (1, 0, {0, 3})
    assert tok.encode("a  1") == ids("a", "ĠĠ", "1")
    assert tok.apply_chat_template([]) == "<|endoftext|>"
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}")
    assert Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json").apply_chat_template([]) == "<|im_start|>"


# -- the real SmolLM2 GGUF against HF transformers ----------------------------

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! It's a test; isn't it? We'll see -- they'd've said so.",
    "def greet(name):\n    return f'hi {name}'  # comment\n\tif not name: raise ValueError\n",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🤗🚀👩‍👩‍👧 and ✨ combined",
    "  leading and trailing  ",
    "tabs\t\there\t and many     spaces    between",
    "\n\nnewlines\n\n\nmore\r\nwindows\n",
    "",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<repo_name>x<filename>",
    "not special: <|im_start |> <im_end> <|im_end",
]

# Texts with digits. HF's GGUF converter (transformers 5.x,
# GGUF_PRE_TOKENIZER_SPLITS) has no entry for tokenizer.ggml.pre == "smollm" and
# falls back to plain GPT-2 splitting, so it differs from llama.cpp where a
# space run precedes a digit: "a  1" is [81, 216, 216, 33] in HF and
# [81, 256, 33] in llama.cpp (and in SmolLM2's own tokenizer.json, which puts
# Digits(individual_digits) before ByteLevel). These follow llama.cpp's rule.
DIGIT_TEXTS = [
    "12345 and 3.14",
    "a  1",
    "x = 42;  y = 3.0e-5",
    "Call 555-0199 at 10:30pm, 2024/01/02.",
    "½ ² ٣ and 1,000,000",
    "for i in range(10):\n    print(i ** 2)\n",
]


@pytest.fixture(scope="module")
def ours(smollm2_gguf_path):
    return Tokenizer.from_gguf(smollm2_gguf_path)


@pytest.fixture(scope="module")
def hf(smollm2_gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name)


def llama_cpp_smollm_ids(hf, text: str) -> list[int]:
    """llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM: `\\p{N}` isolates every digit, then
    GPT-2's regex splits what is left; each piece is BPE-encoded on its own (by HF,
    whose own GPT-2 split leaves such a piece whole)."""
    import regex

    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
    pieces = [p for chunk in regex.split(r"(\p{N})", text) if chunk for p in gpt2.findall(chunk)]
    assert "".join(pieces) == text
    return [i for piece in pieces for i in hf.encode(piece, add_special_tokens=False)]


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf(ours, hf, text):
    for add in (False, True):
        assert ours.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add)


@pytest.mark.slow
@pytest.mark.parametrize("text", DIGIT_TEXTS)
def test_digits_follow_llama_cpp(ours, hf, text):
    assert ours.encode(text) == llama_cpp_smollm_ids(hf, text)


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS + DIGIT_TEXTS)
def test_decode_matches_hf_and_round_trips(ours, hf, text):
    token_ids = ours.encode(text)
    assert ours.decode(token_ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert ours.decode(token_ids, skip_special_tokens=skip) == hf.decode(token_ids, skip_special_tokens=skip)


@pytest.mark.slow
def test_special_ids_match_hf(ours, hf):
    assert hf.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    # SmolLM2's EOS is already the chat turn end <|im_end|>: nothing to add.
    assert ours.eos_token_ids == {hf.eos_token_id}
    assert ours.vocab_size == len(hf) == 49152


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?\n  Think  twice. 🌱"},
    ],
]


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(ours, hf, messages, add_generation_prompt):
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    rendered = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    assert ours.encode(rendered) == hf.encode(expected, add_special_tokens=False)


@pytest.mark.slow
def test_from_tokenizer_json_matches_hf(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    tok = Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    # HF's saved tokenizer.json carries HF's split, so here digits match HF too.
    for text in TEXTS + DIGIT_TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (1, 2, {2})
    messages = CONVERSATIONS[1]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
