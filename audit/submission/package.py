"""`wallperf submission`: wallperf runs assembled into the official MLPerf submission tree.

    <division>/<org>/results/<system>/<benchmark>/<scenario>/
        performance/run_1/mlperf_log_{summary,detail}.txt
        accuracy/{accuracy.txt, mlperf_log_accuracy.json (truncated), mlperf_log_{summary,detail}.txt}
        TEST06/{verify_accuracy.txt, accuracy/mlperf_log_accuracy.json}   (where the checker requires it)
        measurements.json  README.md  user.conf  mlperf.conf
    <division>/<org>/systems/<system>.json
    <division>/<org>/src/README.md         (this repository's version)
    open/<org>/model_mapping.json          (the model's name -> the benchmark it stands for)

The tree is built in a temporary folder beside --out and renamed into place at
the end, so a refused or failed packaging leaves nothing half-written. `--check
DIR` runs the official checker of an mlcommons/inference checkout on the tree.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from wallperf.audit.submission.accuracy_txt import require_accuracy, write_accuracy_dir
from wallperf.audit.submission.rules import submission_notes
from wallperf.audit.submission.system_desc import read_system_desc, system_json
from wallperf.audit.test06 import verify_test06
from wallperf.harness.config import ConfigError
from wallperf.harness.config.benchmarks import BENCHMARKS, CHECKER_VERSIONS
from wallperf.harness.loadgen.results import wallperf_version
from wallperf.harness.loadgen.settings import embedded_mlperf_conf

DIVISIONS = ("open", "closed")


class RunDir:
    """One wallperf run folder, read and checked."""

    def __init__(self, path: Path):
        self.path = Path(path)
        results = self.path / "results.json"
        try:
            self.results = json.loads(results.read_text())
        except (OSError, ValueError):
            raise ConfigError(self.path, None, "not a wallperf run: no readable results.json") from None
        if not isinstance(self.results, dict) or "wallperf_version" not in self.results or \
                not isinstance(self.results.get("runs"), list):
            raise ConfigError(results, None, "not a wallperf run's results.json (no wallperf_version or runs)")
        self.records = [r for r in self.results["runs"] if not r.get("find_peak_try")]

    def tests(self):
        for r in self.records:
            yield r


def plan(run_dirs: list[RunDir], division: str, checker_version: str) -> dict:
    """{(system, benchmark folder, scenario): {"performance", "accuracy", "TEST06"}: record}; refuses what
    the checker could never accept (no benchmark, a benchmark the version lacks, a closed MMLU result)."""
    if division == "closed":
        raise ConfigError(None, "--division", "closed: wallperf's data set is MMLU, and a closed result needs the "
                          "benchmark's own data set and metric (e.g. ROUGE on CNN/DailyMail for llama3.1-8b); "
                          "use --division open")
    slots: dict = {}
    benchmarks_of: dict = {}
    for rd in run_dirs:
        for r in rd.tests():
            benchmarks_of.setdefault(r["model"], set()).add(r.get("benchmark"))
    for rd in run_dirs:
        if rd.results.get("complete") is not True:
            raise ConfigError(rd.path, None, "the run did not finish (complete: false); rerun it")
        if not (rd.results.get("config") or {}).get("user_conf"):
            raise ConfigError(rd.path, None, "the run used wallperf's own settings; submissions need "
                              "`wallperf run --submission --user-conf FILE`")
        for r in rd.tests():
            name = r.get("benchmark")
            if name not in BENCHMARKS:
                raise ConfigError(rd.path, "benchmark", f"model {r.get('model')} stands for no known MLPerf "
                                  f"benchmark ({name!r}); allowed: {', '.join(BENCHMARKS)}")
            bench = BENCHMARKS[name]
            if checker_version not in bench.required_scenarios:
                raise ConfigError(rd.path, "benchmark", f"{name} is not in checker {checker_version}'s list; it "
                                  f"is in {', '.join(bench.required_scenarios)}")
            folder = _folder(r["model"], bench, division, benchmarks_of.setdefault(r["model"], set()))
            kind = r.get("compliance_test") or r["mode"]
            slots.setdefault((r["system"], folder, r["scenario"]), {"bench": bench, "host": rd.results.get("host"),
                                                                   "user_conf": rd.results["config"]["user_conf"],
                                                                   "model": r["model"]})[kind] = r
    if not slots:
        raise ConfigError(None, "RUN_DIR", "the runs hold no finished test")
    for (system, folder, scenario), slot in slots.items():
        missing = [k for k in ("performance", "accuracy") if k not in slot]
        missing += [t for t in slot["bench"].compliance_tests.get(checker_version, ()) if t not in slot]
        if missing:
            raise ConfigError(None, "RUN_DIR", f"{system}/{folder}/{scenario} lacks its {', '.join(missing)} "
                              "test; run it with `wallperf run --submission`")
    return slots


def _folder(model: str, bench, division: str, benchmarks: set) -> str:
    """The benchmark folder: the official name (closed), or the model's own name (open,
    mapped in model_mapping.json); a model standing for two benchmarks (llama3_1-8b and
    its edge variant for SingleStream) gets one folder per benchmark."""
    if division == "closed":
        return bench.checker_name
    return model if len(benchmarks) == 1 else f"{model}-{bench.checker_name}"


def build_tree(slots: dict, root: Path, division: str, submitter: str, system_desc: dict,
               checker_version: str) -> None:
    org = root / division / submitter
    mapping = {}
    for (system, folder, scenario), slot in slots.items():
        bench = slot["bench"]
        base = org / "results" / system / folder / scenario
        perf = slot["performance"]
        (base / "performance" / "run_1").mkdir(parents=True)
        for name in ("mlperf_log_summary.txt", "mlperf_log_detail.txt"):
            shutil.copy2(Path(perf["log_dir"]) / name, base / "performance" / "run_1" / name)
        write_accuracy_dir(slot["accuracy"], Path(slot["accuracy"]["log_dir"]), base / "accuracy")
        if "TEST06" in slot:
            t = slot["TEST06"]
            verify_test06(Path(t["log_dir"]), base, scenario, t["eos_token_id"])
        shutil.copy2(slot["user_conf"], base / "user.conf")
        (base / "mlperf.conf").write_text(embedded_mlperf_conf())
        (base / "measurements.json").write_text(json.dumps(_measurements(perf), indent=2) + "\n")
        (base / "README.md").write_text(_readme(slot, bench, scenario))
        mapping[folder] = bench.checker_name
        systems = org / "systems"
        systems.mkdir(parents=True, exist_ok=True)
        host = slot["host"] or {}
        (systems / f"{system}.json").write_text(json.dumps(
            system_json(host, system_desc, division, submitter, bench.category), indent=2) + "\n")
    (org / "src").mkdir(parents=True, exist_ok=True)
    (org / "src" / "README.md").write_text(_src_readme(slots))
    if division == "open":
        (org / "model_mapping.json").write_text(json.dumps(mapping, indent=2) + "\n")


def _measurements(perf: dict) -> dict:
    return {"input_data_types": "int32",
            "retraining": "No",
            "starting_weights_filename": perf["model"],
            "weight_data_types": perf["dtype"],
            "weight_transformations": perf.get("weight_format") or "none"}


def _readme(slot: dict, bench, scenario: str) -> str:
    perf = slot["performance"]
    return (f"# {slot['model']} as {bench.checker_name}, {scenario}\n\n"
            f"Run with wallperf {perf.get('wallperf_version', '')}: `wallperf run --submission --user-conf "
            f"user.conf` (conf/runs/submission.yaml), backend {perf['backend']}, weights {perf['dtype']} "
            f"({perf.get('weight_format')}), outputs stopped at EOS after at most {perf['max_new_tokens']} "
            f"tokens. Accuracy: MMLU exact match (wallperf's data set), not {bench.checker_name}'s own.\n")


def _src_readme(slots: dict) -> str:
    return (f"# wallperf\n\nThe harness and SUT of these results, as found when they were packaged: "
            f"{source_state(Path(__file__).resolve())}.\n"
            "Every result was produced by `wallperf run --submission` and packaged by `wallperf submission`.\n")


def source_state(source_file: Path) -> str:
    """The code `source_file` belongs to: its git commit and whether the working tree had changes
    (`git status --porcelain`), or, outside a checkout that tracks the file (an installed wheel),
    the installed wallperf version."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=source_file.parent, capture_output=True, text=True, timeout=10)
    try:
        # A wheel installed inside some other repository's tree must not report that repository.
        tracked = git("ls-files", "--error-unmatch", source_file.name).returncode == 0
        head, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        tracked = False
    if not tracked or head.returncode or status.returncode:
        return (f"installed wallperf {wallperf_version()}, not a git checkout: its commit and whether it was "
                "modified are unknown")
    changed = len(status.stdout.splitlines())
    tree = "clean" if not changed else f"dirty, {changed} changed or untracked files not in that commit"
    return f"the wallperf repository at commit {head.stdout.strip()}, working tree {tree}"


