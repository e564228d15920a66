"""`tenantctl breach …`: the breach response, and its timed drill."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import open_fleet
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
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run the whole breach response and time each step: every tenant password
    rotated, every support grant revoked, every tenant secret re-wrapped under a
    new master key. Then point `master_key` in the config at the new key."""
    import time

    from orchestrator.adapters.crypto.masterkey import MasterKeySource, load_master_key
    from orchestrator.domain.errors import InvalidInput
    from orchestrator.services import access, breach, credentials

    new = load_master_key(MasterKeySource(file=new_key_file))
    fleet = open_fleet()
    steps: list[dict[str, object]] = []
    try:
        if new.key_id == fleet.master_key.key_id:
            raise InvalidInput("the new master key is the one configured now")
        t0 = time.perf_counter()
        results = breach.rotate_all(fleet, concurrency=concurrency,
                                    kill_sessions=kill_sessions)
        steps.append({"step": "rotate tenant passwords", "seconds":
                      round(time.perf_counter() - t0, 2),
                      "done": sum(r.ok for r in results),
                      "failed": [r.tenant for r in results if not r.ok]})
        t0 = time.perf_counter()
        # one grant that cannot be revoked is reported; the master key is re-wrapped
        revoked = access.revoke_all(fleet)
        steps.append({"step": "revoke support grants",
                      "seconds": round(time.perf_counter() - t0, 2),
                      "done": len(revoked.revoked), "failed": sorted(revoked.failed),
                      "errors": {str(k): v for k, v in revoked.failed.items()}})
        t0 = time.perf_counter()
        counts = credentials.rotate_master(fleet, new)
        steps.append({"step": "re-wrap under the new master key",
                      "seconds": round(time.perf_counter() - t0, 2),
                      "done": counts["identities"] + counts["passwords"], "failed": []})
        fleet.catalog.audit("breach.drill", steps=steps, new_master_key_id=new.key_id)
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
