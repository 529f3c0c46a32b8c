"""Every `wallperf` command the README and docs/ show is a command the real
parser accepts (subcommand, flags, values), and the quick ones run: a renamed
flag or a removed subcommand fails here, not in a user's terminal."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from wallperf.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Commands cheap enough to run here: they print, they do not benchmark.
RUN = ("roofline",)


def _placeholder(token: str) -> bool:
    """SPEC, N, RUN_DIR, URL,...: a value the reader fills in."""
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*(,\.\.)?|\.\.\.", token))


def shown_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        text = path.read_text()
        blocks = [b for lang, b in re.findall(r"```(\w*)\n(.*?)```", text, re.S) if lang in ("sh", "")]
        lines = [line for b in blocks for line in b.splitlines()]
        # Inline code naming a bare subcommand (`wallperf probe`) is a mention, not a command.
        lines += [span for span in re.findall(r"`(wallperf [^`]+)`", text) if len(span.split()) > 2]
        for line in lines:
            line = line.split("  #", 1)[0].strip()
            line = re.sub(r"^.*?(\.venv/bin/)?(?=wallperf )", "", line) if "wallperf " in line else ""
            if not line.startswith("wallperf ") or "[" in line or "|" in line or "<" in line:
                continue
            try:
                argv = shlex.split(line)[1:]
            except ValueError:
                continue
            if any(_placeholder(t) for t in argv):
                continue
            found.append((f"{path.name}: {line}", argv))
    return found


COMMANDS = shown_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 20, [c for c, _ in COMMANDS]


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[c for c, _ in COMMANDS])
def test_shown_command_parses(where, argv):
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if args.command == "sweep":
            build_parser().parse_args(["run", *unknown])
        elif unknown:
            pytest.fail(f"{where}: unrecognized arguments {unknown}")
    except SystemExit as e:
        if e.code != 0:  # --help exits 0
            pytest.fail(f"{where}: the parser refused it (exit {e.code})")


@pytest.mark.parametrize("where,argv", [c for c in COMMANDS if c[1][0] in RUN or "--help" in c[1]],
                         ids=[c for c, a in COMMANDS if a[0] in RUN or "--help" in a])
def test_quick_shown_command_runs(where, argv, tmp_path):
    done = subprocess.run([sys.executable, "-m", "wallperf.cli", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{where}: exit {done.returncode}\n{done.stderr[-2000:]}"
    assert done.stdout.strip()
