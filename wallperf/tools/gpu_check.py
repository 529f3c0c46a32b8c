"""The GPU check: kernels at real sizes against their references, then LoadGen runs
of a Llama 3.1 8B-shaped model (synthetic weights) in bf16 and fp8, with tokens/s
and MBU. One script to run once on a lent GPU machine:

    python -m wallperf.tools.gpu_check --out gpu-check

Without a GPU it runs what a CPU can (the kernels under Triton's interpreter at
small sizes, and a tiny synthetic model), so the script itself stays tested.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from wallperf.harness.config import positive
from wallperf.harness.config.checks import conf_dir

REPO = Path(__file__).resolve().parents[2]


def _say(msg: str) -> None:
    print(f"[gpu-check] {msg}", flush=True)


def kernel_checks(device: str) -> list[dict]:
    """Each dispatch op at Llama 3.1 8B / Mixtral sizes vs its PyTorch reference."""
    from wallperf.kernels import dispatch, fp8_gemm, moe, paged_attention, rmsnorm, swiglu

    torch.manual_seed(0)
    bf16 = torch.bfloat16
    small = device == "cpu"
    hidden, ffn, heads, kv_heads, dim = (64, 96, 4, 2, 16) if small else (4096, 14336, 32, 8, 128)
    out = []

    def check(name, got, want, atol, rtol=1e-2):
        err = (got.float() - want.float()).abs().max().item()
        ok = torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol)
        out.append({"op": name, "max_abs_err": err, "ok": ok})
        _say(f"{name}: max abs err {err:.3g} {'ok' if ok else 'MISMATCH'}")

    x = torch.randn(8, hidden, device=device, dtype=bf16)
    w = torch.randn(hidden, device=device, dtype=bf16)
    check("rms_norm", dispatch.rms_norm(x, w, 1e-5), rmsnorm.rms_norm_ref(x, w, 1e-5), 0.05)
    gu = torch.randn(8, 2 * ffn, device=device, dtype=bf16)
    check("swiglu", dispatch.swiglu(gu), swiglu.swiglu_ref(gu), 0.05)

    block, ctx, batch = 16, (48 if small else 2048), 8
    n_blocks = batch * ctx // block
    kc = torch.randn(n_blocks, block, kv_heads, dim, device=device, dtype=bf16)
    vc = torch.randn_like(kc)
    tables = torch.randperm(n_blocks, device=device).view(batch, -1).to(torch.int32)
    lens = torch.randint(1, ctx + 1, (batch,), device=device, dtype=torch.int32)
    q = torch.randn(batch, heads, dim, device=device, dtype=bf16)
    check("paged_decode_attention", dispatch.paged_decode_attention(q, kc, vc, tables, lens),
          paged_attention.paged_decode_attention_ref(q, kc, vc, tables, lens), 0.03)

    fp8 = torch.float8_e4m3fnuz if getattr(torch.version, "hip", None) else torch.float8_e4m3fn
    wq, ws = fp8_gemm.quantize_fp8(torch.randn(ffn, hidden, device=device), fp8)
    xa = torch.randn(4, hidden, device=device, dtype=bf16)
    check("fp8_linear_w8a16", dispatch.fp8_linear(xa, wq, ws), fp8_gemm.fp8_gemm_w8a16_ref(xa, wq, ws), 0.5)

    experts, top_k, tokens = 8, 2, 16
    mh, mf = (64, 96) if small else (4096, 14336 // 4)
    xm = torch.randn(tokens, mh, device=device, dtype=bf16) / 4
    w13 = torch.randn(experts, 2 * mf, mh, device=device, dtype=bf16) / mh ** 0.5
    w2 = torch.randn(experts, mh, mf, device=device, dtype=bf16) / mf ** 0.5
    logits = torch.randn(tokens, experts, device=device)
    weights, ids = logits.softmax(-1).topk(top_k)
    check("fused_moe", dispatch.fused_moe(xm, w13, w2, weights, ids), moe.fused_moe_ref(xm, w13, w2, weights, ids),
          0.05)
    return out


def kernel_timings(device: str) -> dict:
    """bf16 GEMV vs the fp8 w8a16 kernel at the 8B FFN shape, batch 1 (bytes-bound)."""
    if device == "cpu":
        return {}
    from wallperf.kernels import dispatch, fp8_gemm

    x = torch.randn(1, 4096, device=device, dtype=torch.bfloat16)
    w = torch.randn(14336 * 2, 4096, device=device, dtype=torch.bfloat16)
    wq, ws = fp8_gemm.quantize_fp8(w.float(), torch.float8_e4m3fnuz if torch.version.hip else torch.float8_e4m3fn)

    def time_it(fn, n=50):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n

    t_bf16 = time_it(lambda: torch.nn.functional.linear(x, w))
    t_fp8 = time_it(lambda: dispatch.fp8_linear(x, wq, ws))
    res = {"gemv_bf16_ms": t_bf16 * 1e3, "gemv_bf16_gbps": w.numel() * 2 / t_bf16 / 1e9,
           "w8a16_ms": t_fp8 * 1e3, "w8a16_gbps": wq.numel() / t_fp8 / 1e9, "speedup": t_bf16 / t_fp8}
    _say(f"GEMV 4096->28672 batch 1: bf16 {res['gemv_bf16_gbps']:.0f} GB/s, fp8 w8a16 "
         f"{res['w8a16_gbps']:.0f} GB/s, fp8 speedup {res['speedup']:.2f}x")
    return res


def _wallperf(args: list[str], env=None) -> int:
    cmd = [sys.executable, "-m", "wallperf.cli", *args]
    _say("$ wallperf " + " ".join(args))
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


def runs(out: Path, device: str, duration: float) -> list[dict]:
    """SingleStream and Offline on the 8B shape in bf16 and fp8 (a tiny shape on CPU)."""
    figures = []
    if device == "cpu":
        model, hardware, conf_env = "tiny-check", "cpu", _tiny_conf(out)
    else:
        name = torch.cuda.get_device_name(0).lower()
        model = "llama3.1-8b"
        hardware = "h200" if "h200" in name else "mi300x" if "mi300" in name else "h100-sxm"
        conf_env = None
    for dtype in ("bfloat16", "fp8"):
        run_dir = out / f"run-{dtype}"
        rc = _wallperf(["run", "--model", model, "--hardware", hardware, "--dtype", dtype,
                        "--scenario", "SingleStream,Offline", "--mode", "performance",
                        "--duration", str(duration), "--max-samples", "64", "--output-tokens", "128",
                        "--max-batch", "32", "--out", str(run_dir), "--no-progress"], env=conf_env)
        if rc != 0:
            figures.append({"dtype": dtype, "error": f"wallperf run exited {rc}"})
            continue
        for r in json.loads((run_dir / "results.json").read_text())["runs"]:
            rf = r["roofline"] or {}
            figures.append({"dtype": dtype, "weight_format": r["weight_format"], "scenario": r["scenario"],
                            "tokens_per_second": r["metrics"]["tokens_per_second"],
                            "tpot_p50_ms": (r["metrics"]["tpot_ms"] or {}).get("p50"),
                            "mbu": rf.get("mbu"), "batch": rf.get("batch"),
                            "memory_wall_tokens_per_second": rf.get("memory_wall_tokens_per_second")})
            _say(f"{dtype} {r['scenario']}: {figures[-1]}")
    return figures


def _tiny_conf(out: Path) -> dict:
    import shutil

    conf = out / "conf"
    if not conf.exists():
        shutil.copytree(conf_dir(), conf)
    (conf / "models" / "tiny-check.yaml").write_text(
        "name: tiny-check\nfamily: llama\nformat: synthetic\ntokenizer_from: smollm2-135m\n"
        "shape: {n_layers: 2, hidden_size: 64, n_heads: 4, n_kv_heads: 2, ffn_size: 128, vocab_size: 49152,\n"
        "        tie_embeddings: true, max_position: 2048}\n")
    return {**os.environ, "WALLPERF_CONF": str(conf)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wallperf.tools.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu-check"))
    p.add_argument("--duration", type=positive(float), default=20.0, help="LoadGen min_duration per run (s)")
    p.add_argument("--skip-tests", action="store_true", help="skip pytest tests/kernels")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    _say(f"torch {torch.__version__}, device {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}")
    report = {"device": device}
    if not args.skip_tests:
        env = {**os.environ, **({} if device == "cuda" else {"TRITON_INTERPRET": "1"})}
        report["kernel_tests_rc"] = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/kernels"],
                                                   cwd=REPO, env=env).returncode
    if device == "cpu":
        # Triton's interpreter, and CPU tensors routed to Triton in this process only:
        # the wallperf runs below must take the PyTorch path.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        from wallperf.kernels import _triton

        _triton.MODE = "triton"
    report["kernels"] = kernel_checks(device)
    report["gemv"] = kernel_timings(device)
    if device == "cuda":
        _wallperf(["probe"])
    report["runs"] = runs(args.out, device, args.duration)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    ok = all(k["ok"] for k in report["kernels"]) and report.get("kernel_tests_rc", 0) == 0
    _say(f"wrote {args.out / 'gpu_check.json'}; kernels {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
