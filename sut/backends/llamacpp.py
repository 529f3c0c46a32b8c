"""llama.cpp as a backend, in process through llama-cpp-python, over a GGUF file.

llama.cpp runs the GGUF as stored (SmolLM2's Q4_1 blocks, or a BF16 export:
harness/tools/gguf_export.py) on its own kernels. This backend batches the way
llama.cpp's own server does: one llama.cpp context with a sequence id per
request (up to max_batch), and each `step()` is one `llama_decode` of a batch
holding the next token of every running sequence and the whole prompt of each
request admitted this step (continuous batching). A finished sequence's KV
cells are released at once and its slot taken by the next waiting request.

It uses llama-cpp-python's low-level API (the `llama_cpp` module, a mirror of
llama.h), since `llama_cpp.Llama` keeps one sequence per context. Decoding is
greedy over the logits llama.cpp returns, with EOS (our tokenizer's, from the
same GGUF) suppressed below min_new_tokens, as in the native engine.
"""
from __future__ import annotations

import logging
import weakref
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wallperf.sut.engine.engine import EngineStats, SamplingParams, TokenEvent, checked_prompt
from wallperf.sut.loading.load import reading_checkpoint, unreadable_checkpoint
from wallperf.sut.models.llama import LlamaConfig
from wallperf.sut.loading.tokenizer import Tokenizer

# llama.cpp's KV cache is float16 unless a context asks otherwise.
KV_BYTES_PER_ELEMENT = 2


@dataclass(frozen=True)
class GGUFModel:
    """What a llama.cpp run needs of a model: its GGUF file, config, tokenizer and
    the bytes its weights take as stored."""

    path: Path
    config: LlamaConfig
    tokenizer: Tokenizer
    # Every tensor's bytes in the file; a tied LM head is token_embd, counted once.
    weight_bytes: int
    # Of those, the input embedding table's (token_embd) when the model has its own
    # LM head (output.weight): a step gathers a few rows of it, not the whole table.
    # 0 when tied: the table is then the head, read whole every step.
    table_bytes: int
    # {GGML type name: tensor count}, e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1}.
    tensor_types: dict
    device: str = "cpu"
    model: None = None
    quantization: None = None

    @property
    def weight_format(self) -> str:
        """The GGML types of the 2-D weights, most common first: 'gguf Q4_1+Q8_0'."""
        return "gguf " + "+".join(self.tensor_types)


def load_gguf_model(path: Path) -> GGUFModel:
    """A GGUF's config, tokenizer and tensor bytes; a file that cannot be read is a
    CheckpointError naming it."""
    from gguf.constants import GGMLQuantizationType

    from wallperf.sut.loading.gguf_file import GGUFFile

    with reading_checkpoint(Path(path)):
        reader = GGUFFile(path)
        names = {t.name for t in reader.tensors}
        cfg = LlamaConfig.from_gguf_metadata(reader.metadata, names)
        types = Counter(GGMLQuantizationType(t.ggml_type).name for t in reader.tensors if len(t.shape) > 1)
        untied = "output.weight" in names
        return GGUFModel(Path(path), cfg, Tokenizer.from_gguf(reader),
                         weight_bytes=sum(int(t.data.nbytes) for t in reader.tensors),
                         table_bytes=sum(int(t.data.nbytes) for t in reader.tensors
                                         if untied and t.name == "token_embd.weight"),
                         tensor_types=dict(types.most_common()))


