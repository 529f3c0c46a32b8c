"""The performance audit: results in a results.json that cannot be right, or are easy to misread.

Every check is a pure function of one run record (and the run config), so a
reader can see exactly why a figure was flagged. What is flagged:

- error `above_memory_wall`: tokens/s above what memory bandwidth allows at the
  decode batch the run held (`memory_bound_tokens_per_second`; at batch 1 that
  is the memory wall itself). A decode step must stream every weight once, so
  such a figure was mismeasured, or the weights never came from memory (a
  model small enough for the caches), or the batch or hardware profile is wrong.
- error `above_compute_roof`: tokens/s above the compute-bound figure (MFU > 1).
- error `mbu_above_one`, `decode_mbu_above_one`, `mfu_above_one`: a utilization
  above 1, over the whole run, over decode alone (one step's bytes per TPOT), or
  of the compute peak. No figure can pass its roof, so the bandwidth (or peak)
  figure, its source or the byte count is wrong, and every figure read against
  them with it: the message names all three, and `wallperf run` marks the
  record's roofline untrusted (`roofline_trust`). `mbu_above_one` agrees with
  `above_memory_wall` for records the harness wrote; it is checked on its own
  because the two figures come from different fields and a hand-edited or
  foreign record can break one and not the other.
- error `no_scenario`: tokens/s without the scenario that produced it. Offline
  and SingleStream tokens/s differ by the batch, so such a figure means nothing.
- error `latency_limits_missed`: a Server/Interactive run whose p99 TTFT or
  TPOT is above the limits of its scenario config, or that LoadGen found
  failing its performance constraints. Its tokens/s is not a Server result.
- error `loadgen_invalid`: LoadGen judged the run INVALID.
- error `test06_failed`: an accuracy run whose TEST06 compliance check failed.
- warning `too_short`: a performance run whose min_duration is below MLPerf's
  600 s: fine to look at, not a submission result.
- warning `not_for_submission`: otherwise, `submission_valid` is false; the
  harness's notes say why.
- warning `test06_missing`: an accuracy run without a TEST06 outcome.
- warning `incomplete`: results.json of an interrupted run.
- info `no_roofline`: a performance run with tokens/s but no memory wall to
  read it against (the run's hardware or model shape was unknown).
- error `speedup_above_prediction`: a speculative run's speedup over the same
  engine without speculation is more than 5% above the roofline's prediction
  from its own acceptance ((target bytes per verify + k x draft bytes) per
  accepted tokens): the baseline was not memory-bound or was slowed, or the
  figures were mismeasured.
- error `speedup_without_exactness`: a speculative speedup quoted without an
  exactness audit (`wallperf audit speculative`), and `speculation_not_exact`
  with one that failed: MLPerf admits speculation only where the output is
  greedy decoding's, token for token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from wallperf.harness.loadgen.results import SUBMISSION_MIN_DURATION_S
from wallperf.sut.scenarios import SCENARIOS

Severity = Literal["error", "warning", "info"]
SEVERITIES = ("error", "warning", "info")
# Scenarios that LoadGen judges on token latencies (Interactive is its Server scenario).
LATENCY_SCENARIOS = tuple(s.name for s in SCENARIOS.values() if s.server_like)
# The words harness.loadgen.logs uses for LoadGen's result_perf_constraints_met = false.
_CONSTRAINTS_WORDS = "performance constraints"


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    run: str
    code: str
    message: str

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")


def run_label(index: int, run: dict) -> str:
    """How a finding names its run: scenario and mode, or its position when the scenario is missing."""
    scenario = run.get("scenario") or f"run #{index + 1} (no scenario)"
    return f"{scenario} {run.get('mode') or '?'}"


def scenario_config(results: dict, scenario: str | None) -> dict:
    """The run config's settings for `scenario` (empty when results.json has none)."""
    for sc in (results.get("config") or {}).get("scenarios") or []:
        if isinstance(sc, dict) and sc.get("name") == scenario:
            return sc
    return {}


def _figure(value, spec: str = ".4g") -> str:
    return "?" if value is None else format(value, spec)


def _tokens_per_second(run: dict) -> float | None:
    return (run.get("metrics") or {}).get("tokens_per_second")


