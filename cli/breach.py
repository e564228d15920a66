"""`tenantctl breach …`: the breach response, and its timed drill."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import open_fleet
from cli.confirm import YesOpt, confirm
from cli.output import err, print_json, say
from orchestrator.domain.errors import ExitCode

breach_app = typer.Typer(no_args_is_help=True, help="Breach response, and its drill.")


@breach_app.command("drill")
def drill(
    new_key_file: Annotated[Path, typer.Option(help="A new master key file (made with "
                                               "`keys generate`) to rotate to.")],
    kill_sessions: Annotated[bool, typer.Option(help="End sessions opened with old "
                                                "passwords.")] = False,
    concurrency: Annotated[int, typer.Option(min=1)] = 4,
    dry_run: Annotated[bool, typer.Option(help="Count what each step would change; "
                                          "change nothing.")] = False,
    yes: YesOpt = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run the whole breach response and time each step: every tenant password
    rotated, every support grant revoked, every tenant secret re-wrapped under a
    new master key. Then point `master_key` in the config at the new key. It is
    real, not a simulation: it asks first, or needs --yes."""
    from orchestrator.adapters.crypto.masterkey import MasterKeySource, load_master_key
    from orchestrator.domain.guardrails import plural
    from orchestrator.services import breach

    new = load_master_key(MasterKeySource(file=new_key_file))
    fleet = open_fleet()
    try:
        plan = breach.drill_plan(fleet, new)
        summary = (f"{plural(plan['passwords'], 'tenant password')} rotated"
                   + (" (their sessions ended)" if kill_sessions else "")
                   + f", {plural(plan['grants'], 'support grant')} revoked, "
                   f"{plural(plan['identities'], 'tenant key')} and "
                   f"{plural(plan['passwords_wrapped'], 'password')} re-wrapped from "
                   f"master key {plan['master_key_id']} to {new.key_id}")
        if dry_run:
            if as_json:
                print_json({"dry_run": True, "kill_sessions": kill_sessions, **plan})
            else:
                say(f"dry run, nothing changed: {summary}")
            return
        confirm("Run the breach drill (it really rotates every password)?", yes,
                summary=summary)
        steps = breach.drill(fleet, new, kill_sessions=kill_sessions,
                             concurrency=concurrency)
    finally:
        fleet.close()
    if as_json:
        print_json({"new_master_key_id": new.key_id, "steps": steps})
    else:
        for st in steps:
            say(f"{st['step']}: {st['done']} in {st['seconds']}s"
                + (f", failed: {st['failed']}" if st["failed"] else ""))
            errors: dict[str, str] = st.get("errors") or {}  # type: ignore[assignment]
            for what, why in errors.items():
                err(f"error: {st['step']}: {what}: {why}")
        say(f"now set master_key in the config to {new_key_file} ({new.key_id})")
    if any(st["failed"] for st in steps):
        raise typer.Exit(ExitCode.FAILED)
