"""HF transformers as a backend: LlamaForCausalLM (Qwen2ForCausalLM for a model
with Q/K/V biases) over the weights the native
engine loaded, batched the way HF users batch: static batches.

A batch is up to max_batch waiting requests, left-padded to the longest prompt
with an attention mask, prefilled in one forward pass and then decoded one
token per step through HF's KV cache until every row has finished. This is
`generate()`'s batching taken one step at a time, so LoadGen sees each token as
it comes. Finished rows stay in the batch (their tokens are computed and
dropped) until the whole batch is done; requests that arrive meanwhile wait for
the next batch.

The HF model shares the native model's tensors: the fused QKV and gate/up
weights are split back into HF's separate projections as views, so no weight is
copied and both engines run exactly the same numbers.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from wallperf.sut.engine.engine import EngineStats, SamplingParams, TokenEvent, checked_prompt
from wallperf.sut.models.llama import LlamaModel


def hf_config(cfg, dtype: torch.dtype):
    """transformers.LlamaConfig for our LlamaConfig; Qwen2Config when it has Q/K/V
    biases (Llama's attention_bias would add one to o_proj as well)."""
    import transformers

    if cfg.attention_bias:
        if cfg.rope_scaling is not None or cfg.head_dim != cfg.hidden_size // cfg.n_heads:
            raise ValueError("the hf backend's Qwen2 has no RoPE scaling and head_dim = hidden / heads")
        return transformers.Qwen2Config(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            max_position_embeddings=cfg.max_position, rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_embeddings, use_sliding_window=False, dtype=dtype)

    scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position}
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position, rms_norm_eps=cfg.rms_eps,
        rope_theta=cfg.rope_theta, rope_scaling=scaling, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, mlp_bias=False, dtype=dtype)


def hf_state_dict(model: LlamaModel) -> dict:
    """Our model's weights under HF names, QKV and gate/up split back (views, no copies)."""
    cfg = model.cfg
    sd = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    sd["lm_head.weight"] = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.self_attn.qkv_proj.weight.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
        if cfg.attention_bias:
            biases = layer.self_attn.qkv_proj.bias.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
            sd.update({p + f"self_attn.{n}_proj.bias": b for n, b in zip("qkv", biases)})
        gate, up = layer.mlp.gate_up_proj.weight.split([cfg.ffn_size, cfg.ffn_size])
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": layer.self_attn.o_proj.weight,
                   p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": layer.mlp.down_proj.weight,
                   p + "input_layernorm.weight": layer.input_layernorm.weight,
                   p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight})
    return sd


