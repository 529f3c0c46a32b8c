"""Quantize the big model, or simply run a smaller one?

Quantizing a model to fp8 buys speed: decode is memory-bound, and fp8 weights
halve the bytes each token must read. A smaller model of the same family buys
speed too. `audit --baseline SMALL` scores the smaller model on the audit's
questions and sets each model against the memory wall of the hardware profile
(`audit --hardware`): the bytes a token reads at batch 1, counted from the
tensors each model really holds, and the tokens/s the profile's bandwidth
allows (harness.hardware.roofline), so the user sees what each buys in
accuracy and in speed.

The plain verdict compares the quantized candidate with the baseline by the
confidence sequence of their paired accuracy difference (audit.sequential):

- "quantized": the candidate is shown more accurate than the baseline;
- "small": the interval of the candidate's advantage lies wholly at or below
  zero: the small model is as accurate or more, and it is the cheaper one;
- "undecided": the questions used do not separate them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from wallperf.audit.mmlu import MMLUResult
from wallperf.audit.sequential import confidence_interval
from wallperf.audit.verdict import points, same_questions
from wallperf.sut.models.config import LlamaConfig
from wallperf.harness.hardware.counts import held_weight_bytes
from wallperf.harness.hardware.roofline import bytes_per_token, memory_wall


@dataclass(frozen=True)
class ModelCost:
    """One model in one format at the memory wall of one hardware profile."""

    spec: str
    weight_dtype: str
    bytes_per_token: float
    memory_wall_tokens_per_second: float

    @classmethod
    def of(cls, spec: str, loaded, hardware) -> "ModelCost":
        """`loaded`: a sut.loading.LoadedModel, counted by the bytes its tensors really hold
        (fp8 weights with their scales, the bf16 embeddings and head beside them), and
        by what a decode step reads of them: one row of an untied embedding table, as
        a run's roofline counts it (harness.hardware.counts, embedding="rows")."""
        shape = loaded.config
        dtype = "fp8" if loaded.quantization else loaded.dtype
        weights = held_weight_bytes(loaded.model)
        return cls(spec, dtype, bytes_per_token(shape, dtype, weights=weights, embedding="rows"),
                   memory_wall(shape, hardware, dtype, weights=weights, embedding="rows"))

    def to_json(self) -> dict:
        return {"spec": self.spec, "weight_dtype": self.weight_dtype, "bytes_per_token": self.bytes_per_token,
                "embedding_counted": "rows",
                "memory_wall_tokens_per_second": self.memory_wall_tokens_per_second}


@dataclass(frozen=True)
class BaselineComparison:
    candidate: MMLUResult
    baseline: MMLUResult
    candidate_cost: ModelCost
    baseline_cost: ModelCost
    hardware: str
    population: int | None = None
    advantage_points: float = field(init=False)
    advantage_ci95: tuple = field(init=False)
    baseline_ci95: tuple = field(init=False)
    verdict: str = field(init=False)
    reason: str = field(init=False)

    def __post_init__(self):
        same_questions(self.candidate, self.baseline, "baseline")
        cand, base = self.candidate.correct_array().astype(float), self.baseline.correct_array().astype(float)
        lo, hi = points(confidence_interval(cand - base, self.population))
        verdict = "quantized" if lo > 0 else "small" if hi <= 0 else "undecided"
        computed = {"advantage_points": 100 * (self.candidate.accuracy - self.baseline.accuracy),
                    "advantage_ci95": (lo, hi), "baseline_ci95": confidence_interval(base, self.population),
                    "verdict": verdict}
        for key, value in computed.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "reason", self._reason())

    @property
    def speed_ratio(self) -> float:
        """The candidate's memory-wall tokens/s over the baseline's."""
        return self.candidate_cost.memory_wall_tokens_per_second / self.baseline_cost.memory_wall_tokens_per_second

    def _reason(self) -> str:
        c, b = self.candidate_cost, self.baseline_cost
        lo, hi = self.advantage_ci95
        gap = (f"the quantized model scores {self.advantage_points:+.1f} points against the small one "
               f"(95% CI {lo:+.1f} to {hi:+.1f}, {len(self.candidate.questions)} questions)")
        speed = (f"at the {self.hardware} memory wall it reads {c.bytes_per_token / 1e9:.2f} GB per token "
                 f"against {b.bytes_per_token / 1e9:.2f} GB: {c.memory_wall_tokens_per_second:.0f} against "
                 f"{b.memory_wall_tokens_per_second:.0f} tokens/s ({self.speed_ratio:.2f}x)")
        if self.verdict == "quantized":
            cost = "and is no slower" if self.speed_ratio >= 1 else "for the speed it gives up"
            return f"quantizing the big model beats running the small one: {gap}, {cost}; {speed}."
        if self.verdict == "small":
            return f"run the small model: it is at least as accurate; {gap}; {speed}."
        return f"the questions do not separate them: {gap}; {speed}."

    def to_json(self) -> dict:
        return {"verdict": self.verdict, "reason": self.reason, "baseline_accuracy": self.baseline.accuracy,
                "baseline_ci95": list(self.baseline_ci95), "advantage_points": self.advantage_points,
                "advantage_ci95": list(self.advantage_ci95), "hardware": self.hardware,
                "speed_ratio": self.speed_ratio,
                "candidate": self.candidate_cost.to_json(), "baseline": self.baseline_cost.to_json()}
