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

from wallperf.harness.config.checks import MODES, SCENARIOS, FieldError, check_plain_names, check_sha256, shorten
from wallperf.sut.backends import BACKEND_TABLE, backend_spec
from wallperf.sut.models.config import LlamaConfig, MemoryConfig
from wallperf.sut.models.families import config_for_shape, family as model_family
from wallperf.sut.redact import public_url, register_url, split_url
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
            raise FieldError("file", f"file must be a plain file name, got {shorten(self.file)}")
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
class ModelConfig:
    name: str
    # A row of sut/models/families.py.
    family: str
    format: Literal["gguf", "safetensors", "synthetic"]
    source: Optional[ArtifactSource] = None
    # Published shapes (synthetic weights, the roofline without a download), built
    # straight into the model's own config class (sut/models/config.py).
    shape: Optional[LlamaConfig] = None
    published_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    # The MLPerf benchmark the model stands for: its mlperf.conf name (e.g. llama3_1-8b,
    # harness/loadgen/benchmarks.py), whose settings apply under official settings.
    benchmark: Optional[str] = None
    # Synthetic weights borrow this model's tokenizer (its vocab must fit the shape's).
    tokenizer_from: Optional[str] = None
    # Memory experts over the dense base (sut/models/mome.py).
    mome: Optional[MemoryConfig] = None

    def __post_init__(self):
        check_plain_names(self, "name", "tokenizer_from")
        try:
            fam = model_family(self.family)
        except ValueError as e:
            raise FieldError("family", str(e)) from None
        if fam.memory_experts != (self.mome is not None):
            raise ValueError(f"a 'mome' section is needed exactly when the family has memory experts "
                             f"(family {self.family}: {'it does' if fam.memory_experts else 'it does not'})")
        if self.shape is not None:
            if fam.config_cls is LlamaConfig and self.shape.n_experts != 1:
                raise FieldError("shape.n_experts", f"family {self.family} is dense: n_experts must be 1")
            object.__setattr__(self, "shape", config_for_shape(self.family, self.shape))
        if self.format == "synthetic" and (self.shape is None or self.tokenizer_from is None):
            raise ValueError("synthetic weights need 'shape' and 'tokenizer_from'")
        if self.format != "synthetic" and self.source is None:
            raise ValueError(f"format {self.format!r} needs 'source'")
        if self.benchmark is not None:
            from wallperf.harness.config.benchmarks import BENCHMARKS

            if self.benchmark not in BENCHMARKS:
                raise FieldError("benchmark", f"unknown MLPerf benchmark {shorten(self.benchmark)}; allowed: "
                                 f"{', '.join(BENCHMARKS)}")