def check_roofline(run: dict) -> list[tuple[Severity, str, str]]:
    tps, rf = _tokens_per_second(run), run.get("roofline")
    if tps is None or run.get("mode") == "accuracy":
        return []
    if not isinstance(rf, dict):
        return [("info", "no_roofline", f"{tps:.4g} tokens/s has no memory wall to be read against "
                                        "(no roofline figures in the record)")]
    found = []
    batch = rf.get("batch") or 1
    bound = rf.get("memory_wall_tokens_per_second") if batch == 1 else rf.get("memory_bound_tokens_per_second")
    if bound is not None and tps > bound:
        what = "the memory wall" if batch == 1 else f"the memory-bound limit at batch {batch}"
        found.append(("error", "above_memory_wall",
                      f"{tps:.4g} tokens/s is above {what}, {bound:.4g} tokens/s "
                      f"({_figure(rf.get('peak_bandwidth_gbps'))} GB/s, context {rf.get('context', '?')}): "
                      "impossible if every weight is read from memory each step; check the batch, "
                      "the hardware profile, or whether the model fits in cache"))
    compute = rf.get("compute_bound_tokens_per_second")
    if compute is not None and tps > compute:
        found.append(("error", "above_compute_roof",
                      f"{tps:.4g} tokens/s is above the compute roof, {compute:.4g} tokens/s "
                      f"(MFU {_figure(rf.get('mfu'), '.2f')}): impossible at the profile's peak FLOP/s"))
    found += [("error", code, message) for code, message in impossible_figures(rf)]
    return found


def impossible_figures(rf: dict) -> list[tuple[str, str]]:
    """(code, message) for each utilization above 1 in a roofline record."""
    source = rf.get("hardware_source", "unknown source")
    how = f"; {rf['hardware_how']}" if rf.get("hardware_how") else ""
    bandwidth = (f"the peak {_figure(rf.get('peak_bandwidth_gbps'))} GB/s of {rf.get('hardware', '?')} "
                 f"({source}{how}), for {_figure(rf.get('bytes_per_step'), '.4g')} bytes per step at batch "
                 f"{rf.get('batch', '?')}")
    found = []
    for key, code, what, achieved in (("mbu", "mbu_above_one", "MBU", "achieved_bandwidth_gbps"),
                                      ("decode_mbu", "decode_mbu_above_one", "decode MBU (at TPOT p50)",
                                       "decode_achieved_bandwidth_gbps")):
        value = rf.get(key)
        if value is not None and value > 1:
            found.append((code, f"{what} {value:.2f}: achieved {_figure(rf.get(achieved))} GB/s exceeds "
                                f"{bandwidth}: the bandwidth figure or the byte count is wrong"))
    mfu = rf.get("mfu")
    if mfu is not None and mfu > 1:
        found.append(("mfu_above_one", f"MFU {mfu:.2f}: achieved {_figure(rf.get('achieved_tflops'))} TFLOP/s "
                                       f"exceeds the {rf.get('compute_dtype', '?')} peak of "
                                       f"{rf.get('hardware', '?')} ({source}{how}): the peak or the FLOP count "
                                       "is wrong"))
    return found


def roofline_trust(rf: dict) -> dict:
    """What a run record says of its own roofline: untrusted when any figure is impossible."""
    reasons = [message for _, message in impossible_figures(rf)]
    return {"trusted": not reasons, "untrusted_reasons": reasons}


def check_scenario(run: dict) -> list[tuple[Severity, str, str]]:
    tps = _tokens_per_second(run)
    if run.get("scenario") or tps is None:
        return []
    return [("error", "no_scenario", f"{tps:.4g} tokens/s is quoted without the scenario that produced it; "
                                     "tokens/s of different scenarios cannot be compared")]


def check_latency_limits(run: dict, scenario_cfg: dict) -> list[tuple[Severity, str, str]]:
    if run.get("scenario") not in LATENCY_SCENARIOS or run.get("mode") == "accuracy":
        return []
    metrics = run.get("metrics") or {}
    missed = []
    for name, limit_key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms")):
        p99 = (metrics.get(limit_key) or {}).get("p99")
        limit = scenario_cfg.get(limit_key)
        if p99 is not None and limit is not None and p99 > limit:
            missed.append(f"p99 {name} {p99:.4g} ms > limit {limit:g} ms")
    if any(_CONSTRAINTS_WORDS in r for r in run.get("invalid_reasons") or []):
        missed.append("LoadGen: performance constraints not met")
    if not missed:
        return []
    return [("error", "latency_limits_missed",
             f"{run['scenario']} missed its latency limits ({'; '.join(missed)}); its tokens/s is not a "
             f"{run['scenario']} result")]


