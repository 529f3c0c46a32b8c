"""The report's speculative decoding section: what the drafter achieved, and what it bought.

One row per speculative run record, from a `wallperf run` with a drafter (its
`engine.speculative` figures and the `speculative` section set against its
baseline test, audit.speculative_run) or from `wallperf audit speculative --out`
(its `speculative` section, with the exactness verdict). Two tables:

- acceptance: the drafter, k, the verify path, acceptance rate (accepted over
  drafted tokens), mean acceptance length (tokens emitted per verify), acceptance
  by draft position, and draft and verify milliseconds per step;
- speedup: tokens/s with and without speculation, the measured speedup beside
  the roofline's prediction and the bytes per emitted token behind it, and the
  exactness audit's verdict where one is on record. Without one, the perf
  audit's flag (`speedup_without_exactness`) stands in that cell: a speedup that
  no one checked token for token is not a result MLPerf admits.

Every figure is formatted here; the templates only lay the rows out.
"""
from __future__ import annotations

from wallperf.audit.perf_audit import check_speculative, run_label


def speculative_figures(run: dict) -> dict | None:
    """A record's speculative figures in one dict (engine counters, then the comparison),
    or None for a record without speculation."""
    engine = (run.get("engine") or {}).get("speculative")
    section = run.get("speculative")
    if not isinstance(engine, dict) and not isinstance(section, dict):
        return None
    figures = {**(engine if isinstance(engine, dict) else {}), **(section if isinstance(section, dict) else {})}
    # `wallperf audit speculative --out` names the two sides candidate and reference.
    figures.setdefault("tokens_per_second", figures.get("candidate_tokens_per_s"))
    figures.setdefault("baseline_tokens_per_second", figures.get("reference_tokens_per_s"))
    return figures


def speculative_section(folders, figure, percent, missing: str) -> dict | None:
    """{"acceptance": rows, "speedup": rows} over every folder's speculative records, or
    None when there are none. `figure`, `percent` and `missing` are the report's own
    formatting (audit.report), passed in so both sections print numbers alike."""
    acceptance, speedup = [], []
    for folder in folders:
        for index, run in enumerate(folder.results["runs"]):
            f = speculative_figures(run)
            if f is None:
                continue
            common = {"run": folder.label, "test": run_label(index, run)}
            by_position = f.get("acceptance_by_position")
            acceptance.append({
                **common, "drafter": str(f.get("drafter") or missing), "k": figure(f.get("num_draft_tokens")),
                "verify_path": str(f.get("verify_path") or missing),
                "acceptance_rate": percent(f.get("acceptance_rate")),
                "mean_acceptance_length": figure(f.get("mean_acceptance_length")),
                "by_position": " / ".join(percent(a) for a in by_position) if by_position else missing,
                "draft_ms": figure(f.get("draft_ms_per_step")), "verify_ms": figure(f.get("verify_ms_per_step"))})
            flags = [code for _, code, _ in check_speculative({**run, "speculative": f})]
            speedup.append({
                **common, "with": figure(f.get("tokens_per_second")),
                "without": figure(f.get("baseline_tokens_per_second")),
                "measured": _times(f.get("measured_speedup"), figure, missing),
                "predicted": _times(f.get("predicted_speedup"), figure, missing),
                "bytes_per_token": f"{_bytes(f.get('bytes_per_emitted_token'), missing)} / "
                                   f"{_bytes(f.get('baseline_bytes_per_token') or f.get('target_bytes_per_verify_step'), missing)}",
                "exactness": _exactness(f.get("exactness"), missing),
                "exactness_class": _exactness_class(f.get("exactness")),
                "flags": ", ".join(flags)})
    return {"acceptance": acceptance, "speedup": speedup} if acceptance else None


def _times(value, figure, missing: str) -> str:
    return missing if value is None else f"{figure(value)}x"


def _bytes(value, missing: str) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return missing
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g} B"


def _exactness(exactness, missing: str) -> str:
    if not isinstance(exactness, dict) or exactness.get("verdict") is None:
        return "no exactness audit on record"
    identical, prompts = exactness.get("identical"), exactness.get("prompts")
    counts = f"{identical}/{prompts} identical" if identical is not None and prompts is not None else missing
    return f"{exactness['verdict']} ({counts})"


def _exactness_class(exactness) -> str:
    verdict = exactness.get("verdict") if isinstance(exactness, dict) else None
    return {"PASS": "ok", None: "warning"}.get(verdict, "bad")
