"""A speculative `wallperf run`'s figures: what its engine did, and its speedup over the
same engine without speculation beside the memory wall's prediction.

With speculation on, `wallperf run` runs each performance test twice, each in a
process and LoadGen test of its own (wallperf.driver.run): the speculative test,
then the baseline, the same scenario settings and load with the drafter off,
recorded as a run of its own with `speculative_baseline: true`. Nothing of one
enters the other's figures; the speculative record's `speculative` section only
sets the two tokens/s side by side:

- `tokens_per_second` (with) and `baseline_tokens_per_second` (without), and
  `measured_speedup`, their ratio;
- `bytes_per_emitted_token` = (target bytes per verify step + k x draft bytes per
  step) / tokens emitted per verify, and `baseline_bytes_per_token`, the target's
  bytes per step: decode is memory-bound, so `predicted_speedup` is their ratio,
  from the run's own acceptance (k as drafted: a sequence's last steps draft
  fewer, prompt lookup may find none). Weight bytes only: the KV cache read is
  the same per emitted token either way at these contexts, and it is left out of
  both sides, as `wallperf audit speculative` leaves it out.

The perf audit (audit.perf_audit) flags a speedup above the prediction, and a
speedup with no exactness verdict beside it: a run does not compare its outputs
token for token; `wallperf audit speculative` does.
"""
from __future__ import annotations

from wallperf.audit.speculative import draft_step_bytes, predicted_speedup, weight_bytes


def engine_figures(stats, target_model, drafter, verify_path: str | None, draft_name: str | None = None) -> dict:
    """results.json's `engine.speculative` from the engine's SpecStats: acceptance,
    time per step, and the byte counts the prediction needs."""
    draft_model = getattr(drafter, "model", None)
    return {**stats.summary(), "verify_path": verify_path,
            "drafter": "ngram (prompt lookup)" if draft_model is None else f"draft model {draft_name or ''}".strip(),
            "mean_drafted_per_verify": stats.drafted / stats.verifies if stats.verifies else None,
            "target_bytes_per_verify_step": weight_bytes(target_model),
            "draft_vocab": getattr(drafter, "vocab", None),
            "draft_bytes_per_step": 0 if draft_model is None else draft_step_bytes(drafter)}


def versus_baseline(record: dict, baseline: dict) -> dict:
    """The speculative record's `speculative` section: its tokens/s against the
    baseline record's, and the roofline's prediction from its own acceptance."""
    spec = (record.get("engine") or {}).get("speculative") or {}
    with_, without = _tokens_per_second(record), _tokens_per_second(baseline)
    target, draft = spec.get("target_bytes_per_verify_step"), spec.get("draft_bytes_per_step")
    k, length = spec.get("mean_drafted_per_verify"), spec.get("mean_acceptance_length")
    known = None not in (target, draft, k, length) and length > 0
    return {
        "tokens_per_second": with_,
        "baseline_tokens_per_second": without,
        "baseline_log_dir": baseline.get("log_dir"),
        "baseline_valid": baseline.get("valid"),
        "measured_speedup": with_ / without if with_ and without else None,
        "predicted_speedup": predicted_speedup(target, draft, k, length) if known else None,
        "bytes_per_emitted_token": (target + k * draft) / length if known else None,
        "baseline_bytes_per_token": target,
    }


def _tokens_per_second(record: dict) -> float | None:
    return (record.get("metrics") or {}).get("tokens_per_second")