# The most a YAML or a flag may ask of the engine and of LoadGen: beyond these a run
# hangs or allocates without end, or a value overflows LoadGen's C++ types (times go
# to LoadGen in integer ns: milliseconds up to 2**63 / 1e6). Far above any real run.
MAX_BATCH = 4096
# Llama 3.1's context, the longest of the supported families.
MAX_OUTPUT_TOKENS = 131072
MAX_DURATION_S = 1e7
MAX_LATENCY_MS = 1e12
MAX_COUNT = 10**7
MAX_QPS = 1e9
SCENARIO_RANGES = (("min_duration_s", 1e-3, MAX_DURATION_S), ("min_query_count", 1, MAX_COUNT),
                   ("max_batch", 1, MAX_BATCH), ("target_qps", 1e-6, MAX_QPS), ("ttft_ms", 1e-6, MAX_LATENCY_MS),
                   ("tpot_ms", 1e-6, MAX_LATENCY_MS), ("offline_expected_qps", 1e-6, MAX_QPS),
                   ("expected_latency_ms", 1e-6, MAX_LATENCY_MS), ("samples_per_query", 1, MAX_COUNT))


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
        if self.max_tokens is not None and not 2 <= self.max_tokens <= MAX_OUTPUT_TOKENS:
            raise FieldError("max_tokens", f"must be from 2 (LoadGen needs n_tokens > 1) to {MAX_OUTPUT_TOKENS}, "
                             f"got {self.max_tokens}")

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
        if not 2 <= self.max_new_tokens <= MAX_OUTPUT_TOKENS:
            raise FieldError("max_new_tokens", f"must be from 2 (LoadGen needs n_tokens > 1) to {MAX_OUTPUT_TOKENS}, "
                             f"got {self.max_new_tokens}")
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
                raise ValueError(f"peak_tflops: unknown dtype {shorten(key)}; allowed: {', '.join(PEAK_DTYPES)}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < float("inf")):
                raise ValueError(f"peak_tflops.{key} must be a positive number or null, got {shorten(value)}")
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
        for key, low, high in SCENARIO_RANGES:
            value = getattr(self, key)
            if value is not None and not low <= value <= high:
                raise FieldError(key, f"must be from {low:g} to {high:g}, got {shorten(value)}")
        server_like = scenario(self.name).server_like
        if server_like and (self.target_qps is None or self.ttft_ms is None or self.tpot_ms is None):
            raise ValueError(f"{self.name} needs target_qps, ttft_ms and tpot_ms")
        if scenario(self.name) is MULTI_STREAM and (self.samples_per_query or 0) < 1:
            raise ValueError("MultiStream needs samples_per_query >= 1")


def endpoint_problem(url) -> str | None:
    """Why `url` is not an http(s)://host[:port][/path] URL, or None. Only its public part is shown."""
    if not isinstance(url, str):
        return f"expected a URL string, got {type(url).__name__}"
    scheme, _, rest = split_url(url)
    try:
        parts = urlsplit(f"{scheme}://{rest}")
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        ok = ok and (parts.port is None or parts.port > 0)
    except ValueError:
        ok = False
    return None if ok else f"{shorten(public_url(url))} is not an http(s)://host[:port] URL"


# A client retrying more often than this against a failing server only hangs the run.
MAX_RETRIES = 100


@dataclass(frozen=True)
class OpenAIConfig:
    """OpenAI-compatible endpoints as the SUT (sut/backends/openai.py).

    An endpoint's user-info and query string are credentials: they are registered as
    secrets, and the config keeps only each URL's public part (the backend sends
    neither), so no record of the run can hold them."""

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
            if isinstance(url, str):
                register_url(url)
            if problem := endpoint_problem(url):
                raise FieldError(f"endpoints[{i}]", problem)
        object.__setattr__(self, "endpoints", [public_url(url) for url in self.endpoints])
        if self.timeout_s <= 0:
            raise FieldError("timeout_s", f"must be > 0, got {self.timeout_s}")
        if not 0 <= self.retries <= MAX_RETRIES:
            raise FieldError("retries", f"must be an integer from 0 to {MAX_RETRIES}, got {self.retries}")


@dataclass(frozen=True)
class RunConfig:
    model: str
    hardware: str
    dataset: str
    scenarios: list
    system: str = "cpu-native"
    # A row of sut/backends/__init__.py's BACKEND_TABLE.
    backend: str = "native"
    openai: Optional[OpenAIConfig] = None
    # llamacpp only: run the model's own GGUF (source) or its BF16 export (bf16).
    gguf: Literal["source", "bf16"] = "source"
    # auto: fp8 weights where the hardware has fp8 math, else the published format.
    dtype: Literal["auto", "float32", "bfloat16", "float16", "fp8"] = "auto"
    # auto: the GPU when torch sees one, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    modes: list = field(default_factory=lambda: list(MODES))
    # all: an accuracy test in every scenario (MLPerf's rule for a submission); first: only in the
    # run's first scenario. The native engine's tokens do not depend on how many rows share a step
    # (tests/kernels, tests/sut/engine), so the other scenarios would score the same answers again;
    # the default run takes `first` to fit its ten minutes.
    accuracy_scenarios: Literal["all", "first"] = "all"
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
                raise FieldError(f"scenarios[{i}]", f"unknown scenario {shorten(s)}; allowed: {', '.join(SCENARIOS)}")
        for i, m in enumerate(self.modes):
            if m not in MODES:
                raise FieldError(f"modes[{i}]", f"unknown mode {shorten(m)}; allowed: {', '.join(MODES)}")
        if not self.scenarios or not self.modes:
            raise ValueError("scenarios and modes must not be empty")
        if self.accuracy_scenarios not in ("all", "first"):
            raise FieldError("accuracy_scenarios", f"{shorten(self.accuracy_scenarios)}; allowed: all, first")
        try:
            spec = backend_spec(self.backend)
        except ValueError as e:
            raise FieldError("backend", str(e)) from None
        if (spec.weights == "remote") != (self.openai is not None):
            raise ValueError("an 'openai' section (endpoints, model) is needed exactly when the backend serves "
                             f"the model elsewhere (backend {self.backend!r})")
        if self.gguf != "source" and spec.weights != "gguf":
            runs_gguf = " or ".join(n for n, b in BACKEND_TABLE.items() if b.weights == "gguf")
            raise FieldError("gguf", f"{self.gguf!r} applies to the {runs_gguf} backend only (backend is "
                             f"{self.backend!r}); leave it at 'source'")
        if self.tp < 1:
            raise FieldError("tp", f"must be an integer >= 1, got {self.tp}")
        if self.tp > 1 and not spec.native_engine:
            raise FieldError("tp", f"tp {self.tp} shards the native engine's model; backend {self.backend!r} "
                             "runs its own (use tp 1)")
        if self.kv_dtype != "auto" and (not spec.native_engine or self.tp > 1):
            raise FieldError("kv_dtype", f"{self.kv_dtype!r} is the native engine's cache, without tensor "
                             f"parallelism (backend {self.backend!r}, tp {self.tp}); leave it at 'auto'")
        if self.tp > 1 and self.dtype == "fp8":
            raise FieldError("tp", f"tp {self.tp} with fp8 weights is not supported yet; use dtype bfloat16 "
                             "or float32")
