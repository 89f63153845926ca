"""The README is the entry point: its two fresh-machine commands exist, CI runs the test one, and it documents
every stage and recipe in the tables (adding a stage = one table entry + one test row + one README line)."""

import re
from pathlib import Path

import pytest

from ccr_ray.stages import RECIPES, STAGES

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def fresh_machine_commands() -> list[str]:
    block = README.split("## Quick start", 1)[1].split("```", 2)[1]
    return [line.split("#")[0].strip() for line in block.splitlines()[1:] if line.split("#")[0].strip()]


def test_two_commands_and_ci_runs_the_test_one():
    commands = fresh_machine_commands()
    assert commands == ["make demo", "make test"], commands
    targets = re.findall(r"^([a-z]+):", (REPO / "Makefile").read_text(), flags=re.M)
    assert {"demo", "test"} <= set(targets)
    assert "make test" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("name", list(STAGES) + list(RECIPES))
def test_every_stage_and_recipe_is_documented(name):
    assert f"`{name}`" in README, f"README does not mention `{name}`"
