"""The portable CPU micro-kernels built standalone per instruction set and checked
against references in double (tests/kernels/simd_driver.cpp): natively for the
paths this machine executes, and for Arm with Debian's cross compiler
(g++-aarch64-linux-gnu), run under qemu-user. The Arm checks are emulation only:
they show the NEON code computes the right values, not how fast it runs.
"""
import platform
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from wallperf.kernels.cpu_linear import ISAS, isa_problem

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "kernels" / "csrc"
DRIVER = Path(__file__).with_name("simd_driver.cpp")
CROSS = "aarch64-linux-gnu-g++"
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
ON_ARM = platform.machine() in ("aarch64", "arm64")
# The same flags cpu_linear builds with, less those only the torch extension needs.
COMMON = ["-O2", "-std=c++17", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", f"-I{CSRC}"]


def isa_flags(isa: str) -> list[str]:
    """The -D and -m flags kernels/cpu_linear.py compiles path `isa` with."""
    return list(ISAS[isa][2])


def build_and_run(compiler: str, flags: list[str], out: Path, runner: list[str]) -> str:
    subprocess.run([compiler, *COMMON, *flags, str(DRIVER), "-o", str(out)], check=True, capture_output=True,
                   text=True, timeout=600)
    done = subprocess.run([*runner, str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_kernels_match_double_natively(isa, tmp_path):
    if ON_ARM or shutil.which("g++") is None:
        pytest.skip("needs g++ on x86-64")
    problem = isa_problem(isa)
    if problem is not None:
        pytest.skip(f"the {isa} path cannot run here: {problem}")
    out = build_and_run("g++", isa_flags(isa), tmp_path / isa, [])
    lanes = {"scalar": 1, "avx2": 8, "avx512": 16}[isa]
    assert f"Vec lanes: {lanes}\n" in out and out.rstrip().endswith("0 failed")
    assert "FAIL" not in out and out.count("ok ") >= 20


SIMDE = Path("/usr/include/simde/x86/avx512.h")


def test_avx512_kernels_match_double_with_simde_emulation(tmp_path):
    """The AVX-512 branch of simd.h on a machine without AVX-512: its intrinsics
    computed by SIMDe in portable code. This checks the branch's logic (lane
    counts, tails, reductions, conversions), not the hardware; where the CPU has
    AVX-512 the native test above runs it for real."""
    if ON_ARM or shutil.which("g++") is None:
        pytest.skip("needs g++ on x86-64")
    if not SIMDE.is_file():
        pytest.skip("needs SIMDe's headers (apt-get install libsimde-dev)")
    flags = [f for f in isa_flags("avx512") if not f.startswith("-mavx512")] + ["-DWALLPERF_EMULATE_WITH_SIMDE"]
    out = build_and_run("g++", flags, tmp_path / "avx512-simde", [])
    assert "Vec lanes: 16\n" in out and out.rstrip().endswith("0 failed")
    assert "FAIL" not in out and out.count("ok ") >= 20


def test_neon_kernels_match_double_under_qemu(tmp_path):
    if ON_ARM:
        out = build_and_run("g++", isa_flags("neon"), tmp_path / "neon", [])
    else:
        if shutil.which(CROSS) is None or QEMU is None:
            pytest.skip("needs g++-aarch64-linux-gnu and qemu-user (apt-get install g++-aarch64-linux-gnu qemu-user)")
        out = build_and_run(CROSS, [*isa_flags("neon"), "-static"], tmp_path / "neon", [QEMU])
    assert "Vec lanes: 4\n" in out and out.rstrip().endswith("0 failed")
    assert "FAIL" not in out and out.count("ok ") >= 20


def test_the_neon_torch_ops_compile_for_aarch64():
    """The whole op library (the fused step and its ops over the NEON kernels)
    compiles for Arm; it cannot be linked or run here without an Arm PyTorch."""
    if shutil.which(CROSS) is None:
        pytest.skip("needs g++-aarch64-linux-gnu")
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"], CSRC]]
    done = subprocess.run([CROSS, "-fsyntax-only", "-std=c++20", "-O2", "-fopenmp", *isa_flags("neon"),
                           "-DWALLPERF_OPS_NS=wallperf_neon", *includes, str(CSRC / "isa_portable.cpp")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
