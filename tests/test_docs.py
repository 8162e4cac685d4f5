"""The README and CI say what the code does: commands, store columns, optimizer settings."""

from __future__ import annotations

from pathlib import Path

import yaml

from sweeper.optim import OPTIMIZER_NAMES, accepted_hparams
from sweeper.spec import OPTIMIZERS, expand, parse_spec
from sweeper.store import TABLES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
COMMANDS = (
    "./install.sh",
    ".venv/bin/sweep run experiments/quickstart.yaml --report",
    ".venv/bin/pytest",
)


def test_readme_quickstart_commands_are_the_ones_ci_and_the_repo_use():
    for command in COMMANDS:
        assert f"\n{command}" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\n./install.sh\n" in ci and "\n.venv/bin/pytest\n" in ci
    assert (ROOT / "experiments" / "quickstart.yaml").is_file()


def test_readme_documents_every_store_column():
    for schema in TABLES.values():
        for field in schema:
            assert f"| `{field.name}` |" in README, field.name


def test_readme_documents_every_optimizer_setting():
    for name in OPTIMIZER_NAMES:
        assert f"| `{name}` |" in README
        for key in accepted_hparams(name):
            assert key.startswith("lr_") or f"`{key}`" in README, (name, key)


def test_readme_grid_file_example_is_a_valid_grid():
    start = README.index("```yaml\nname: ")
    block = README[start + len("```yaml\n") : README.index("```", start + 7)]
    spec = parse_spec(yaml.safe_load(block), "README")
    assert len(expand(spec, "fp")) > 100


def test_the_grid_schema_knows_exactly_the_registry_optimizers():
    # spec.py keeps its own list so that loading a grid file needs no torch
    assert tuple(OPTIMIZERS) == tuple(OPTIMIZER_NAMES)
