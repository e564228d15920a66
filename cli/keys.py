"""`tenantctl keys …`: the master key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import open_fleet
from cli.confirm import YesOpt, confirm
from cli.output import print_json, say

keys_app = typer.Typer(no_args_is_help=True, help="The master key that wraps tenant secrets.")


@keys_app.command("generate")
def generate(
    path: Annotated[Path, typer.Argument(help="New key file (mode 0600).")],
    kms_key_id: Annotated[str | None, typer.Option(
        help="Make the master key a KMS data key: PATH then holds only its encrypted "
             "form, decrypted by KMS at each start.")] = None,
    kms_region: Annotated[str | None, typer.Option()] = None,
    kms_endpoint_url: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Write a new master key file (random, or a KMS data key); never overwrites."""
    from orchestrator.adapters.crypto.masterkey import (
        MasterKeySource,
        load_master_key,
        write_key_file,
        write_kms_data_key,
    )
    from orchestrator.domain.errors import Conflict

    try:
        if kms_key_id:
            source = MasterKeySource(kms_key_id=kms_key_id, kms_data_key_file=path,
                                     kms_region=kms_region, kms_endpoint_url=kms_endpoint_url)
            write_kms_data_key(source, path)
        else:
            source = MasterKeySource(file=path)
            write_key_file(path)
    except FileExistsError:
        raise Conflict(f"{path} already exists") from None
    say(f"wrote {path} (master key {load_master_key(source).key_id})")


@keys_app.command("rotate-master")
def rotate_master(
    new_key_file: Annotated[Path | None, typer.Option(
        help="The new key's file (with --new-kms-key-id: its KMS-encrypted data key, "
             "as written by `keys generate --kms-key-id`).")] = None,
    new_key_env: Annotated[str | None, typer.Option(help="Environment variable holding "
                                                    "the new key.")] = None,
    new_kms_key_id: Annotated[str | None, typer.Option(
        help="Rotate to a KMS-envelope master key: KMS decrypts --new-key-file.")] = None,
    new_kms_region: Annotated[str | None, typer.Option()] = None,
    new_kms_endpoint_url: Annotated[str | None, typer.Option()] = None,
    dry_run: Annotated[bool, typer.Option(help="Count what would be re-wrapped; change "
                                          "nothing.")] = False,
    yes: YesOpt = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Re-wrap every tenant key and password under a new master key (all or nothing);
    then point `master_key` in the config at the new key. Asks first, or needs --yes."""
    from orchestrator.adapters.crypto.masterkey import MasterKeySource, load_master_key
    from orchestrator.domain.errors import InvalidInput
    from orchestrator.domain.guardrails import plural
    from orchestrator.services import credentials

    if (new_key_file is None) == (new_key_env is None):
        raise InvalidInput("give --new-key-file or --new-key-env")
    if new_kms_key_id and new_key_file is None:
        raise InvalidInput("--new-kms-key-id needs --new-key-file (the encrypted data key)")
    if new_kms_key_id:
        source = MasterKeySource(kms_key_id=new_kms_key_id, kms_data_key_file=new_key_file,
                                 kms_region=new_kms_region,
                                 kms_endpoint_url=new_kms_endpoint_url)
    else:
        source = MasterKeySource(file=new_key_file, env=new_key_env)
    new = load_master_key(source)
    fleet = open_fleet()
    try:
        if new.key_id == fleet.master_key.key_id:
            raise InvalidInput("the new master key is the one configured now")
        plan = credentials.rotate_master_plan(fleet, new)
        summary = (f"{plural(plan['identities'], 'tenant key')} and "
                   f"{plural(plan['passwords'], 'password')} re-wrapped from master key "
                   f"{fleet.master_key.key_id} to {new.key_id}, "
                   "which becomes the fleet's (the config must then name it)")
        if dry_run:
            if as_json:
                print_json({"dry_run": True, "master_key_id": fleet.master_key.key_id,
                            "new_master_key_id": new.key_id, **plan})
            else:
                say(f"dry run, nothing changed: {summary}")
            return
        confirm("Rotate the master key?", yes, summary=summary)
        counts = credentials.rotate_master(fleet, new)
    finally:
        fleet.close()
    if as_json:
        print_json({"new_master_key_id": new.key_id, **counts})
        return
    say(f"re-wrapped {counts['identities']} tenant keys and {counts['passwords']} "
        f"passwords under master key {new.key_id}; now set master_key in the config to it")
