"""Shared fixtures: the embedded SmolLM2 GGUF and the MMLU file, resolved through
the project's own artifact cache (downloaded once per cache)."""
import atexit
import os
import sys

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


def pytest_unconfigure(config):
    """Triton's nanobind bindings list hundreds of "leaked" objects when the interpreter
    exits (its own module state, freed by the exit anyway), burying pytest's summary.
    They are written after every atexit handler, so the last one sends stderr to
    /dev/null; pytest has written everything by then and restored its descriptors."""
    if "triton" in sys.modules:
        atexit.register(_silence_stderr)


def _silence_stderr() -> None:
    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    from harness.artifacts import resolve_model_file
    from harness.config import load_model_config

    return resolve_model_file(load_model_config("smollm2-135m"))


@pytest.fixture(scope="session")
def mmlu_path():
    from harness.artifacts import resolve_dataset_file
    from harness.config import load_dataset_config

    return resolve_dataset_file(load_dataset_config("mmlu"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytest.mark.usefixtures("one_torch_thread")`):
    tiny models gain nothing from intra-op threads, and on a shared 2-core CPU
    their barriers can cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
