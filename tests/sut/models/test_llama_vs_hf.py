"""wallperf.sut.models.llama and sut.weights against HF transformers' Llama.

Fast tests build tiny HF Llama models with random weights (GQA, tied and
untied embeddings, llama3 RoPE scaling), save them as sharded safetensors or
as a GGUF written here the way llama.cpp's converter writes it, load them with
our loaders and compare weights and logits to HF's own forward pass. The slow
tests run the real SmolLM2 GGUF against `AutoModelForCausalLM.from_pretrained(
..., gguf_file=...)`: greedy tokens of the engine and of `wallperf generate`
must equal HF's `generate(do_sample=False)`.
"""
import json

import numpy as np
import pytest
import torch
import transformers

from wallperf.sut.models.llama import LlamaConfig as OurLlamaConfig
from wallperf.sut.models.llama import rope_inv_freq
from wallperf.sut.loading.weights import build_model, load_checkpoint, load_gguf, load_hf_checkpoint

# fp32 over 2 tiny layers: measured max abs error about 2.5e-6 on logits up to ~4.
TINY_ATOL = 1e-5


# One torch thread: tiny GEMMs gain nothing from a second on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_hf_config(**overrides) -> transformers.LlamaConfig:
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


TINY_CONFIGS = {
    "untied": dict(),
    # SmolLM2's layout: tied embeddings and a non-default theta.
    "tied": dict(tie_word_embeddings=True, rope_theta=100000.0),
    # Llama 3.1's RoPE scaling. With head_dim 16 and theta 10000 the wavelengths
    # are 6.3, 20, 63, ...: one kept, one interpolated (8..32), the rest divided.
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


def _tiny_hf_model(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(_tiny_hf_config(**overrides)).eval()
    # HF's init (std 0.02, unit norms) gives near-zero logits; make every weight count.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model


def _to_transformers_v4_layout(folder):
    """Rewrite config.json as transformers 4.x (and the published Llama 3.1
    checkpoints) write it: top-level rope_theta and rope_scaling."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = params
    path.write_text(json.dumps(cfg))


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


class _Cache:
    """One of the engine's KV caches, for `rows` sequences of up to max_len
    tokens: the slot cache in slot 1 (a slice) or slots 0 and 2 of 3
    (gathered), or the paged cache with scattered, out-of-order block tables."""

    def __init__(self, kind: str, cfg, rows: int, max_len: int = 64):
        self.kind = kind
        if kind == "slot":
            from wallperf.sut.engine.kv_cache import SlotKVCache

            self.cache = SlotKVCache(cfg.n_layers, 3, cfg.n_kv_heads, max_len, cfg.head_dim, torch.float32)
            self.slots = [1] if rows == 1 else [0, 2]
        else:
            from wallperf.sut.engine.paged_cache import PagedKVCache

            per_row = -(-max_len // 8)
            n_blocks = 2 * rows * per_row
            self.cache = PagedKVCache(cfg.n_layers, n_blocks, 8, cfg.n_kv_heads, cfg.head_dim, torch.float32)
            order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(0)).tolist()
            self.tables = [order[r * per_row:(r + 1) * per_row] for r in range(rows)]

    def forward(self, model, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Our logits at every position of ids (B, T), whose first token is at position `start`."""
        B, T = ids.shape
        positions = torch.arange(start, start + T).expand(B, -1)
        if self.kind == "slot":
            self.cache.bind(self.slots, positions)
        else:
            self.cache.bind(self.tables, positions, torch.ones(B, T, dtype=torch.bool))
        return model(ids, positions, self.cache)


CACHE_KINDS = ("slot", "paged")


@pytest.mark.parametrize("name, layout", [
    *((name, "v4") for name in TINY_CONFIGS),
    # transformers 5 nests rope_theta and the llama3 scaling under rope_parameters.
    *((name, "v5") for name in TINY_CONFIGS),
])
def test_sharded_hf_checkpoint_matches_hf_forward(tmp_path, name, layout):
    hf = _tiny_hf_model(**TINY_CONFIGS[name])
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    if layout == "v4":
        _to_transformers_v4_layout(tmp_path)

    cfg, sd, _ = load_hf_checkpoint(tmp_path)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.tie_embeddings == (name == "tied")
    assert cfg.rope_theta == hf.config.rope_parameters["rope_theta"]
    assert (cfg.rope_scaling is not None) == (name == "llama3")
    model = build_model(cfg, sd, torch.float32)
    if name == "llama3":
        # The table HF actually uses; HF's llama3 init function is the reference.
        torch.testing.assert_close(model.inv_freq, hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)

    T = 40
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, T), generator=g)
    want = _hf_logits(hf, ids)  # (2, T, V)

    for kind in CACHE_KINDS:
        # Prefill of one whole sequence.
        got = _Cache(kind, cfg, rows=1).forward(model, ids[:1])
        torch.testing.assert_close(got, want[:1], atol=TINY_ATOL, rtol=0, msg=kind)
        # Two sequences: prefill 24 tokens, then decode one token per step
        # through the cache; each step against HF's full forward.
        cache = _Cache(kind, cfg, rows=2)
        got = cache.forward(model, ids[:, :24])
        torch.testing.assert_close(got, want[:, :24], atol=TINY_ATOL, rtol=0, msg=kind)
        for t in range(24, T):
            step = cache.forward(model, ids[:, t:t + 1], start=t)[:, 0]
            torch.testing.assert_close(step, want[:, t], atol=TINY_ATOL, rtol=0, msg=f"{kind}: decode at {t}")


