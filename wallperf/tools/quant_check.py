"""How far fp8 weights move a model from its published format: `wallperf quant-check`.

Two copies of the same checkpoint in bf16, one with its projections quantized
to fp8 (activations stay bf16), read the same MMLU prompts. Compared at every
prompt position: does the top-1 token agree, how far apart are the logits, and
KL(bf16 || fp8) of the next-token distributions; then, on a few prompts, how
many greedy tokens the two generate before they first differ. These measure
the quantization itself; MMLU accuracy (audit) measures what it costs.
"""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from wallperf.sut.engine.engine import Engine, SamplingParams
from wallperf.sut.engine.kv_cache import SlotKVCache
from wallperf.sut.quant.fp8 import FP8_DTYPES, quantize_model_


@dataclass(frozen=True)
class LogitStats:
    """Sums over positions, so prompts of any length add up; `summary` divides."""

    positions: int
    top1_agree: int
    abs_error_sum: float
    abs_error_count: int
    abs_error_max: float
    kl_sum: float

    def __add__(self, other: "LogitStats") -> "LogitStats":
        return LogitStats(self.positions + other.positions, self.top1_agree + other.top1_agree,
                          self.abs_error_sum + other.abs_error_sum, self.abs_error_count + other.abs_error_count,
                          max(self.abs_error_max, other.abs_error_max), self.kl_sum + other.kl_sum)

    def summary(self) -> dict:
        return {"positions": self.positions,
                "top1_agreement": self.top1_agree / self.positions,
                "mean_abs_logit_error": self.abs_error_sum / self.abs_error_count,
                "max_abs_logit_error": self.abs_error_max,
                "mean_kl": self.kl_sum / self.positions}


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> LogitStats:
    """Reference vs candidate logits (T, V), each row a next-token distribution."""
    ref, cand = reference.double(), candidate.double()
    err = (ref - cand).abs()
    log_p, log_q = F.log_softmax(ref, dim=-1), F.log_softmax(cand, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # KL(reference || candidate) per position
    return LogitStats(ref.shape[0], int((ref.argmax(-1) == cand.argmax(-1)).sum()), float(err.sum()),
                      err.numel(), float(err.max()), float(kl.sum()))


def prompt_logits(model, prompts, batch: int = 4) -> Iterator[torch.Tensor]:
    """Float32 logits (T_i, V) at every position of each prompt, in order.

    Prompts go `batch` at a time, right-padded: a position attends only to those
    before it, so padding changes no real position, and an emulated fp8 model
    dequantizes its weights once per batch rather than once per prompt.
    """
    cfg = model.cfg
    for start in range(0, len(prompts), batch):
        group = prompts[start:start + batch]
        longest = max(len(p) for p in group)
        ids = torch.zeros(len(group), longest, dtype=torch.long)  # (B, T)
        for row, p in enumerate(group):
            ids[row, :len(p)] = torch.as_tensor(p, dtype=torch.long)
        positions = torch.arange(longest).expand(len(group), -1)
        cache = SlotKVCache(cfg.n_layers, len(group), cfg.n_kv_heads, longest, cfg.head_dim,
                            model.embed_tokens.weight.dtype)
        cache.bind(list(range(len(group))), positions)
        logits = model(ids, positions, cache)  # (B, T, V)
        yield from (logits[row, :len(p)] for row, p in enumerate(group))


def greedy_tokens(model, eos_token_ids, prompts, n_tokens: int) -> list[list[int]]:
    """The first `n_tokens` greedy tokens of each prompt, decoded as one batch; EOS
    is ignored so that both models generate as many."""
    engine = Engine(model, eos_token_ids, max_batch=len(prompts),
                    max_seq_len=max(len(p) for p in prompts) + n_tokens)
    outputs = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        engine.add_request(i, list(map(int, p)), SamplingParams(n_tokens, ignore_eos=True))
    while engine.has_unfinished():
        for event in engine.step():
            outputs[event.request_id].append(event.token_id)
    return outputs


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare_models(reference, candidate, prompts, eos_token_ids, n_greedy: int, greedy_len: int) -> dict:
    """Logit statistics over every prompt; greedy agreement over the first `n_greedy`.

    After the first differing token the two continuations read different
    contexts, so greedy agreement counts the common prefix, not matching positions.
    """
    stats = LogitStats(0, 0, 0.0, 0, 0.0, 0.0)
    # Generators, zipped: one batch of each model's logits in memory at a time.
    for ref, cand in zip(prompt_logits(reference, prompts), prompt_logits(candidate, prompts)):
        stats = stats + compare_logits(ref, cand)
    prefixes = []
    if n_greedy:
        pairs = zip(greedy_tokens(reference, eos_token_ids, prompts[:n_greedy], greedy_len),
                    greedy_tokens(candidate, eos_token_ids, prompts[:n_greedy], greedy_len))
        prefixes = [common_prefix(a, b) for a, b in pairs]
    return {"prompts": len(prompts), **stats.summary(),
            "greedy_prompts": len(prefixes), "greedy_tokens": greedy_len,
            "greedy_prefix_agreement": sum(prefixes) / (len(prefixes) * greedy_len) if prefixes else None,
            "greedy_identical": sum(p == greedy_len for p in prefixes)}


def mmlu_prompts(tokenizer, n_prompts: int) -> list:
    """`n_prompts` MMLU chat prompts, one question from each of subjects spread evenly."""
    from wallperf.harness.artifacts import resolve_dataset_file
    from wallperf.harness.config import load_dataset_config
    from wallperf.harness.loadgen.qsl import DatasetError, build_prompts, load_mmlu, select_per_subject

    one_each = select_per_subject(load_mmlu(resolve_dataset_file(load_dataset_config("mmlu"))), 1)
    if not 1 <= n_prompts <= len(one_each):
        raise DatasetError(f"{n_prompts} prompts asked for; MMLU gives 1..{len(one_each)} (one per subject)")
    step = len(one_each) / n_prompts
    return build_prompts([one_each[int(i * step)] for i in range(n_prompts)], tokenizer)


def resolve_model_path(model_name_or_path: str) -> Path:
    """A .gguf file or HF folder as given, else a model name from conf/models."""
    from wallperf.harness.artifacts import resolve_model_file
    from wallperf.harness.config import load_model_config

    path = Path(model_name_or_path)
    if path.exists():
        return path
    return resolve_model_file(load_model_config(model_name_or_path, "command line", "--model"))


def quant_check(model_name_or_path: str = "smollm2-135m", per_channel: bool = True, n_prompts: int = 16,
                n_greedy: int = 4, greedy_len: int = 16, fp8_format: str = "e4m3fn") -> dict:
    """fp8 weights (bf16 activations) vs bf16 on MMLU prompts; a JSON-ready dict."""
    from wallperf.sut.loading.load import load_model

    if fp8_format not in FP8_DTYPES:
        raise ValueError(f"fp8 format {fp8_format!r}; allowed: {', '.join(FP8_DTYPES)}")
    loaded = load_model(resolve_model_path(model_name_or_path), "bfloat16")
    quantized = copy.deepcopy(loaded.model)
    report = quantize_model_(quantized, FP8_DTYPES[fp8_format], per_channel)
    prompts = mmlu_prompts(loaded.tokenizer, n_prompts)
    figures = compare_models(loaded.model, quantized, prompts, loaded.tokenizer.eos_token_ids, n_greedy, greedy_len)
    return {"model": str(model_name_or_path), "reference_dtype": "bfloat16", "format": report.fp8_format,
            "per_channel": per_channel, "quantized_modules": len(report.quantized_modules),
            "quantized_params": report.quantized_params, "model_bytes_before": report.model_bytes_before,
            "model_bytes_after": report.model_bytes_after, **figures}


def add_quant_check_parser(subparsers) -> argparse.ArgumentParser:
    q = subparsers.add_parser("quant-check", help="compare fp8 weights with bf16 on MMLU prompts",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--model", default="smollm2-135m", help="model name from conf/models, or a .gguf "
                   "file or HF checkpoint folder")
    q.add_argument("--per-tensor", action="store_true",
                   help="one scale per weight matrix, not one per output channel")
    q.add_argument("--format", choices=tuple(FP8_DTYPES), default="e4m3fn",
                   help="fp8 variant: e4m3fn (NVIDIA) or e4m3fnuz (MI300X)")
    q.add_argument("--prompts", type=int, default=16, help="MMLU prompts, one per subject (1-57)")
    q.add_argument("--greedy", type=int, help="of those, prompts also compared by greedy generation "
                   "(default: 4, or --prompts if fewer)")
    q.add_argument("--greedy-tokens", type=int, default=16, help="tokens generated per greedy prompt")
    q.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return q


def cmd_quant_check(args) -> int:
    from wallperf.harness.config import ConfigError

    if args.prompts < 1:
        raise ConfigError(None, "--prompts", "must be >= 1")
    n_greedy = min(4, args.prompts) if args.greedy is None else args.greedy
    if not 0 <= n_greedy <= args.prompts:
        raise ConfigError(None, "--greedy", f"must be 0..{args.prompts} (--prompts)")
    if args.greedy_tokens < 1:
        raise ConfigError(None, "--greedy-tokens", "must be >= 1")
    result = quant_check(args.model, per_channel=not args.per_tensor, n_prompts=args.prompts,
                         n_greedy=n_greedy, greedy_len=args.greedy_tokens, fp8_format=args.format)
    if args.json:
        print(json.dumps(result))
        return 0
    for key, value in result.items():
        print(f"{key:26s} {value:.6g}" if isinstance(value, float) else f"{key:26s} {value}")
    return 0
