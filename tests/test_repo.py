"""The README's Quick start and .ci/run say the same thing: CI runs exactly the README's two commands."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_ci_runs_exactly_the_readme_setup_and_test_commands():
    setup, test, *_ = quick_start_commands()
    ci_lines = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines()]
    commands = [l for l in ci_lines if l and not l.startswith("#") and not l.startswith(("set ", "cd "))]
    assert commands == [setup, test]
    assert "set -euo pipefail" in ci_lines  # a failing command fails CI


def test_every_pin_in_requirements_says_why():
    lines = (REPO / "requirements.txt").read_text().splitlines()
    for i, line in enumerate(lines):
        if "==" in line and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), f"pin without a comment above it: {line}"