def test_llama3_inv_freq_matches_hf_for_llama31_8b():
    """Llama 3.1 8B's real RoPE figures, against HF's llama3 init function."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf_cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                      rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=131072)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = OurLlamaConfig.from_hf_config({
        "num_hidden_layers": 1, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "vocab_size": 128256, "rope_theta": 500000.0, "rope_scaling": scaling,
        "max_position_embeddings": 131072})
    torch.testing.assert_close(rope_inv_freq(ours), want.float(), rtol=1e-6, atol=0)


# -- GGUF: llama.cpp's Q/K permutation ---------------------------------------


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py, LlamaModel.permute: HF rotates a head's two halves
    # together; llama.cpp rotates adjacent pairs, so rows are interleaved.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _write_tiny_gguf(path, hf: transformers.LlamaForCausalLM) -> dict:
    """A float32 GGUF as llama.cpp's converter would write the HF model; returns HF's state dict."""
    import gguf

    c = hf.config
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    for name, t in sd.items():
        a = t.numpy().astype(np.float32)
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            if module == "self_attn.q_proj":
                a = _llama_cpp_permute(a, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                a = _llama_cpp_permute(a, c.num_key_value_heads)
            gguf_name = f"blk.{i}.{_GGUF_NAMES[module]}.{suffix}"
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[name]
        w.add_tensor(gguf_name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_unpermutes_q_and_k_to_hf_layout(tmp_path, tied):
    hf = _tiny_hf_model(seed=3, tie_word_embeddings=tied, rope_theta=100000.0, rms_norm_eps=1e-6)
    want = _write_tiny_gguf(tmp_path / "tiny.gguf", hf)

    cfg, sd, meta = load_gguf(tmp_path / "tiny.gguf")
    assert meta["general.architecture"] == "llama"
    assert (cfg.n_layers, cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_size, cfg.vocab_size) == (
        2, 64, 4, 2, 96, 128)
    assert cfg.head_dim == 16 and cfg.tie_embeddings == tied
    assert cfg.rope_theta == 100000.0 and cfg.rms_eps == pytest.approx(1e-6)
    assert sorted(sd) == sorted(want)
    for name, t in want.items():
        assert sd[name].dtype == torch.float32
        assert torch.equal(sd[name], t), name

    # And the model built from it computes HF's logits.
    model = build_model(*load_checkpoint(tmp_path / "tiny.gguf")[:2], torch.float32)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(4))
    got = _Cache("paged", cfg, rows=1).forward(model, ids)
    torch.testing.assert_close(got, _hf_logits(hf, ids), atol=TINY_ATOL, rtol=0)


# -- the real SmolLM2 model (slow) -------------------------------------------

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Translate 'good morning' into Spanish.",
    "What is 17 * 23?",
    "Describe how a bicycle works.",
]

# Measured on SmolLM2-135M fp32 (these prompts): max abs difference of the
# last-position logits 3.0e-5..5.8e-5 (9.4e-5 over all positions), logits up
# to ~38: summation order alone. A real mistake (RoPE, norm, GQA) gives > 1.
SMOLLM2_LOGIT_ATOL = 2e-4


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    """Our float32 model and HF's, both from the same GGUF (loaded once)."""
    from wallperf.sut.loading.load import load_model

    ours = load_model(smollm2_gguf_path, "float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name, dtype=torch.float32).eval()
    return ours, hf


def _chat_ids(tok, text: str) -> list:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def _hf_greedy(hf, prompts: list, max_new_tokens: int, eos: int) -> list:
    """HF generate(do_sample=False) on a left-padded batch; each row up to and including EOS."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[eos] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=eos, pad_token_id=eos)
    rows = []
    for row in out[:, longest:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.mark.slow
def test_smollm2_greedy_tokens_and_logits_match_hf(smollm2):
    from wallperf.sut.engine.engine import Engine, SamplingParams

    ours, hf = smollm2
    tok = ours.tokenizer
    eos = hf.generation_config.eos_token_id
    assert tok.eos_token_ids == {eos}
    prompts = [_chat_ids(tok, p) for p in PROMPTS]

    want = _hf_greedy(hf, prompts, 64, eos)
    model = ours.model
    for text, ids, expected in zip(PROMPTS, prompts, want):
        engine = Engine(model, tok.eos_token_ids, max_batch=1, max_seq_len=len(ids) + 64)
        assert engine.generate(ids, SamplingParams(max_new_tokens=64)) == expected, text

        got = _Cache("paged", model.cfg, rows=1, max_len=len(ids)).forward(model, torch.tensor([ids]))[0, -1]
        ref = _hf_logits(hf, torch.tensor([ids]))[0, -1]
        torch.testing.assert_close(got, ref, atol=SMOLLM2_LOGIT_ATOL, rtol=0, msg=text)
    # The prompts exercise both ways to stop: EOS, and the max_new_tokens cap.
    assert any(t[-1] == eos for t in want)
    assert any(len(t) == 64 and eos not in t for t in want)


@pytest.mark.slow
def test_cli_generate_json_matches_hf(smollm2, smollm2_gguf_path, monkeypatch, capsys):
    import wallperf.sut.loading.load
    from wallperf.cli import main

    ours, hf = smollm2

    def cached_load_model(path, dtype):
        # The CLI's own loading path is load_model, tested above; reuse its result.
        assert path == smollm2_gguf_path and dtype == "float32"
        return ours

    monkeypatch.setattr(wallperf.sut.loading.load, "load_model", cached_load_model)
    assert main(["generate", "--prompt", "Name three colors of the rainbow.", "--json",
                 "--max-new-tokens", "16", "--model", str(smollm2_gguf_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["prompt_tokens"] == _chat_ids(ours.tokenizer, "Name three colors of the rainbow.")
    eos = hf.generation_config.eos_token_id
    assert printed["output_tokens"] == _hf_greedy(hf, [printed["prompt_tokens"]], 16, eos)[0]
    assert printed["text"] == ours.tokenizer.decode(printed["output_tokens"])
