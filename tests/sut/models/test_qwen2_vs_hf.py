"""Qwen2 (the Llama block with Q/K/V biases and an untied head) against HF
transformers' Qwen2.

Fast tests build a tiny HF Qwen2 with random weights, save it as safetensors and
as a GGUF written the way llama.cpp's converter writes qwen2 (no Q/K row
permutation, biases as `attn_{q,k,v}.bias`), and compare our logits with HF's.
The slow tests run the real Qwen2.5-Coder GGUFs against HF: the 0.5B against
`AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` (tokenizer, greedy
tokens and logits in float32); the 1.5B against HF's tokenizer from the GGUF and
HF's Qwen2ForCausalLM on our loaded weights (greedy tokens and logits in
float32, MMLU answers in bf16). Memory stays near one float32 copy of a model
(6 GB for the 1.5B): HF's copy of the 0.5B is freed before ours is built.
"""
import gc
import json

import numpy as np
import pytest
import torch
import transformers

from wallperf.sut.engine.paged_cache import PagedKVCache
from wallperf.sut.loading.weights import build_model, load_checkpoint, load_hf_checkpoint

# fp32 over 2 tiny layers, as for the tiny Llama (measured ~3e-6).
TINY_ATOL = 1e-5
# The tolerance used for SmolLM2 (summation order alone; a real mistake gives > 1).
LOGIT_ATOL = 2e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_hf_qwen2(seed: int = 0) -> transformers.Qwen2ForCausalLM:
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:  # biases too: HF initialises them to zero, which would test nothing
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model


