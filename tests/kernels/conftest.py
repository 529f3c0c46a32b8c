"""Kernel tests run the Triton kernels themselves: compiled on a GPU when one is
visible, otherwise on the CPU under Triton's interpreter (TRITON_INTERPRET=1).

Both variables must be set before anything imports triton or a kernel file, because
`kernels._triton` decides once, at import, whether the kernels are real Triton.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["WALLPERF_KERNELS"] = "triton"

if "kernels._triton" in sys.modules and not sys.modules["kernels._triton"].AVAILABLE:
    raise RuntimeError(
        "kernels._triton was imported (by a test collected earlier) before "
        "tests/kernels/conftest.py could set WALLPERF_KERNELS=triton; set it for the whole "
        "session (e.g. in tests/conftest.py) or run tests/kernels on its own"
    )


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
