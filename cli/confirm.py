"""The one confirmation before a command changes or destroys much: `--yes`, or a
terminal to ask on; with neither, refuse (exit 2) before anything has changed."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated

import typer

from orchestrator.domain.errors import ExitCode

YesOpt = Annotated[bool, typer.Option("--yes", help="Do not ask: confirm on the "
                                      "command line (needed without a terminal).")]


def confirm(question: str, yes: bool, *, summary: str = "",
            details: Sequence[str] = ()) -> None:
    """Return when the operator agreed: ``--yes``, or "y" at a terminal prompt (on
    stderr, so `--json` output stays clean). ``summary`` is one line saying what
    will change; ``details`` the longer plan shown above the prompt. Without a
    terminal and without --yes: an InvalidInput (exit 2). A "no": exit 1. Call it
    before the first write."""
    from orchestrator.domain.errors import InvalidInput

    if yes:
        return
    if not sys.stdin.isatty():
        raise InvalidInput(f"{summary or question.rstrip('?')} — confirm with --yes (no "
                           "terminal to ask on); nothing changed")
    for line in details or ([summary] if summary else []):
        typer.echo(line, err=True)
    if not typer.confirm(question, default=False, err=True):
        typer.echo("nothing changed", err=True)
        raise typer.Exit(ExitCode.FAILED)
