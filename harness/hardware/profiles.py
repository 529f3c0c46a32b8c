"""The figures known for this machine without measuring it now, and the system a
tensor-parallel run spans, as the roofline sees it. (Which figures a run is set
against, measured at its start: harness.hardware.wall.)"""
from __future__ import annotations

import dataclasses

import torch

from wallperf.harness.config import HardwareConfig
from wallperf.harness.hardware.wall import run_wall


def hardware_profile(configured: HardwareConfig) -> tuple[HardwareConfig, str]:
    """(figures, source): a `wallperf probe --measured-wall` profile, this host's
    measurement from the last hour, else conf/hardware's, never a new measurement."""
    wall = run_wall(configured, measure=False)
    return wall.hardware, wall.source


def system_hardware(hardware: HardwareConfig, tp: int, device: str) -> tuple[HardwareConfig, str]:
    """The roofline's view of a tensor-parallel run, and a note that says so.

    Each rank reads 1/tp of the sharded weights per step, in parallel; counted here
    as the whole model's bytes per step against the whole system's bandwidth: tp
    times one GPU's, or one CPU's memory that all ranks share."""
    if torch.device(device).type == "cuda":
        system = dataclasses.replace(
            hardware, memory_gb=hardware.memory_gb * tp, bandwidth_gbps=hardware.bandwidth_gbps * tp,
            peak_tflops={k: None if v is None else v * tp for k, v in hardware.peak_tflops.items()})
        where = f"{tp} x {hardware.name} ({system.bandwidth_gbps:g} GB/s, {tp} x the peak FLOP/s)"
    else:
        system = hardware
        where = f"the one {hardware.name} memory all {tp} ranks share ({hardware.bandwidth_gbps:g} GB/s)"
    note = (f"tensor parallel over {tp} ranks: the whole model's bytes per step against {where}; "
            "the all-reduces' traffic and time are not counted as bytes")
    return system, note