def run_checker(inference_dir: Path, tree: Path, checker_version: str) -> tuple[int, str]:
    """The official checker (tools/submission/submission_checker) on the tree: (errors found?, its output)."""
    tools = Path(inference_dir) / "tools" / "submission"
    if not (tools / "submission_checker" / "main.py").is_file():
        raise ConfigError(inference_dir, "--check", "no tools/submission/submission_checker/main.py there; "
                          "pass an mlcommons/inference checkout")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "submission_checker.main", "--input", str(tree.resolve()),
                               "--version", checker_version, "--csv", str(Path(tmp) / "summary.csv")],
                              cwd=tools, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def package(run_dirs: list[Path], out: Path, submitter: str, division: str, checker_version: str,
            system_desc: Path | None) -> tuple[Path, dict]:
    """Build the tree at `out` (which must not exist); refuse bad input with a ConfigError first.
    Returns the tree and, per result folder and test, wallperf's notes for the checker version:
    the errors the checker is expected to report."""
    if checker_version not in CHECKER_VERSIONS:
        raise ConfigError(None, "--checker-version", f"{checker_version!r}; allowed: {', '.join(CHECKER_VERSIONS)}")
    if division not in DIVISIONS:
        raise ConfigError(None, "--division", f"{division!r}; allowed: {', '.join(DIVISIONS)}")
    if out.exists():
        raise ConfigError(None, "--out", f"{out} exists; choose a new folder")
    if not submitter or any(c in submitter for c in "/\\") or submitter in (".", ".."):
        raise ConfigError(None, "--submitter", f"{submitter!r} must be a plain name")
    slots = plan([RunDir(p) for p in run_dirs], division, checker_version)
    desc = read_system_desc(system_desc)
    for slot in slots.values():
        require_accuracy(slot["accuracy"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build_tree(slots, tmp, division, submitter, desc, checker_version)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    notes = {f"{system}/{folder}/{scenario}/{kind}": submission_notes(record, checker_version)
             for (system, folder, scenario), slot in slots.items()
             for kind, record in slot.items() if isinstance(record, dict) and "log_dir" in record}
    return out, notes