def _ours_logits(model, ids: torch.Tensor) -> torch.Tensor:
    cfg = model.cfg
    T = ids.shape[1]
    cache = PagedKVCache(cfg.n_layers, -(-T // 8), 8, cfg.n_kv_heads, cfg.head_dim, torch.float32)
    positions = torch.arange(T)[None]
    cache.bind([list(range(-(-T // 8)))], positions, torch.ones(1, T, dtype=torch.bool))
    return model(ids, positions, cache)


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


_GGUF_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def _write_qwen2_gguf(path, hf) -> None:
    """A float32 GGUF as llama.cpp's converter writes a qwen2 model: HF's rows as they are."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    for name, t in hf.state_dict().items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            name = f"blk.{i}.{_GGUF_BLOCK[module]}.{suffix}"
        else:
            name = _GGUF_TOP[name]
        w.add_tensor(name, np.ascontiguousarray(t.detach().numpy().astype(np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("source", ["safetensors", "gguf"])
def test_tiny_qwen2_matches_hf_forward(tmp_path, source):
    hf = _tiny_hf_qwen2()
    if source == "gguf":
        _write_qwen2_gguf(tmp_path / "tiny.gguf", hf)
        cfg, sd, meta = load_checkpoint(tmp_path / "tiny.gguf")
        assert meta["general.architecture"] == "qwen2"
    else:
        hf.save_pretrained(tmp_path, safe_serialization=True)
        cfg, sd, _ = load_hf_checkpoint(tmp_path)
    assert cfg.attention_bias and not cfg.tie_embeddings
    assert cfg.rope_theta == 1e6 and cfg.rms_eps == pytest.approx(1e-6)
    for name in ("q", "k", "v"):
        torch.testing.assert_close(sd[f"model.layers.1.self_attn.{name}_proj.bias"],
                                   hf.state_dict()[f"model.layers.1.self_attn.{name}_proj.bias"], atol=0, rtol=0)
    model = build_model(cfg, sd, torch.float32)
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_ours_logits(model, ids), _hf_logits(hf, ids), atol=TINY_ATOL, rtol=0)


def test_bf16_export_keeps_the_biases_and_the_untied_head(tmp_path):
    """`wallperf export-gguf` of a qwen2 GGUF: what llama.cpp runs is the native bf16 weights."""
    from wallperf.tools.gguf_export import export_gguf

    _write_qwen2_gguf(tmp_path / "tiny.gguf", _tiny_hf_qwen2(seed=4))
    export_gguf(tmp_path / "tiny.gguf", tmp_path / "tiny.bf16.gguf")
    _, source, _ = load_checkpoint(tmp_path / "tiny.gguf")
    cfg, exported, meta = load_checkpoint(tmp_path / "tiny.bf16.gguf")
    assert meta["general.architecture"] == "qwen2" and cfg.attention_bias and not cfg.tie_embeddings
    assert sorted(exported) == sorted(source)
    for name, t in source.items():
        # 1-D tensors (norms, biases) stay float32; matrices are rounded to bf16.
        want = t if t.dim() == 1 else t.bfloat16().float()
        assert torch.equal(exported[name], want), name


def test_tiny_qwen2_without_biases_is_refused_nothing_silently(tmp_path):
    """A bias tensor the config did not ask for is an error, never dropped."""
    hf = _tiny_hf_qwen2()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(model_type="llama", attention_bias=False)
    cfg_path.write_text(json.dumps(cfg))
    ours_cfg, sd, _ = load_hf_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="unexpected weights.*bias"):
        build_model(ours_cfg, sd, torch.float32)


# -- the real Qwen2.5-Coder models (slow) -------------------------------------

# Written for these tests: code, reasoning and plain questions, in two languages.
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Explain in two sentences what a hash map is.",
    "Écris une phrase courte sur la montagne.",
    "What does `git rebase -i HEAD~3` do?",
]
NEW_TOKENS = 24

TOKENIZER_TEXTS = [
    "def add(a, b):\n    return a + b\n\n\nclass Foo(Bar):\n\tpass  # tab and comment",
    "Prices: 1234567 + 3.14159 = 1234570.14159; 10,000 items at 99% off!",
    "naïve café (NFC) vs nai\u0308ve cafe\u0301 (NFD); Ünïcödé ß ẞ",
    "中文分词测试，日本語のテキスト、한국어 문장 🙂👍🏽 ∑∫√",
    "   leading spaces, trailing   \n\n\r\n  mixed\u00a0nbsp\u2003em-space",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they'll say it's fine, we've done it; she'd agree. DON'T SHOUT'S",
    "x=[i**2 for i in range(10) if i%2==0]; print(f\"{x!r:>20}\")",
]


def _hf_reference(hf, tok, mmlu_questions=(), prompts=PROMPTS) -> dict:
    """HF's greedy tokens and last-position logits on the chat `prompts`, and its
    tokenization of TOKENIZER_TEXTS and of the chats (`tok`: HF's tokenizer from the
    GGUF); with `mmlu_questions`, its letter log-probabilities for each."""
    from wallperf.audit.mmlu import LETTERS, build_context

    chats = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    ref = {"prompts": list(prompts), "chats": chats, "eos": tok.eos_token_id,
           "texts": [tok.encode(t, add_special_tokens=False) for t in TOKENIZER_TEXTS + chats],
           "greedy": [], "logits": [], "mmlu": []}
    for chat in chats:
        ids = torch.tensor([tok.encode(chat, add_special_tokens=False)])
        with torch.no_grad():
            out = hf.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS,
                              eos_token_id=ref["eos"], pad_token_id=ref["eos"])[0, ids.shape[1]:].tolist()
            ref["logits"].append(hf(ids).logits[0, -1].float())
        ref["greedy"].append(out[:out.index(ref["eos"]) + 1] if ref["eos"] in out else out)
    letters = [tok.encode(f" {x}", add_special_tokens=False)[0] for x in LETTERS]
    for q in mmlu_questions:
        ids = torch.tensor([tok.encode(build_context(q, "letter"), add_special_tokens=False)])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0, -1].double(), -1)
        ref["mmlu"].append([float(logp[i]) for i in letters])
    return ref


def _check_against_reference(ref: dict, ours) -> None:
    from wallperf.sut.engine.engine import Engine, SamplingParams

    tok = ours.tokenizer
    assert [tok.encode(t) for t in TOKENIZER_TEXTS + ref["chats"]] == ref["texts"]
    assert tok.eos_token_ids == {ref["eos"]}
    for prompt, chat, want, logits in zip(ref["prompts"], ref["chats"], ref["greedy"], ref["logits"]):
        assert tok.apply_chat_template([{"role": "user", "content": prompt}]) == chat
        ids = tok.encode(chat)
        engine = Engine(ours.model, tok.eos_token_ids, max_batch=1, max_seq_len=len(ids) + NEW_TOKENS)
        assert engine.generate(ids, SamplingParams(max_new_tokens=NEW_TOKENS)) == want, prompt
        got = _ours_logits(ours.model, torch.tensor([ids]))[0, -1]
        torch.testing.assert_close(got, logits, atol=LOGIT_ATOL, rtol=0, msg=prompt)


def _gguf(name: str):
    from wallperf.harness.artifacts import resolve_model_file
    from wallperf.harness.config import load_model_config

    path = resolve_model_file(load_model_config(name))
    return path, transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.slow
@pytest.mark.usefixtures("all_torch_threads")
def test_qwen2_5_coder_0_5b_tokens_greedy_and_logits_match_hf():
    """HF's own GGUF loader is the reference here: weights, architecture, tokenizer."""
    from wallperf.sut.loading.load import load_model

    path, tok = _gguf("qwen2.5-coder-0.5b")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    # The code prompt and the French one (the tokenizer texts cover the rest of Unicode): each
    # prompt's greedy tokens cost a 24-token generation on both sides.
    ref = _hf_reference(hf, tok, prompts=PROMPTS[:3:2])
    del hf
    gc.collect()
    _check_against_reference(ref, load_model(path, "float32"))


@pytest.mark.slow
@pytest.mark.usefixtures("all_torch_threads")
def test_qwen2_5_coder_1_5b_matches_hf_in_float32_and_mmlu_in_bf16(mmlu_path):
    """HF's Qwen2ForCausalLM over the weights we loaded (views, so one 6 GB copy in
    float32, not two: HF's GGUF loader holds the model twice while it loads). The
    0.5B test above checks the same GGUF reading (qwen2 keys, Q4_K/Q6_K, biases)
    against HF's loader on every prompt; here the first one keeps CI's time (greedy
    decoding of a 1.5B in float32 is most of this test's minutes).

    Then the same weights rounded to bf16, as a bf16 load rounds them: our bf16 engine's
    MMLU answers, question by question, against HF over those rounded weights computing
    in float32 (HF's bf16 matmuls have no fast path on a CPU without AVX512-BF16, and took
    25 s a question here; in float32, 10 s, and the log-probabilities differ from its bf16
    ones by ~0.05)."""
    from wallperf.audit.mmlu import evaluate
    from wallperf.harness.loadgen.qsl import load_mmlu
    from wallperf.sut.backends.hf import build_hf_model
    from wallperf.sut.loading.load import LoadedModel, load_model

    path, tok = _gguf("qwen2.5-coder-1.5b")
    ours = load_model(path, "float32")
    _check_against_reference(_hf_reference(build_hf_model(ours.model), tok, prompts=PROMPTS[:1]), ours)
    for p in ours.model.parameters():
        p.data = p.data.to(torch.bfloat16)
    bf16 = LoadedModel(path, ours.config, ours.model, ours.tokenizer, "bfloat16")
    questions = load_mmlu(mmlu_path)[::5612][:2]  # spread over the file, hence over subjects
    result = evaluate(bf16, questions, "letter", progress=False)
    for p in ours.model.parameters():  # exact: every bf16 value is a float32 value
        p.data = p.data.float()
    want = _hf_reference(build_hf_model(ours.model), tok, questions, prompts=())["mmlu"]
    for q, scored, expected in zip(questions, result.questions, want):
        assert scored.predicted == int(np.argmax(expected)), (q.question, scored.loglikelihoods, expected)
        # bf16 activations against float32 ones: ~0.05 nats on log-probabilities near -1 (measured).
        assert scored.loglikelihoods == pytest.approx(expected, abs=0.15)
