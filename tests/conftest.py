"""Shared fixtures: the embedded SmolLM2 GGUF and the MMLU file, resolved through
the project's own artifact cache (downloaded once per cache)."""
import os
import time
from pathlib import Path

import pytest
import torch

# With no GPU, Triton kernels can only run under Triton's interpreter; it must be
# chosen before anything imports triton or `kernels` (kernels._triton decides at
# import). CPU tensors still take the PyTorch references unless a test forces
# kernels.dispatch to Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the real SmolLM2 model or the full MMLU set")
    config.addinivalue_line("markers", "triton: runs Triton kernels (skipped when Triton is not installed)")
    _private_host_measurements(config)


def _private_host_measurements(config):
    """The suite's runs keep their host measurements (the memory wall and peaks, which a run
    stores for an hour) in a cache of their own: measured while a test's server or peer engine
    shares the cores, a wall of half the real peak was stored in the user's cache and the
    user's next runs printed MFU 174%. Everything else in the cache (the model and data
    wheels, the compiled kernels) is the user's, linked. Subprocesses inherit it."""
    import shutil
    import tempfile

    real = Path(os.environ.get("WALLPERF_CACHE", Path.home() / ".cache" / "wallperf"))
    for name in ("artifacts", "gguf", "torch_extensions", "mome"):
        (real / name).mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix="wallperf-test-cache-"))
    for entry in real.iterdir():
        if entry.name != "hardware":
            (private / entry.name).symlink_to(entry.resolve())
    os.environ["WALLPERF_CACHE"] = str(private)
    config.add_cleanup(lambda: shutil.rmtree(private, ignore_errors=True))


def pytest_unconfigure(config):
    """No nanobind "leaked" lines from Triton after pytest's summary (see quiet_triton_exit)."""
    from wallperf.cli import quiet_triton_exit

    quiet_triton_exit()


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    from wallperf.harness.artifacts import resolve_model_file
    from wallperf.harness.config import load_model_config

    return resolve_model_file(load_model_config("smollm2-135m"))


@pytest.fixture(scope="session")
def mmlu_path():
    from wallperf.harness.artifacts import resolve_dataset_file
    from wallperf.harness.config import load_dataset_config

    return resolve_dataset_file(load_dataset_config("mmlu"))


@pytest.fixture(scope="session")
def sharegpt_path():
    from wallperf.harness.artifacts import resolve_dataset_file
    from wallperf.harness.config import load_dataset_config

    return resolve_dataset_file(load_dataset_config("sharegpt"))


