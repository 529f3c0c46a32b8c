"""The dispatch point: references on CPU-only runs without importing Triton, Triton
launchers when forced (or, on a GPU, for GPU tensors)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wallperf.kernels import _triton, dispatch, fp8_gemm, moe, paged_attention, rmsnorm, rope, swiglu

REPO = Path(__file__).resolve().parents[2]

CPU_RUN = """
import sys
import torch
import wallperf.kernels.dispatch as d
from wallperf.kernels import fp8_gemm, moe, paged_attention, rmsnorm, rope, swiglu

x = torch.randn(3, 16)
w = torch.randn(16)
assert torch.equal(d.rms_norm(x, w, 1e-6), rmsnorm.rms_norm_ref(x, w, 1e-6))
q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
pos, inv_freq = torch.arange(3), torch.rand(8)
assert all(map(torch.equal, d.rope(q, k, pos, inv_freq), rope.rope_ref(q, k, pos, inv_freq)))
cache = torch.randn(4, 8, 2, 16)
tables, lens = torch.tensor([[1, 3], [0, 2]], dtype=torch.int32), torch.tensor([9, 1], dtype=torch.int32)
assert torch.equal(d.paged_decode_attention(q[:2], cache, cache, tables, lens),
                   paged_attention.paged_decode_attention_ref(q[:2], cache, cache, tables, lens))
wq, ws = fp8_gemm.quantize_fp8(torch.randn(5, 16), torch.float8_e4m3fn)
assert torch.equal(d.fp8_linear(x, wq, ws), fp8_gemm.fp8_gemm_w8a16_ref(x, wq, ws))
assert torch.equal(d.fp8_linear(x, wq, ws, True), fp8_gemm.fp8_gemm_w8a8_ref(x, wq, ws))
assert torch.equal(d.swiglu(x), swiglu.swiglu_ref(x))
w13, w2 = torch.randn(3, 8, 16), torch.randn(3, 16, 4)
ids, weights = torch.tensor([[0, 2], [2, 1], [0, 1]]), torch.rand(3, 2)
assert torch.equal(d.fused_moe(x, w13, w2, weights, ids), moe.fused_moe_ref(x, w13, w2, weights, ids))
assert "triton" not in sys.modules, "a CPU-only run imported triton"
print("ok")
"""


def test_cpu_run_uses_references_and_never_imports_triton():
    env = {k: v for k, v in os.environ.items() if k not in ("WALLPERF_KERNELS", "TRITON_INTERPRET")}
    env.update(CUDA_VISIBLE_DEVICES="", HIP_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", CPU_RUN], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# (dispatch function, kernel module, its launcher, its reference, number of arguments)
ROUTES = [
    ("rms_norm", rmsnorm, "rms_norm", "rms_norm_ref", 3),
    ("rope", rope, "rope", "rope_ref", 4),
    ("paged_decode_attention", paged_attention, "paged_decode_attention",
     "paged_decode_attention_ref", 5),
    ("fp8_linear", fp8_gemm, "fp8_gemm_w8a16", "fp8_gemm_w8a16_ref", 3),
    ("swiglu", swiglu, "swiglu", "swiglu_ref", 1),
    ("fused_moe", moe, "fused_moe", "fused_moe_ref", 5),
]


@pytest.mark.triton
@pytest.mark.parametrize("name, module, launcher, reference, num_args", ROUTES)
@pytest.mark.parametrize("mode, expected", [("triton", "triton"), ("auto", "reference")])
def test_routes_cpu_tensors(name, module, launcher, reference, num_args, mode, expected, monkeypatch):
    monkeypatch.setattr(module, launcher, lambda *args: "triton")
    monkeypatch.setattr(module, reference, lambda *args: "reference")
    monkeypatch.setattr(_triton, "MODE", mode)
    assert getattr(dispatch, name)(*[torch.zeros(2, 2)] * num_args) == expected


@pytest.mark.triton
def test_w8a8_route(monkeypatch):
    monkeypatch.setattr(_triton, "MODE", "triton")
    monkeypatch.setattr(fp8_gemm, "fp8_gemm_w8a8", lambda *args: "w8a8")
    assert dispatch.fp8_linear(torch.zeros(1), None, None, quantize_activations=True) == "w8a8"
