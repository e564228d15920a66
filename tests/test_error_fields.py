"""Errors name the input they are about by its field; only the CLI says `--flag`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from cli.main import cli_name
from orchestrator.domain.durations import parse_duration
from orchestrator.domain.errors import FIELD, InvalidInput
from orchestrator.domain.rollout_plan import parse_budget

REPO = Path(__file__).resolve().parent.parent
BELOW_CLI = ["orchestrator/domain", "orchestrator/services", "orchestrator/adapters", "backups"]


def test_a_field_error_reads_as_the_field_and_as_the_flag() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_budget("lots", 10)
    exc = caught.value
    assert exc.field == "max_failures"
    assert str(exc) == "invalid max_failures 'lots': use N or P%"
    assert exc.shown(cli_name(exc.field)) == "invalid --max-failures 'lots': use N or P%"
    with pytest.raises(InvalidInput) as caught:
        parse_duration("soon", "tenants.statement_timeout")
    assert caught.value.shown(cli_name("tenants.statement_timeout")).startswith(
        "invalid tenants.statement_timeout 'soon':")  # a config key stays itself


def test_without_a_field_the_message_is_left_alone() -> None:
    assert str(InvalidInput(f"a literal {FIELD} stays")) == "a literal {field} stays"


def test_no_error_below_the_cli_quotes_a_cli_flag() -> None:
    """A message in the domain, adapters, services or backups that starts with or
    holds `--name` would be a CLI flag quoted below the CLI; hints naming a
    command to run (`tenantctl … --fix`) are allowed."""
    found = []
    for folder in BELOW_CLI:
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Raise) or not isinstance(node.exc, ast.Call):
                    continue
                for arg in node.exc.args[:1]:
                    parts = arg.values if isinstance(arg, ast.JoinedStr) else [arg]
                    text = "".join(p.value for p in parts if isinstance(p, ast.Constant)
                                   and isinstance(p.value, str))
                    text = re.sub(r"pg_(dump|restore) --\w+", "", text)  # the tools' own
                    if text.lstrip().startswith("--") or " --" in text.split("tenantctl")[0]:
                        found.append(f"{path.relative_to(REPO)}:{node.lineno}: {text[:60]}")
    assert not found, "name the field (field=...) instead of the flag:\n" + "\n".join(found)
