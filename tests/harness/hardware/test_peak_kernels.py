"""The compute roof is the peak of the math the engine runs: which kernel that is on
CPUs of each kind (by their /proc/cpuinfo flags and the compiled kernel's path), and
that the probe times that kernel and names it."""
import pytest
import torch
import torch.nn.functional as F

from wallperf.harness.hardware import peak_kernels
from wallperf.harness.hardware.peak_kernels import (COMPILED, LINEAR_ROWS, MATMUL_BF16, MATMUL_FP32, bf16_choice,
                                                    cpu_flags, native_bf16, peak)
from wallperf.kernels import cpu_linear as cpu_linear_module

ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 fma avx512f avx512bw avx512vl avx512_bf16\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
NEOVERSE_V1 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm sve\nCPU implementer\t: 0x41\n"
NEOVERSE_N1 = "processor\t: 0\nFeatures\t: fp asimd crc32 atomics\n"


@pytest.mark.parametrize("text, flag", [(ZEN3, None), (ZEN4, "avx512_bf16"), (SAPPHIRE_RAPIDS, "amx_bf16"),
                                        (NEOVERSE_V1, "bf16"), (NEOVERSE_N1, None)])
def test_bf16_math_is_read_from_the_flags(text, flag):
    assert native_bf16(cpu_flags(text)) == flag


def test_which_bf16_math_the_engine_runs():
    # No bf16 math and no compiled kernel: fp32 FMA is the most the engine's bf16 can reach.
    assert bf16_choice(cpu_flags(ZEN3), None) == MATMUL_FP32
    assert bf16_choice(cpu_flags(ZEN4), None) == MATMUL_BF16
    assert bf16_choice(cpu_flags(NEOVERSE_V1), None) == MATMUL_BF16
    # Where the compiled kernel runs, its own peak, whatever the flags.
    assert bf16_choice(cpu_flags(ZEN3), "avx2") == COMPILED
    assert bf16_choice(cpu_flags(SAPPHIRE_RAPIDS), "amx") == COMPILED


def test_without_bf16_math_the_bf16_roof_is_fp32_matmul(monkeypatch):
    """Never torch's bf16 matmul on a CPU without bf16 math (160x below fp32 on AVX2)."""
    dtypes = []
    real = torch.matmul
    monkeypatch.setattr(peak_kernels.torch, "matmul", lambda x, y, out=None: (dtypes.append(x.dtype), real(x, y, out=out))[1])
    tflops, kernel, times = peak(torch.device("cpu"), "bfloat16", 64, 3, 1, flags=cpu_flags(ZEN3), isa=None)
    assert set(dtypes) == {torch.float32} and len(dtypes) == 4  # one warm-up, three timed
    assert kernel.startswith("torch.matmul float32") and "no bf16 math" in kernel
    assert tflops > 0 and len(times) == 3
    dtypes.clear()
    _, kernel, _ = peak(torch.device("cpu"), "bfloat16", 64, 2, 0, flags=cpu_flags(ZEN4), isa=None)
    assert set(dtypes) == {torch.bfloat16} and "avx512_bf16" in kernel


def test_the_compiled_kernel_is_timed_at_a_compute_bound_shape_and_named(monkeypatch):
    shapes = []

    def counting_linear(x, w):
        shapes.append((tuple(x.shape), tuple(w.shape), x.dtype, w.dtype))
        return F.linear(x, w)

    monkeypatch.setattr(cpu_linear_module, "cpu_linear", counting_linear)
    n = 96
    tflops, kernel, times = peak(torch.device("cpu"), "bfloat16", n, 3, 1, flags=cpu_flags(ZEN3), isa="avx2")
    rows = min(LINEAR_ROWS, n)
    assert shapes == [((rows, n), (n, n), torch.bfloat16, torch.bfloat16)] * 4  # one warm-up, three timed
    assert kernel == f"cpu_linear, compiled, avx2 path ({LINEAR_ROWS} rows, compute-bound)"
    # 2 x rows x n x n FLOPs per call, over the median of the timed calls.
    assert tflops == pytest.approx(2 * rows * n * n / sorted(times)[1] / 1e12)


def test_compiled_isa_follows_the_kernel_module(monkeypatch):
    monkeypatch.delattr(cpu_linear_module, "cpu_isa", raising=False)
    assert peak_kernels.compiled_isa() is None  # a kernel module without cpu_isa: no compiled path claimed
    monkeypatch.setattr(cpu_linear_module, "cpu_isa", lambda: "avx2", raising=False)
    monkeypatch.setattr(cpu_linear_module, "cpu_linear_available", lambda: True)
    assert peak_kernels.compiled_isa() == "avx2"
    monkeypatch.setattr(cpu_linear_module, "cpu_linear_available", lambda: False)
    assert peak_kernels.compiled_isa() is None


def test_float32_and_gpu_dtypes_are_torch_matmul():
    _, kernel, _ = peak(torch.device("cpu"), "float32", 32, 2, 0)
    assert kernel == "torch.matmul float32"


def test_the_kernel_a_stored_wall_is_checked_against_is_the_one_timed():
    """harness.hardware.wall reuses a stored wall only for the bf16 kernel this process runs:
    bf16_kernel() must name it as the timing does."""
    from wallperf.harness.hardware.peak_kernels import bf16_kernel, timed

    _, kernel, _ = timed(torch.device("cpu"), "bfloat16", 64, 1, 0)
    assert bf16_kernel() == kernel
