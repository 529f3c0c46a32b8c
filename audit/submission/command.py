"""The `wallperf submission` command: parse, package, and optionally run the official checker."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from wallperf.audit.submission.package import DIVISIONS, package, run_checker
from wallperf.harness.config.benchmarks import CHECKER_VERSIONS

_HELP = """\
Assemble the official MLPerf submission tree from `wallperf run --submission`
folders: <division>/<ORG>/results/<system>/<benchmark>/<scenario>/{performance/run_1,
accuracy,TEST0X}, measurements.json, README.md, user.conf and mlperf.conf per
scenario, systems/<system>.json, src/, and model_mapping.json (open division).
Processor, cores, memory, accelerators and software come from the run; the
rest of the system description (system_name, status, storage, networking,
cooling, memory configuration) from --system-desc FILE.yaml.
"""


def add_submission_parser(subparsers) -> None:
    p = subparsers.add_parser("submission", help="package runs as an MLPerf submission tree (and check it)",
                              description=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="wallperf run output folders")
    p.add_argument("--out", type=Path, required=True, help="the submission folder to create (must not exist)")
    p.add_argument("--submitter", required=True, help="your organization's name (a plain name)")
    p.add_argument("--division", choices=DIVISIONS, default="open", help="open (default) or closed")
    p.add_argument("--checker-version", choices=CHECKER_VERSIONS, default="v6.1")
    p.add_argument("--system-desc", type=Path, help="YAML with the system fields a machine cannot measure")
    p.add_argument("--check", type=Path, metavar="MLCOMMONS_INFERENCE_DIR",
                   help="run the official submission checker of that checkout on the tree; exit 1 on errors")


def cmd_submission(args) -> int:
    tree, notes = package(args.run_dirs, args.out, args.submitter, args.division, args.checker_version,
                          args.system_desc)
    print(f"wallperf: submission tree written to {tree}", file=sys.stderr)
    for test, test_notes in notes.items():
        verdict = "submission-valid" if not test_notes else "not submission-valid: " + "; ".join(test_notes)
        print(f"wallperf: {test} ({args.checker_version}): {verdict}", file=sys.stderr)
    if args.check is None:
        return 0
    rc, output = run_checker(args.check, tree, args.checker_version)
    # The checker's own errors, then its summary counts.
    summary = [line for line in output.splitlines()
               if "ERROR]" in line or re.search(r"main\.py:\d+ INFO\] .*(Results|Systems)=", line)]
    print("\n".join(summary) or output[-4000:])
    return 0 if rc == 0 else 1