class LlamaCppContext:
    """A llama.cpp model and context with room for `n_seq` sequences of `seq_len` tokens."""

    def __init__(self, path: Path, n_seq: int, seq_len: int, n_batch: int, n_threads: int):
        import llama_cpp as lc

        self.lc = lc
        # llama-cpp-python routes llama.cpp's log through this logger: keep errors only.
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        if not self.model:
            raise unreadable_checkpoint(path, "llama.cpp could not load it")
        params = lc.llama_context_default_params()
        params.n_ctx = n_seq * seq_len
        params.n_seq_max = n_seq
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)
        params.n_threads = params.n_threads_batch = n_threads
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context of {n_seq} x {seq_len} tokens")
        self.memory = lc.llama_get_memory(self.ctx)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self.capacity = n_batch

    def decode(self, tokens: list, positions: list, seq_ids: list, logits_at: list) -> list[np.ndarray]:
        """Run one batch; float32 logits (copies) at the batch indices `logits_at`."""
        b = self.batch
        if len(tokens) > self.capacity:
            raise ValueError(f"a batch of {len(tokens)} tokens exceeds n_batch {self.capacity}")
        want = set(logits_at)
        for j, (tok, pos, seq) in enumerate(zip(tokens, positions, seq_ids)):
            b.token[j], b.pos[j], b.n_seq_id[j] = tok, pos, 1
            b.seq_id[j][0] = seq
            b.logits[j] = j in want
        b.n_tokens = len(tokens)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return [np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, j), shape=(self.n_vocab,)).copy()
                for j in logits_at]

    def forget(self, seq: int) -> None:
        """Free a sequence's KV cells."""
        self.lc.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def close(self) -> None:
        if self.ctx:
            self.lc.llama_batch_free(self.batch)
            self.lc.llama_free(self.ctx)
            self.lc.llama_model_free(self.model)
            self.ctx = self.model = None


@dataclass(slots=True)
class _Seq:
    request_id: int
    prompt_ids: list
    params: SamplingParams
    slot: int = -1
    output_ids: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class LlamaCppBackend:
    name = "llamacpp"

    @classmethod
    def create(cls, loaded: "GGUFModel", *, max_batch: int, max_seq_len: int, **_):
        return cls(loaded, max_batch=max_batch, max_seq_len=max_seq_len)

    def __init__(self, loaded: GGUFModel, max_batch: int, max_seq_len: int, n_threads: int | None = None):
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = sorted(loaded.tokenizer.eos_token_ids)
        self._eos_set = frozenset(self.eos_token_ids)
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len, loaded.config.max_position)
        # One prompt and every running sequence's next token always fit in one batch.
        self._ctx = LlamaCppContext(loaded.path, max_batch, self.max_seq_len, self.max_seq_len + max_batch,
                                    n_threads or torch.get_num_threads())
        self._finalizer = weakref.finalize(self, self._ctx.close)
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self._free = list(range(max_batch))
        self._decode_steps = self._decode_tokens = self._decode_context = 0

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.running) - len(self.waiting)

    @property
    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, self._decode_steps, self._decode_tokens, self._decode_context)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def close(self) -> None:
        self._finalizer()

    def add_request(self, request_id: int, prompt_ids, params: SamplingParams) -> None:
        prompt = checked_prompt(request_id, prompt_ids, params, self.max_seq_len)
        self.waiting.append(_Seq(request_id, prompt, params))

    def step(self) -> list[TokenEvent]:
        """One llama_decode: a token for each running sequence, and the prompts admitted now."""
        tokens, positions, seq_ids, logits_at = [], [], [], []
        decoding = list(self.running)
        for s in decoding:
            logits_at.append(len(tokens))
            tokens.append(s.output_ids[-1])
            positions.append(s.length - 1)
            seq_ids.append(s.slot)
        while self.waiting and self._free and len(tokens) + len(self.waiting[0].prompt_ids) <= self._ctx.capacity:
            s = self.waiting.popleft()
            s.slot = self._free.pop()
            n = len(s.prompt_ids)
            tokens += s.prompt_ids
            positions += range(n)
            seq_ids += [s.slot] * n
            logits_at.append(len(tokens) - 1)
            self.running.append(s)
        sampled = decoding + self.running[len(decoding):]
        if not tokens:
            return []
        logits = self._ctx.decode(tokens, positions, seq_ids, logits_at)
        if decoding:
            self._decode_steps += 1
            self._decode_tokens += len(decoding)
            self._decode_context += sum(s.length for s in decoding)
        return [self._sample(s, row) for s, row in zip(sampled, logits)]

    def _sample(self, s: _Seq, logits: np.ndarray) -> TokenEvent:
        if len(s.output_ids) < s.params.min_new_tokens:
            logits[self.eos_token_ids] = -np.inf
        tok = int(logits.argmax())
        s.output_ids.append(tok)
        n = len(s.output_ids)
        done = (n >= s.params.max_new_tokens or (not s.params.ignore_eos and tok in self._eos_set)
                or s.length >= self.max_seq_len)
        if done:
            self.running.remove(s)
            self._ctx.forget(s.slot)
            self._free.append(s.slot)
        return TokenEvent(s.request_id, tok, n, done)
