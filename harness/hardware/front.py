"""The roofline's Pareto front: tokens/s per user against tokens/s of the system.

A decode step over `b` sequences at context `c` takes at least

    memory floor  = (weight bytes + b * KV bytes per position * c) / bandwidth
    compute floor = b * (FLOPs per token + FLOPs per position * c) / peak FLOP/s

and at best exactly the larger of the two. Each user then gets one token per
step (1 / step time) and the system b of them (b / step time). Walking b from 1
up traces the front: per-user speed falls as system throughput rises, steeply
once the compute floor takes over, at the batch where the floors cross.

A measured point (system S, per user U) is set against the front at the same
per-user speed: the batch b* at which the front gives U, and the system
tokens/s it gives there, b* x U. `front_share` = S / (b* x U) is then the
point's effective concurrency over the batch the roofline would need; 1 is on
the front, above 1 is beyond it (a wrong byte or FLOP count, or caches serving
what the count says comes from memory).

The figures come from harness.hardware.roofline's byte and FLOP counts, at the
hardware profile's bandwidth and peak; `StepCost` holds them as plain numbers,
so a results.json carries what it takes to redraw the front at any context.
Mixture-of-experts weights are counted at batch 1 (the experts one token
touches): the front of a MoE model is optimistic at larger batches.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from wallperf.harness.config import HardwareConfig
from wallperf.sut.models.config import LlamaConfig
from wallperf.harness.hardware.counts import flops_per_token
from wallperf.harness.hardware.roofline import bytes_per_step, peak_flops


@dataclass(frozen=True)
class StepCost:
    """One decode step's bytes and FLOPs as linear functions of batch and context."""

    weight_bytes: float
    kv_bytes_per_position: float  # per sequence
    flops_per_token: float  # at context 0
    flops_per_position: float  # attention, per token per context position
    bandwidth_bytes_per_s: float
    peak_flops_per_s: float

    def __post_init__(self):
        if min(self.weight_bytes, self.bandwidth_bytes_per_s, self.peak_flops_per_s, self.flops_per_token) <= 0:
            raise ValueError(f"a step cost needs positive bytes, FLOPs, bandwidth and peak: {self}")

    def to_dict(self) -> dict:
        return asdict(self)

    def memory_floor_s(self, batch: float, context: float) -> float:
        return (self.weight_bytes + batch * self.kv_bytes_per_position * context) / self.bandwidth_bytes_per_s

    def compute_floor_s(self, batch: float, context: float) -> float:
        return batch * (self.flops_per_token + self.flops_per_position * context) / self.peak_flops_per_s

    def step_s(self, batch: float, context: float) -> float:
        return max(self.memory_floor_s(batch, context), self.compute_floor_s(batch, context))

    def crossing_batch(self, context: float) -> float | None:
        """The batch where the compute floor overtakes the memory floor (None: never)."""
        per_row_compute = (self.flops_per_token + self.flops_per_position * context) / self.peak_flops_per_s
        per_row_memory = self.kv_bytes_per_position * context / self.bandwidth_bytes_per_s
        if per_row_compute <= per_row_memory:
            return None
        return self.weight_bytes / self.bandwidth_bytes_per_s / (per_row_compute - per_row_memory)

    def batch_at_per_user(self, per_user_tps: float, context: float) -> float:
        """The (real-valued) batch at which the front gives each user `per_user_tps`;
        1 when even batch 1 is slower than that."""
        step = 1 / per_user_tps
        per_row_memory = self.kv_bytes_per_position * context / self.bandwidth_bytes_per_s
        weights = self.weight_bytes / self.bandwidth_bytes_per_s
        memory_batch = math.inf if per_row_memory == 0 else (step - weights) / per_row_memory
        compute_batch = step * self.peak_flops_per_s / (self.flops_per_token + self.flops_per_position * context)
        if step < weights:
            memory_batch = 0.0
        return max(1.0, min(memory_batch, compute_batch))


def step_cost(shape: LlamaConfig, hardware: HardwareConfig, dtype: str, **counts) -> StepCost:
    """The roofline's counts for one model, dtype and hardware; `counts` (the engine's own
    weights and KV storage, as for run_roofline) go to bytes_per_step."""
    weights = bytes_per_step(shape, dtype, 1, 0, **counts)
    return StepCost(weight_bytes=weights,
                    kv_bytes_per_position=bytes_per_step(shape, dtype, 1, 1, **counts) - weights,
                    flops_per_token=flops_per_token(shape, 0),
                    flops_per_position=flops_per_token(shape, 1) - flops_per_token(shape, 0),
                    bandwidth_bytes_per_s=hardware.bandwidth_gbps * 1e9,
                    peak_flops_per_s=peak_flops(hardware, dtype))


def front_rows(cost: StepCost, context: float, batches) -> list[dict]:
    """The front at each batch: both floors, the bound, and the tokens/s per user and of the system."""
    rows = []
    for b in batches:
        step = cost.step_s(b, context)
        rows.append({"batch": b, "memory_floor_ms": cost.memory_floor_s(b, context) * 1e3,
                     "compute_floor_ms": cost.compute_floor_s(b, context) * 1e3,
                     "bound": "memory" if cost.memory_floor_s(b, context) >= cost.compute_floor_s(b, context)
                     else "compute",
                     "per_user_tokens_per_second": 1 / step, "system_tokens_per_second": b / step})
    return rows


def place_on_front(cost: StepCost, context: float, system_tps: float, per_user_tps: float) -> dict:
    """How far a measured point sits from the front at its own per-user speed (module docstring)."""
    batch = cost.batch_at_per_user(per_user_tps, context)
    front_system = batch / cost.step_s(batch, context)
    return {"front_batch": batch, "front_system_tokens_per_second": front_system,
            "front_share": system_tps / front_system}


def decode_mfu(cost: StepCost, batch: float, context: float, tpot_s: float) -> float:
    """FLOP/s of decode steps of `batch` rows taking `tpot_s` each, over the peak."""
    return batch * (cost.flops_per_token + cost.flops_per_position * context) / tpot_s / cost.peak_flops_per_s