def check_validity(run: dict) -> list[tuple[Severity, str, str]]:
    if run.get("valid") is not False:
        return []
    reasons = "; ".join(run.get("invalid_reasons") or []) or "no reason recorded"
    return [("error", "loadgen_invalid", f"LoadGen judged the run INVALID: {reasons}")]


def check_submission(run: dict, scenario_cfg: dict) -> list[tuple[Severity, str, str]]:
    """One finding per run: too short says the most; otherwise the harness's notes say why."""
    duration = scenario_cfg.get("min_duration_s")
    if run.get("mode") == "performance" and duration is not None and duration < SUBMISSION_MIN_DURATION_S:
        return [("warning", "too_short", f"min_duration {duration:g} s is below MLPerf's "
                                         f"{SUBMISSION_MIN_DURATION_S} s: not a submission result")]
    if run.get("submission_valid") is False:
        notes = "; ".join(run.get("submission_notes") or []) or "no note recorded"
        return [("warning", "not_for_submission", f"not valid for submission: {notes}")]
    return []


def check_test06(run: dict) -> list[tuple[Severity, str, str]]:
    if run.get("mode") != "accuracy":
        return []
    test06 = (run.get("compliance") or {}).get("test06")
    if not isinstance(test06, dict) or test06.get("passed") is None:
        return [("warning", "test06_missing", "accuracy run without a TEST06 compliance outcome")]
    if test06["passed"]:
        return []
    failed = [name for name, c in (test06.get("checks") or {}).items()
              if isinstance(c, dict) and c.get("status") == "failed"]
    return [("error", "test06_failed", "TEST06 failed" + (f": {', '.join(failed)}" if failed else ""))]


# Noise allowed above the speculative prediction before it is flagged.
SPECULATIVE_TOLERANCE = 0.05


def check_speculative(run: dict) -> list[tuple[Severity, str, str]]:
    spec = run.get("speculative")
    if not isinstance(spec, dict) or spec.get("measured_speedup") is None:
        return []
    found, measured, predicted = [], spec["measured_speedup"], spec.get("predicted_speedup")
    if predicted is not None and measured > predicted * (1 + SPECULATIVE_TOLERANCE):
        found.append(("error", "speedup_above_prediction",
                      f"speculative speedup {_figure(measured)}x is above the roofline's {_figure(predicted)}x "
                      f"predicted from the run's own acceptance: the baseline was not memory-bound or was "
                      f"slowed, or a figure is wrong"))
    exactness = spec.get("exactness")
    if not isinstance(exactness, dict) or exactness.get("verdict") is None:
        found.append(("error", "speedup_without_exactness",
                      f"speculative speedup {_figure(measured)}x quoted without an exactness audit "
                      "(wallperf audit speculative): the outputs may not be greedy decoding's"))
    elif exactness["verdict"] != "PASS":
        found.append(("error", "speculation_not_exact",
                      f"the exactness audit failed ({exactness.get('share_identical')} of outputs identical "
                      "to greedy decoding): its speedup is not a valid result"))
    return found


def check_retry(run: dict) -> list[tuple[Severity, str, str]]:
    """A test that stands for a second try (wallperf.driver.retry): its first attempt was INVALID."""
    retry = run.get("retry_of")
    if not isinstance(retry, dict):
        return []
    changed = retry.get("changed") if isinstance(retry.get("changed"), dict) else {}
    what = ", ".join(f"{k} {v.get('before')} -> {v.get('after')}" for k, v in changed.items()
                     if isinstance(v, dict)) or "the same settings"
    reasons = "; ".join(map(str, retry.get("invalid_reasons") or [])) or "no reason recorded"
    return [("warning", "retried", f"a second try: the first attempt was INVALID ({reasons}); this one ran with "
             f"{what}; the attempt's record is in results.json's `retried`, its LoadGen logs in {retry.get('log_dir')}")]


def audit_results(results: dict) -> list[Finding]:
    """Every finding for a results.json, errors first, then in run order."""
    findings = []
    if results.get("complete") is False:
        findings.append(Finding("warning", "all", "incomplete",
                                "the run was interrupted: results.json holds only the tests that finished"))
    for index, run in enumerate(results.get("runs") or []):
        cfg = scenario_config(results, run.get("scenario"))
        label = run_label(index, run)
        for check in (check_scenario(run), check_validity(run), check_roofline(run),
                      check_latency_limits(run, cfg), check_test06(run), check_submission(run, cfg),
                      check_speculative(run), check_retry(run)):
            findings.extend(Finding(sev, label, code, msg) for sev, code, msg in check)
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))