def build_hf_model(model: LlamaModel, device="cpu"):
    """transformers.LlamaForCausalLM (or Qwen2ForCausalLM) on our model's weights, in their dtype."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    if type(model) is not LlamaModel:
        raise ValueError(f"the hf backend runs dense Llama-family models, not {type(model).__name__}")
    dtype = model.embed_tokens.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the hf backend runs float32, bfloat16 or float16 weights, not {dtype}")
    config = hf_config(model.cfg, dtype)
    qwen2 = model.cfg.attention_bias
    with torch.device("meta"):
        hf = (transformers.Qwen2ForCausalLM if qwen2 else transformers.LlamaForCausalLM)(config)
    hf.load_state_dict({k: v.detach() for k, v in hf_state_dict(model).items()}, strict=True, assign=True)
    # The RoPE table is a buffer, built on meta with the module: build it for real.
    with torch.device(device):
        hf.model.rotary_emb = (Qwen2RotaryEmbedding if qwen2 else LlamaRotaryEmbedding)(config)
    return hf.to(device).eval()


@dataclass(slots=True)
class _Row:
    request_id: int
    prompt_ids: list
    params: SamplingParams
    output_ids: list = field(default_factory=list)
    finished: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class _Batch:
    rows: list
    # (B, T): 0 over the left padding, 1 over prompt and generated tokens.
    attention_mask: torch.Tensor
    # (B,) position of each row's last token.
    positions: torch.Tensor
    cache: object
    # (B, 1) the token each row feeds next.
    next_ids: torch.Tensor | None = None


class HFBackend:
    name = "hf"

    @classmethod
    def create(cls, loaded, *, max_batch: int, max_seq_len: int, **_):
        return cls(loaded, max_batch=max_batch, max_seq_len=max_seq_len)

    def __init__(self, loaded, max_batch: int, max_seq_len: int):
        self.model = build_hf_model(loaded.model, loaded.device)
        self.device = torch.device(loaded.device)
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = torch.tensor(sorted(loaded.tokenizer.eos_token_ids), dtype=torch.long)
        self._eos_set = frozenset(loaded.tokenizer.eos_token_ids)
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len, loaded.config.max_position)
        self.waiting: deque[_Row] = deque()
        self.batch: _Batch | None = None
        self._decode_steps = self._decode_tokens = self._decode_context = 0

    @property
    def free_slots(self) -> int:
        """Requests the next batch can still take (the running batch is closed)."""
        return self.max_batch - len(self.waiting)

    @property
    def stats(self) -> EngineStats:
        """Decode figures count the rows that produced a token, not finished rows carried along."""
        return EngineStats(0, 0, 0, self._decode_steps, self._decode_tokens, self._decode_context)

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or self.batch is not None

    def add_request(self, request_id: int, prompt_ids, params: SamplingParams) -> None:
        prompt = checked_prompt(request_id, prompt_ids, params, self.max_seq_len)
        self.waiting.append(_Row(request_id, prompt, params))

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One forward pass: the prefill of a new batch, or one decode step of the running one."""
        if self.batch is None:
            if not self.waiting:
                return []
            return self._prefill()
        return self._decode()

    def _forward(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        b = self.batch
        # The cache goes by position: transformers 4.x names it past_key_values, 5.x cache.
        out = self.model(ids.to(self.device), b.attention_mask.to(self.device), position_ids.to(self.device),
                         b.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()  # (B, V)

    def _prefill(self) -> list[TokenEvent]:
        from transformers import DynamicCache

        rows = [self.waiting.popleft() for _ in range(min(self.max_batch, len(self.waiting)))]
        width = max(len(r.prompt_ids) for r in rows)
        pad = int(self.eos_token_ids[0])
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        # Positions count real tokens only, so a row's RoPE ignores its padding.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        self.batch = _Batch(rows, mask, position_ids[:, -1], DynamicCache(config=self.model.config))
        return self._sample(self._forward(ids, position_ids))

    def _decode(self) -> list[TokenEvent]:
        b = self.batch
        active = [r for r in b.rows if not r.finished]
        self._decode_steps += 1
        self._decode_tokens += len(active)
        self._decode_context += sum(r.length for r in active)
        b.attention_mask = torch.cat([b.attention_mask, torch.ones(len(b.rows), 1, dtype=torch.long)], dim=1)
        b.positions = b.positions + 1
        return self._sample(self._forward(b.next_ids, b.positions.unsqueeze(1)))

    def _sample(self, logits: torch.Tensor) -> list[TokenEvent]:
        """Greedy choice per row; rows short of min_new_tokens cannot pick EOS; finished rows emit nothing."""
        b = self.batch
        suppress = [i for i, r in enumerate(b.rows) if len(r.output_ids) < r.params.min_new_tokens]
        if suppress:
            logits[torch.tensor(suppress).unsqueeze(1), self.eos_token_ids.to(logits.device)] = float("-inf")
        tokens = logits.argmax(dim=-1).cpu()
        b.next_ids = tokens.unsqueeze(1)
        events = []
        for row, tok in zip(b.rows, tokens.tolist()):
            if row.finished:
                continue
            row.output_ids.append(tok)
            n = len(row.output_ids)
            row.finished = (n >= row.params.max_new_tokens
                            or (not row.params.ignore_eos and tok in self._eos_set)
                            or row.length >= self.max_seq_len)
            events.append(TokenEvent(row.request_id, tok, n, row.finished))
        if all(r.finished for r in b.rows):
            self.batch = None
        return events
