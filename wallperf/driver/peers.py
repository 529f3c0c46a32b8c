"""Peer engines in a run (`--backend hf`, `--backend llamacpp`): what they can
run, the format they run it in, and how their weights are counted for the
memory wall.

hf runs the native engine's loaded weights in the run's dtype (float32,
bfloat16 or float16; HF has no fp8 path here). llamacpp runs a GGUF as stored:
the model's own file, or its BF16 export (`gguf: bf16`), so the run's dtype
does not apply to its weights; its bytes per token are the GGUF tensors' bytes
and its KV cache is float16.
"""
from __future__ import annotations

from wallperf.harness.config import ConfigError, ResolvedRun
from wallperf.harness.hardware.counts import WeightBytes, held_weight_bytes
from wallperf.sut.backends import MissingPackage, backend_spec, check_available
from wallperf.sut.models.families import family
from wallperf.sut.quant.fp8 import FormatChoice, format_name, kv_cache_dtype

def check_peer(resolved: ResolvedRun) -> None:
    """ConfigError unless the run's peer backend is installed and can run its model."""
    run, model = resolved.run, resolved.model
    spec = backend_spec(run.backend)
    if not spec.peer:
        return
    try:
        check_available(run.backend)
    except MissingPackage as e:
        raise ConfigError(resolved.path, "backend", str(e)) from None
    if not family(model.family).plain_llama:
        raise ConfigError(resolved.path, "backend", f"the {run.backend} backend runs dense Llama-family "
                          f"models; {model.name} is {model.family}")
    if spec.weights == "gguf" and model.format != "gguf":
        raise ConfigError(resolved.path, "backend", f"the {run.backend} backend runs GGUF files; {model.name} is "
                          f"{model.format} (choose a GGUF model, e.g. smollm2-135m)")
    if not spec.fp8_weights and spec.weights == "checkpoint" and run.dtype == "fp8":
        raise ConfigError(resolved.path, "dtype", f"the {run.backend} backend runs float32, bfloat16 or float16 weights, "
                          "not fp8; use --dtype bfloat16 or auto")


def peer_format(resolved: ResolvedRun, choice: FormatChoice) -> FormatChoice:
    """The format a peer runs: auto never means fp8 for hf; llamacpp's weights are its GGUF's."""
    run, published = resolved.run, resolved.model.published_dtype
    spec = backend_spec(run.backend)
    if not spec.fp8_weights and spec.weights == "checkpoint" and choice.fp8_dtype is not None:
        return FormatChoice(published, None, False, f"auto: the {run.backend} backend runs the published format {published} "
                            "(no fp8 path)")
    if spec.weights == "gguf":
        which = "its BF16 export" if run.gguf == "bf16" else "the model's own GGUF"
        return FormatChoice(published, None, False, f"llama.cpp runs {which} as stored (its weight types in "
                            f"weight_format); {published} is the math dtype of the compute roof")
    return choice


def load_llamacpp_model(resolved: ResolvedRun):
    """The GGUF the llamacpp backend runs: the model's own, or its cached BF16 export."""
    from wallperf.harness.artifacts import resolve_model_file
    from wallperf.tools.gguf_export import bf16_gguf
    from wallperf.sut.backends.llamacpp import load_gguf_model

    path = resolve_model_file(resolved.model)
    if resolved.run.gguf == "bf16":
        path = bf16_gguf(path)
    return load_gguf_model(path)


def weight_format(loaded, choice: FormatChoice) -> str:
    """What results.json records as the weights' format: the GGUF's types for llamacpp."""
    return getattr(loaded, "weight_format", None) or choice.weight_format


def roofline_counts(loaded, expert_cache: dict | None = None, kv_bytes_per_element: float | None = None) -> dict:
    """run_roofline's byte counts from what the run's engine really holds: a GGUF's
    tensors as stored (float16 KV cache) for llama.cpp, else the loaded model's own
    tensors, plus the memory-expert rows MoME loaded per step, and the KV cache at
    `kv_bytes_per_element` (a quantized cache's bytes per element, scales included;
    None: the activation dtype's size). A run counts the bytes a step really reads,
    so an untied input embedding table counts the rows the step gathers, not the
    whole table (the published convention, which `wallperf roofline` keeps): for
    Qwen2.5-Coder-1.5B the table is 15% of the weights."""
    weight_bytes = getattr(loaded, "weight_bytes", None)
    if weight_bytes is not None:
        from wallperf.sut.backends.llamacpp import KV_BYTES_PER_ELEMENT

        table = loaded.table_bytes
        return {"weights": WeightBytes(table=table, dense=weight_bytes - table), "embedding": "rows",
                "kv_bytes_per_element": KV_BYTES_PER_ELEMENT}
    return {"weights": held_weight_bytes(loaded.model, extra=memory_expert_bytes_per_step(expert_cache)),
            "embedding": "rows", "kv_bytes_per_element": kv_bytes_per_element}


def memory_expert_bytes_per_step(expert_cache: dict | None) -> float:
    """MoME: the distinct memory experts each layer read per step (hits and misses alike;
    a hit is read from the cache instead of the bank), times an expert's bytes."""
    if not expert_cache:
        return 0.0
    per_expert = expert_cache["bytes_per_expert"]
    return sum(layer["lookups"] / layer["steps"] * per_expert
               for layer in expert_cache["layers"].values() if layer.get("steps"))


def kv_storage_bytes(loaded, kv_dtype) -> float | None:
    """The native engine's KV bytes per element with an fp8 cache (scales included), else None."""
    if kv_dtype is None:
        return None
    from wallperf.sut.engine.paged_cache import kv_bytes_per_element

    return kv_bytes_per_element(loaded.config.head_dim, kv_dtype)


def kv_format(resolved, choice: FormatChoice) -> str:
    """What results.json records as the KV cache's storage: fp8_e4m3fn(uz), or the math dtype."""
    kv = kv_cache_dtype(resolved.hardware, resolved.run.kv_dtype)
    return choice.dtype if kv is None else format_name(kv)


def format_dict(loaded, choice: FormatChoice) -> dict:
    """results.json's "format" entry."""
    return {**choice.to_dict(), "weight_format": weight_format(loaded, choice),
            "quantization": getattr(loaded, "quantization", None),
            **({"gguf": str(loaded.path)} if getattr(loaded, "weight_bytes", None) is not None else {})}
