"""A fixture that runs a test once per CPU kernel path (kernels/cpu_linear.py),
forcing the path for the module's tests as WALLPERF_CPU_ISA would for a process;
paths this machine cannot execute are skipped, saying why."""
import pytest

import wallperf.kernels.cpu_linear as cpu_linear_module
from wallperf.kernels.cpu_linear import ISAS, isa_ops, isa_problem

# Every name WALLPERF_CPU_ISA takes, so a skipped path shows in the report.
PATHS = [*ISAS, "amx"]


@pytest.fixture(scope="module", params=PATHS)
def cpu_path(request):
    """The path's name, with it forced for cpu_linear, the dispatch and the fused step."""
    problem = isa_problem(request.param)
    if problem is not None:
        pytest.skip(f"the {request.param} path cannot run here: {problem}")
    ops = isa_ops(request.param)
    saved = cpu_linear_module._state
    cpu_linear_module._state = (request.param, ops, None)
    yield request.param
    cpu_linear_module._state = saved


@pytest.fixture(scope="module")
def cpu_ops(cpu_path):
    """torch.ops.wallperf_<path> of the forced path."""
    return isa_ops(cpu_path)
