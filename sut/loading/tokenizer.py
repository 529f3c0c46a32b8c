"""Text <-> token ids for the native engine, built from the checkpoint's own metadata.

Two sources: the vocabulary a GGUF carries (tokens, merges, token types and the
`tokenizer.ggml.*` keys, as llama.cpp reads them) and an HF `tokenizer.json`.
Both become a `tokenizers.Tokenizer`, so transformers is never needed at run
time. Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are
built from a GGUF; sentencepiece vocabularies need their own model and are
refused by name.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

if TYPE_CHECKING:
    from wallperf.sut.loading.gguf_file import GGUFFile

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# llama.cpp's GPT-2 split. It has no trailing `|\s+`: llama.cpp keeps text no
# expression matched as a piece of its own, as `Split(..., "isolated")` does.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

# The regexes llama.cpp's llm_tokenizer_bpe applies in turn for each
# `tokenizer.ggml.pre` (llama-vocab.cpp); each one splits every piece the
# previous one left. "smollm" (shared by starcoder, refact, command-r, codeshell
# and exaone) isolates every digit first, so "a  1" is ["a", "  ", "1"] where
# plain GPT-2 would give ["a", " ", " 1"]. llama.cpp names GPT-2's rule "gpt-2";
# "gpt2" is accepted as the same. A missing key means "default".
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"),
    **{name: (_GPT2_SPLIT,) for name in ("gpt-2", "gpt2", "mpt", "olmo", "jais")},
    **{
        name: (r"\p{N}", _GPT2_SPLIT)
        for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")
    },
    # Qwen2's own split (llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2, HF's Qwen2 tokenizer):
    # one digit per piece, newlines kept with the punctuation before them. Qwen's
    # tokenizer.json also puts text in NFC; neither llama.cpp nor HF's GGUF loader does.
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}

# Tokens that close a chat turn. When the chat template writes one, generation
# must stop there even if the checkpoint names another EOS: Llama 3's generation
# config lists <|eot_id|> beside <|end_of_text|>; SmolLM2 names <|im_end|> as EOS.
# Document ends such as <|endoftext|> are left out: llama.cpp also stops on them,
# HF's generation config (the reference) does not.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass(frozen=True, slots=True)
class Tokenizer:
    """A fast tokenizer plus the few facts generation needs (BOS, EOS set, chat template)."""

    backend: Backend
    bos_token_id: int | None
    eos_token_id: int | None
    eos_token_ids: frozenset[int]
    chat_template: str | None
    _template: jinja2.Template | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        size = self.vocab_size
        for name, token_id in (("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id)):
            if token_id is not None and not 0 <= token_id < size:
                raise ValueError(f"{name}={token_id} is outside the vocabulary of {size} tokens")
        if self.eos_token_id is not None and self.eos_token_id not in self.eos_token_ids:
            raise ValueError(
                f"eos_token_ids {sorted(self.eos_token_ids)} must contain eos_token_id {self.eos_token_id}"
            )
        if any(not 0 <= i < size for i in self.eos_token_ids):
            raise ValueError(f"eos_token_ids {sorted(self.eos_token_ids)} reach outside the vocabulary of {size}")
        # Compiled once, so a broken template fails at load and not at the first prompt.
        template = _jinja_environment().from_string(self.chat_template) if self.chat_template else None
        object.__setattr__(self, "_template", template)

    # -- construction ------------------------------------------------------

    @classmethod
    def from_gguf(cls, source: str | os.PathLike | GGUFFile) -> Tokenizer:
        """Build from a GGUF file (or an open GGUFFile, to share one with the weight loader)."""
        from wallperf.sut.loading.gguf_file import GGUFFile

        meta = (source if isinstance(source, GGUFFile) else GGUFFile(os.fspath(source))).metadata

        def value(key: str, default=None):
            return meta.get(key, default)

        kind = value("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"tokenizer.ggml.model={kind!r} is not supported; only byte-level BPE ('gpt2') is")
        end_of_message = [value(f"tokenizer.ggml.{key}_token_id") for key in ("eot", "eom")]
        return cls.from_vocab(
            value("tokenizer.ggml.tokens"),
            value("tokenizer.ggml.merges"),
            value("tokenizer.ggml.token_type"),
            pre=value("tokenizer.ggml.pre", "default"),
            bos_token_id=value("tokenizer.ggml.bos_token_id"),
            eos_token_id=value("tokenizer.ggml.eos_token_id"),
            add_bos_token=bool(value("tokenizer.ggml.add_bos_token", False)),
            add_eos_token=bool(value("tokenizer.ggml.add_eos_token", False)),
            chat_template=value("tokenizer.chat_template"),
            extra_eos_ids=[i for i in end_of_message if i is not None],
        )

    @classmethod
    def from_vocab(
        cls,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int] | None = None,
        *,
        pre: str = "default",
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> Tokenizer:
        """Build a byte-level BPE tokenizer from GGUF-style metadata already in memory.

        `tokens` are spelled in GPT-2's byte alphabet, `merges` are "left right" strings
        in rank order, `token_types` are GGUF token types (3 control, 4 user-defined).
        """
        if pre not in PRE_TOKENIZER_SPLITS:
            raise ValueError(
                f"tokenizer.ggml.pre={pre!r} is not supported; known: {sorted(PRE_TOKENIZER_SPLITS)}"
            )
        vocab = {token: index for index, token in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError(f"the vocabulary repeats tokens: {len(tokens)} entries, {len(vocab)} distinct")
        pairs = [tuple(merge.split(" ")) for merge in merges]
        if bad := next((m for m, p in zip(merges, pairs) if len(p) != 2), None):
            raise ValueError(f"merge {bad!r} is not two tokens separated by one space")

        backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZER_SPLITS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
        # Control tokens are matched whole in any text and dropped by
        # decode(skip_special_tokens=True); user-defined ones are matched whole
        # but always decoded, as llama.cpp treats them.
        types = token_types if token_types is not None else [1] * len(tokens)
        typed = list(zip(tokens, types))
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in typed if k == TOKEN_TYPE_CONTROL]
        )
        backend.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, k in typed if k == TOKEN_TYPE_USER_DEFINED]
        )
        if add_bos_token or add_eos_token:
            backend.post_processor = _bos_eos_processor(tokens, bos_token_id if add_bos_token else None,
                                                        eos_token_id if add_eos_token else None)
        return cls._assemble(backend, bos_token_id, eos_token_id, chat_template, extra_eos_ids)

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike) -> Tokenizer:
        """Build from an HF `tokenizer.json`; the files beside it, when present, add the rest:
        `tokenizer_config.json` (bos/eos, chat template), `chat_template.jinja` (the template
        newer checkpoints keep apart) and `generation_config.json` (every EOS id).

        BOS/EOS insertion is whatever the tokenizer.json's post-processor does.
        """
        path = Path(path)
        backend = Backend.from_file(os.fspath(path))
        config = _read_json(path.with_name("tokenizer_config.json"))
        generation = _read_json(path.with_name("generation_config.json"))

        def token_id(name: str) -> int | None:
            token = config.get(name)
            content = token.get("content") if isinstance(token, dict) else token
            return None if content is None else backend.token_to_id(content)

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        jinja_file = path.with_name("chat_template.jinja")
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")

        eos_id = token_id("eos_token")
        listed = generation.get("eos_token_id", [])
        listed = [listed] if isinstance(listed, int) else listed
        if eos_id is None and listed:
            eos_id = listed[0]
        return cls._assemble(backend, token_id("bos_token"), eos_id, template, listed)

    @classmethod
    def _assemble(cls, backend: Backend, bos_id, eos_id, template, extra_eos_ids) -> Tokenizer:
        eos_ids = {int(i) for i in extra_eos_ids}
        if eos_id is not None:
            eos_ids.add(int(eos_id))
        if template:
            turn_ends = (backend.token_to_id(t) for t in END_OF_TURN_TOKENS if t in template)
            eos_ids.update(i for i in turn_ends if i is not None)
        return cls(
            backend=backend,
            bos_token_id=None if bos_id is None else int(bos_id),
            eos_token_id=None if eos_id is None else int(eos_id),
            eos_token_ids=frozenset(eos_ids),
            chat_template=template or None,
        )

    # -- use ---------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are always
        single ids; `add_special_tokens` adds BOS/EOS only where the checkpoint asks for them."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` with the model's own chat template, as HF's apply_chat_template
        (tokenize=False) does: tokenize the result with `encode`, without added specials."""
        if self._template is None:
            raise ValueError("this tokenizer has no chat template; give prompts as plain text")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.bos_token_id),
            eos_token=self._token_text(self.eos_token_id),
            tools=None,
            documents=None,
        )

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.backend.id_to_token(token_id)


def _bos_eos_processor(
    tokens: Sequence[str], bos_id: int | None, eos_id: int | None
) -> processors.TemplateProcessing:
    marks = {tokens[i]: i for i in (bos_id, eos_id) if i is not None}
    bos = [tokens[bos_id]] if bos_id is not None else []
    eos = [tokens[eos_id]] if eos_id is not None else []
    return processors.TemplateProcessing(single=bos + ["$A"] + eos, special_tokens=list(marks.items()))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    # The same environment HF renders chat templates in: templates are untrusted
    # code from the checkpoint, hence the sandbox; trim/lstrip change whitespace.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