@pytest.fixture(scope="session")
def tiny_synthetic_yaml():
    """A 2-layer Llama with seeded random weights and SmolLM2's tokenizer: a model
    YAML for runs that only need the machinery to work, fast."""
    return """\
name: tiny-synthetic
family: llama
format: synthetic
tokenizer_from: smollm2-135m
shape: {n_layers: 2, hidden_size: 64, n_heads: 4, n_kv_heads: 2, ffn_size: 128,
        vocab_size: 49152, tie_embeddings: true, max_position: 2048}
"""


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytest.mark.usefixtures("one_torch_thread")`):
    tiny models gain nothing from intra-op threads, and on a shared 2-core CPU
    their barriers can cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def all_torch_threads():
    """Every core this process may use, for one test (`pytest.mark.usefixtures("all_torch_threads")`),
    also inside a module that asks for one thread: a test that runs a real model against HF
    transformers spends minutes in large GEMMs, which scale with the cores when nothing else
    runs beside them (the suite runs one test at a time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    yield
    torch.set_num_threads(threads)


class Probes(list):
    """The settings each fake probe was called with; `clock["now"]` is the fake time."""

    kernel = "cpu_linear, compiled, avx2 path (256 rows, compute-bound)"

    def result(self, read=47.0, at=1_000_000.0):
        """A CPU measurement as harness.hardware.probe returns it: `read` GB/s read-only, copy 35,
        triad 38, GEMM 0.8 TFLOP/s bf16 and 0.3 fp32, on 2 threads, taken at `at`."""
        from wallperf.harness.hardware.probe import CPU_QUICK_SETTINGS, ProbeResult
        from wallperf.harness.hardware.quiet import Quiet

        return ProbeResult(name="cpu", description="test CPU", vendor="cpu", memory_gb=24.0, read_gbps=read,
                           copy_gbps=35.0, triad_gbps=38.0, peak_tflops={"float32": 0.3, "bfloat16": 0.8},
                           threads=2, settings=CPU_QUICK_SETTINGS, quiet=Quiet(2, 0.1, 0.0, 1.0), measured_at=at,
                           peak_kernels={"float32": "torch.matmul float32", "bfloat16": self.kernel})


@pytest.fixture
def probes(tmp_path, monkeypatch):
    """wallperf.harness.hardware.wall's probe replaced by a fake that measures Probes.result() (47 GB/s)
    'now' on a fake clock, with host measurements kept under tmp_path ($WALLPERF_CACHE)."""
    from wallperf.harness.hardware import wall

    monkeypatch.setenv("WALLPERF_CACHE", str(tmp_path))
    calls = Probes()
    calls.clock = {"now": 1_000_000.0}
    # The bf16 kernel this process runs, as the probe would name it (a stored wall of another is not reused).
    monkeypatch.setattr(wall, "bf16_kernel", lambda: calls.kernel)

    def fake_probe(device, quick=False, settings=None, **quiet_wait):
        calls.append(settings)
        return calls.result(at=calls.clock["now"])

    monkeypatch.setattr(wall, "probe", fake_probe)
    monkeypatch.setattr(wall.time, "time", lambda: calls.clock["now"])
    return calls


class StepBackend:
    """A stand-in for an engine behind the LoadGen adapter: each step emits one token
    for every running request and takes `step_seconds(batch)` (slept, or added to
    `clock[0]` when a clock is given). A request's length and tokens come from
    `length(prompt, params)` and `token(prompt, index)`; `emitted` counts what each
    request has had so far."""

    def __init__(self, max_batch, step_seconds=lambda batch: 0.0, clock=None,
                 length=lambda prompt, params: params.max_new_tokens, token=lambda prompt, index: 100 + index):
        self.max_batch, self.step_seconds, self.clock = max_batch, step_seconds, clock
        self.length, self.token = length, token
        self.running: dict[int, tuple] = {}
        self.emitted: dict[int, int] = {}

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def add_request(self, request_id, prompt_ids, params) -> None:
        self.running[request_id] = (prompt_ids, self.length(prompt_ids, params))
        self.emitted[request_id] = 0

    def step(self):
        from wallperf.sut.engine.engine import TokenEvent

        seconds = self.step_seconds(len(self.running))
        if self.clock is not None:
            self.clock[0] += seconds
        elif seconds:
            time.sleep(seconds)
        events = []
        for rid, (prompt, n) in list(self.running.items()):
            self.emitted[rid] += 1
            k = self.emitted[rid]
            events.append(TokenEvent(rid, self.token(prompt, k), k, k == n))
            if k == n:
                del self.running[rid]
        return events


@pytest.fixture(scope="session")
def step_backend():
    """The StepBackend class (tests may not import conftest)."""
    return StepBackend


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory):
    """A seeded random 2-layer Llama saved by HF transformers, with a byte-level BPE tokenizer.json:
    an HF checkpoint folder any model spec can name."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import LlamaConfig, LlamaForCausalLM

    from wallperf.sut.loading.tokenizer import Tokenizer

    merges = [f"Ġ {c}" for c in "ABCDt"] + ["h e", "t he"]
    tokens = sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in merges]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.2)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    Tokenizer.from_vocab(tokens, merges).backend.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="session")
def tiny_mmlu_path(tmp_path_factory):
    """An MMLU-format file of 3 subjects x 20 made-up questions (answers cycle A-D)."""
    import json

    path = tmp_path_factory.mktemp("tiny_mmlu") / "mmlu.jsonl"
    rows = [{"question": f"Question {i} about {topic}?", "answer_a": f"one {i}", "answer_b": f"two {i}",
             "answer_c": f"three {i}", "answer_d": f"four {i}", "correct_answer": "ABCD"[i % 4], "topic": topic}
            for topic in ("astronomy", "anatomy", "virology") for i in range(20)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def tiny_conf(tmp_path, monkeypatch, smollm2_gguf_path, mmlu_path, tiny_synthetic_yaml):
    """conf/ with tiny-synthetic beside the real models, as $WALLPERF_CONF (the test
    processes a run starts inherit it)."""
    import shutil
    from pathlib import Path

    root = tmp_path / "conf"
    shutil.copytree(Path(__file__).resolve().parents[1] / "conf", root)
    (root / "models" / "tiny-synthetic.yaml").write_text(tiny_synthetic_yaml)
    monkeypatch.setenv("WALLPERF_CONF", str(root))
    return root


@pytest.fixture(scope="session")
def broken_checkpoints(smollm2_gguf_path, tmp_path_factory):
    """Checkpoints no loader can read: GGUFs truncated, random or header only, an HF
    folder with a corrupt safetensors file, one with a config.json that is not JSON."""
    folder = tmp_path_factory.mktemp("broken")
    with open(smollm2_gguf_path, "rb") as f:
        (folder / "truncated.gguf").write_bytes(f.read(3_000_000))
    (folder / "random.gguf").write_bytes(bytes(range(256)) * 400)
    (folder / "header-only.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    hf = folder / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, '
                                    '"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, '
                                    '"vocab_size": 100}')
    (hf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    bad_config = folder / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    return folder


# mlcommons' inference repository (the submission checker, compliance scripts):
# the shared copy beside the checkout.
INFERENCE = Path(__file__).resolve().parents[2] / "shared" / "mlcommons-inference"


@pytest.fixture(scope="session")
def checker_constants():
    """mlcommons' submission checker's own constants module (MODEL_CONFIG, ACC_PATTERN, ...)."""
    if not INFERENCE.is_dir():
        pytest.skip(f"no mlcommons-inference copy at {INFERENCE}")
    import sys

    sys.path.insert(0, str(INFERENCE / "tools" / "submission"))
    try:
        from submission_checker import constants
    finally:
        sys.path.pop(0)
    return constants
