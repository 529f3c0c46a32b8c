"""Kernel tests run the Triton kernels themselves: compiled on a GPU when one is
visible, otherwise on the CPU under Triton's interpreter (TRITON_INTERPRET=1).

TRITON_INTERPRET must be set before anything imports triton or a kernel file, because
`kernels._triton` decides once, at import, whether Triton is loaded; the root
conftest does that for the whole session.

Modules that run Triton kernels say so with `pytestmark = pytest.mark.triton`; without
Triton only they are skipped, and the compiled CPU kernels' tests still run.
"""
import pytest
import torch

from wallperf.kernels import _triton


def pytest_collection_modifyitems(config, items):
    if _triton.AVAILABLE:
        return
    skip = pytest.mark.skip(reason="Triton is not installed: pip install -e '.[test]'")
    for item in items:
        if item.get_closest_marker("triton"):
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
