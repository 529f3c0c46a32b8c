"""The README's Quickstart is what users and CI run: keep the two in step."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quickstart_has_exactly_two_commands_and_pins_torch_first():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert commands[0].endswith("wallperf run")
    for command in commands:
        assert command.index("torch==2.13.0") < command.index("-e ")


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quickstart_commands()[1] in ci_lines
