"""Kernel tests run the Triton kernels themselves: compiled on a GPU when one is
visible, otherwise on the CPU under Triton's interpreter (TRITON_INTERPRET=1).

TRITON_INTERPRET must be set before anything imports triton or a kernel file, because
`kernels._triton` decides once, at import, whether Triton is loaded; the root
conftest does that for the whole session.
"""
import pytest
import torch

from kernels import _triton

# tests/conftest.py sets TRITON_INTERPRET=1 on a CPU-only machine before anything
# imports `kernels`, so the kernels are loaded and run under the interpreter here.
if not _triton.AVAILABLE:
    pytest.skip("Triton is not installed: pip install -e '.[test]'", allow_module_level=True)


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
