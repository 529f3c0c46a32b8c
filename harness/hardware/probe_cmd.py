"""`wallperf probe`: measure this machine (harness.hardware.probe), keep the
measurement for runs on this host (harness.hardware.wall), and with
--measured-wall write it as the hardware profile that runs then use."""
from __future__ import annotations

import sys

import torch

from wallperf.harness.hardware.probe import QUIET_WAIT_S, ProbeResult, probe, write_profile
from wallperf.harness.hardware.wall import store_host_measurement


def format_result(result: ProbeResult) -> str:
    s = result.settings
    kernels = result.peak_kernels or {}
    gemm = "\n".join(f"  peak       {dt} {tf:.3g} TFLOP/s: {kernels.get(dt, 'torch.matmul')}"
                     for dt, tf in result.peak_tflops.items())
    return "\n".join((
        f"{result.name}: {result.description}, {result.memory_gb:.1f} GB"
        + (f", {result.threads} threads" if result.threads else ""),
        f"  bandwidth  read {result.read_gbps:.1f} GB/s  copy {result.copy_gbps:.1f} GB/s  "
        f"triad {result.triad_gbps:.1f} GB/s  "
        f"({s.array_mib} MiB arrays, best of {s.bandwidth_repeats})",
        f"  wall       {result.bandwidth_gbps:.1f} GB/s (the highest of the three: an MBU is never set "
        f"against less than the machine was seen to stream)",
        gemm + f"  (n={s.gemm_n}, median of {s.gemm_repeats})",
        f"  machine    {result.quiet.summary()}",
    ))


def add_probe_parser(subparsers):
    p = subparsers.add_parser(
        "probe", help="measure this machine's bandwidth and GEMM peak",
        description="Measure read-only and STREAM copy/triad bandwidth and torch.matmul peak per dtype. "
                    "The measurement is kept for this host: `wallperf run` reuses it for an hour instead of "
                    "measuring at its start. With --measured-wall it is also written as a hardware profile "
                    "under $WALLPERF_CACHE/hardware/ that replaces the named profile's figures (a GPU's "
                    "vendor figures too) for runs on this machine.")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="what to measure (default: the GPU when torch sees one, else the CPU)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke test, "
                   "not figures to rely on")
    p.add_argument("--measured-wall", action="store_true", help="write the figures as the hardware profile "
                   "--hardware names, so runs on this machine use them instead of conf/hardware's")
    p.add_argument("--hardware", help="with --measured-wall: the profile to replace (default: cpu, or "
                   "local-gpu on a GPU)")
    p.add_argument("--quiet-wait", type=float, default=QUIET_WAIT_S, metavar="S",
                   help=f"seconds to wait for other work to leave the CPUs before measuring anyway "
                        f"(default {QUIET_WAIT_S:g}); the figures then say the machine was not quiet")
    return p


def cmd_probe(args) -> int:
    from wallperf.harness.config import ConfigError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("command line", "--device", "torch sees no GPU here; allowed: auto, cpu")
    if args.hardware is not None and not args.measured_wall:
        raise ConfigError("command line", "--hardware", "only used with --measured-wall")
    if args.hardware is not None:
        from wallperf.harness.config import load_hardware_config

        load_hardware_config(args.hardware, "command line", "--hardware")
    if not (args.quiet_wait >= 0 and args.quiet_wait < float("inf")):
        raise ConfigError("command line", "--quiet-wait", f"{args.quiet_wait!r}: give the seconds to wait, >= 0")

    def waiting(busy):
        print(f"wallperf: other work keeps {busy:.1f} cores busy; waiting up to {args.quiet_wait:.0f} s for it "
              f"to end before measuring", file=sys.stderr, flush=True)

    result = probe(args.device, args.quick, quiet_wait_s=args.quiet_wait, on_wait=waiting)
    if not args.quick:
        store_host_measurement(result)
    print(format_result(result))
    if not result.quiet.quiet:
        print(f"wallperf: warning: the machine was not quiet ({'; '.join(result.quiet.reasons)}): the figures "
              f"are likely low, and runs will not reuse them; probe again when it is idle", file=sys.stderr)
    if args.measured_wall:
        print(f"wallperf: wrote {write_profile(result, name=args.hardware)}", file=sys.stderr)
    return 0
