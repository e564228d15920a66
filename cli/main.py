"""The tenantctl CLI: parses, calls the orchestrator, renders. Nothing else.

Imports of the orchestrator happen inside commands so that `--help` stays fast
(but for the exit-code table, orchestrator.domain.errors: pure and small).
Expected failures (TenantctlError) become one line on stderr and a non-zero
exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from cli.access import access_app
from cli.backup import backup_app
from cli.common import State, current_config, open_fleet, open_reads, print_json, say, table
from cli.doctor import doctor
from cli.keys import breach_app, keys_app
from cli.lifecycle import audit_app, register_tenant_commands, retention_app
from cli.migrate import migrate_app
from cli.scheduler import scheduler_app
from orchestrator.domain.errors import ExitCode

if TYPE_CHECKING:
    from orchestrator.api import ProvisionResult
    from orchestrator.config import Config


def _plain_params() -> None:
    """Recent typer coerces each parameter of the command it runs through a pydantic
    TypeAdapter built on first use: importing pydantic and building the adapters cost
    every command ~0.15 s before it starts. A ``str`` or ``bool`` parameter without a
    parser whose value already has exactly that type (argv, defaults) needs no
    coercion: it is returned as is, and any other value goes to typer's own coercion.
    A typer without these internals (older, or changed) is left alone;
    tests/test_cli.py notices that."""
    try:
        from dataclasses import dataclass

        from typer import core as typer_core
        from typer._coercion import RuntimeParam, TypeDescriptor
    except ImportError:
        return
    original = getattr(typer_core, "build_runtime_param", None)
    if original is None or getattr(original, "plain", False):
        return  # absent, or already ours
    build: Callable[[TypeDescriptor], Any] = original

    @dataclass(frozen=True)
    class Plain(RuntimeParam):
        descriptor: TypeDescriptor

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if type(value) is self.annotation:
                return value
            return build(self.descriptor)._coerce_value(value, param=param, ctx=ctx)

    def build_runtime_param(descriptor: TypeDescriptor) -> Any:
        if descriptor.annotation in (str, bool) and descriptor.file_annotation is None \
                and descriptor.parameter_info.parser is None:
            return Plain(parameter_info=descriptor.parameter_info,
                         annotation=descriptor.annotation, descriptor=descriptor)
        return build(descriptor)

    build_runtime_param.plain = True  # type: ignore[attr-defined]
    typer_core.build_runtime_param = build_runtime_param  # type: ignore[attr-defined]


_plain_params()
if "TYPER_USE_RICH" not in os.environ:
    # `--help` in click's plain layout: typer's rich layout imports rich, markdown-it
    # and pygments first (half of the ~0.25 s a `--help` took). TYPER_USE_RICH=1 (typer's
    # own switch) brings it back. Our tables and messages still use rich.
    typer.core.HAS_RICH = False

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Database-per-tenant provisioning and operations for PostgreSQL.")
local_app = typer.Typer(no_args_is_help=True, help="Run the embedded local fleet.")
catalog_app = typer.Typer(no_args_is_help=True, help="The orchestrator's own database.")
config_app = typer.Typer(no_args_is_help=True, help="The tenantctl.toml file.")
region_app = typer.Typer(no_args_is_help=True, help="Regions and their servers.")
tenant_app = typer.Typer(no_args_is_help=True, help="Tenants: create, inspect, connect.")
template_app = typer.Typer(no_args_is_help=True, help="Per-server template databases.")
for sub, name in [(local_app, "local"), (catalog_app, "catalog"), (config_app, "config"),
                  (region_app, "region"), (tenant_app, "tenant"), (template_app, "template")]:
    app.add_typer(sub, name=name)


app.add_typer(migrate_app, name="migrate")
app.add_typer(backup_app, name="backup")
app.add_typer(keys_app, name="keys")
app.add_typer(retention_app, name="retention")
app.add_typer(audit_app, name="audit")
app.add_typer(scheduler_app, name="scheduler")
app.add_typer(access_app, name="access")
app.add_typer(breach_app, name="breach")
register_tenant_commands(tenant_app)
app.command()(doctor)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.callback()
def _root(config: Annotated[str | None, typer.Option(
        "--config", "-C", help="Config file (default: $TENANTCTL_CONFIG or ./tenantctl.toml)",
        show_default=False)] = None,
        actor: Annotated[str | None, typer.Option(
            "--actor", help="Who is acting, for the audit log (default: $TENANTCTL_ACTOR, "
            "else OS user@host).", show_default=False)] = None) -> None:
    State.config_path = config
    if actor:
        os.environ["TENANTCTL_ACTOR"] = actor  # read by orchestrator.adapters.catalog.db.actor()


# -- init / local / catalog / config -------------------------------------------------


@app.command()
def init(
    local: Annotated[bool, typer.Option("--local", help="Write a config for the embedded "
                                        "two-region fleet on this machine.")] = False,
    state_dir: Annotated[Path, typer.Option(help="Where data dirs, keys and backups go.")]
    = Path(".tenantctl"),
    force: Annotated[bool, typer.Option(help="Rewrite an existing config (keeps keys).")]
    = False,
) -> None:
    """Write a tenantctl.toml (only --local for now), start it and upgrade the catalog."""
    from orchestrator.config import find_config_path
    from orchestrator.devfleet import localfleet
    from orchestrator.domain.errors import InvalidInput

    if not local:
        raise InvalidInput("only `tenantctl init --local` exists; for production write "
                           "tenantctl.toml yourself (see README) or use ansible/")
    path = find_config_path(State.config_path)
    res = localfleet.init_local(path, state_dir, force=force)
    say(f"{'wrote' if res.created else 'kept existing'} {res.config_path}")
    cfg = _config_at(path)
    for line in localfleet.up(cfg):
        say(line)
    _catalog_upgrade(cfg)


def _config_at(path: Path) -> Config:
    from orchestrator.config import load_config

    return load_config(path)


def _catalog_upgrade(cfg: Config) -> dict[str, Any]:
    from orchestrator.adapters.catalog.db import Catalog
    from orchestrator.adapters.postgres import fleet_identity

    catalog = Catalog(cfg)
    try:
        before, after = catalog.upgrade()
        changes = catalog.sync_topology()
        changes += fleet_identity.ensure(cfg, catalog)
    finally:
        catalog.dispose()
    return {"from": before, "to": after, "topology": changes}


@local_app.command("up")
def local_up() -> None:
    """Start the local clusters (initialising them on first use)."""
    from orchestrator.devfleet import localfleet

    for line in localfleet.up(current_config()):
        say(line)


@local_app.command("down")
def local_down() -> None:
    """Stop the local clusters."""
    from orchestrator.devfleet import localfleet

    for line in localfleet.down(current_config()):
        say(line)


@local_app.command("status")
def local_status(as_json: JsonOpt = False) -> None:
    """Show whether each local cluster runs."""
    from orchestrator.devfleet import localfleet

    rows = localfleet.status(current_config())
    if as_json:
        print_json([{"server": r.server, "region": r.region, "port": r.port,
                      "data_dir": str(r.data_dir), "running": r.running, "pid": r.pid,
                      "status": r.detail} for r in rows])
        return
    table(None, ["server", "region", "port", "status", "pid", "data dir"],
           [[r.server, r.region, r.port, r.detail, r.pid, r.data_dir] for r in rows])
    if not all(r.running for r in rows):
        raise typer.Exit(ExitCode.NOT_FOUND)


@catalog_app.command("upgrade")
def catalog_upgrade(as_json: JsonOpt = False) -> None:
    """Bring the catalog schema to head and sync regions/servers from the config."""
    result = _catalog_upgrade(current_config())
    if as_json:
        print_json(result)
        return
    if result["from"] == result["to"]:
        say(f"catalog already at {result['to']}")
    else:
        say(f"catalog upgraded: {result['from'] or 'empty'} -> {result['to']}")
    for line in result["topology"]:
        say(line)


@config_app.command("check")
def config_check(as_json: JsonOpt = False) -> None:
    """Validate the config file, that the master key is readable and (when the
    catalog can be reached) that it is the fleet's (exit 7 if not), and that no
    configured server is another fleet's (exit 6)."""
    from orchestrator.adapters.catalog.db import Catalog
    from orchestrator.adapters.crypto import tenant_keys as keys
    from orchestrator.adapters.crypto.masterkey import load_master_key
    from orchestrator.adapters.postgres import fleet_identity
    from orchestrator.domain.errors import ServerUnavailable

    cfg = current_config()
    key = load_master_key(cfg.master_key)
    catalog = Catalog(cfg)
    try:
        view = keys.catalog_view(catalog)
        foreign = [] if isinstance(view, str) else \
            fleet_identity.problems(cfg, catalog.fleet_id())
    finally:
        catalog.dispose()
    if foreign:
        raise ServerUnavailable(foreign[0])
    mixed = None
    if isinstance(view, str):
        catalog_note = f"catalog not read ({view}): master key not compared with it"
    else:
        recorded, wrapped = view
        fleets = keys.fleet_key_elsewhere(key.key_id, recorded, wrapped)
        if fleets is not None:
            raise keys.not_the_fleets_key(key.key_id, fleets)
        mixed = keys.mixed_key_ids(wrapped)
        catalog_note = "the fleet's master key" if recorded or wrapped else \
            "the catalog has no secret yet"
    summary = {"path": str(cfg.path), "regions": {
        r.name: {"backup_store": r.backup_store, "servers": [s.name for s in r.servers]}
        for r in cfg.regions.values()}, "master_key_id": key.key_id,
        "master_key": catalog_note, "mixed_master_keys": mixed,
        "tenant_migrations": str(cfg.tenant_migrations)}
    if as_json:
        print_json(summary)
    else:
        say(f"{cfg.path}: ok ({len(cfg.regions)} regions, {len(cfg.servers)} servers, "
             f"master key {key.key_id}: {catalog_note})")
    if mixed is not None:
        sys.stderr.write(f"warning: {mixed} (see `tenantctl doctor`)\n")


# -- regions / templates ---------------------------------------------------------------


@region_app.command("list")
def region_list(as_json: JsonOpt = False) -> None:
    """Regions, their servers, tenants per server and capacity."""
    reads = open_reads()
    try:
        servers = reads.servers()
    finally:
        reads.close()
    if as_json:
        out: dict[str, Any] = {}
        for s in servers:
            region = out.setdefault(s.region, {
                "region": s.region,
                "backup_store": reads.cfg.regions[s.region].backup_store
                if s.region in reads.cfg.regions else None, "servers": []})
            region["servers"].append(s.to_json())
        print_json(list(out.values()))
        return
    table(None, ["region", "server", "tenants", "capacity", "accepting", "template"],
           [[s.region, s.name, s.tenants, s.capacity, "yes" if s.available else "no",
             s.template_revision or "-"] for s in servers])


@template_app.command("build")
def template_build(server: Annotated[str | None, typer.Option(
        help="One server (default: every server).")] = None) -> None:
    """Create or upgrade each server's template database to the fleet's target
    revision (head until a rollout sets it), then fill its pool of spare clones
    (tenants.spare_databases)."""
    from orchestrator.services import spares, templates

    fleet = open_fleet()
    try:
        names = [server] if server else [s.name for s in fleet.cfg.servers]
        for name in names:
            target = fleet.target_revision(fleet.cfg.server(name).region)
            say(f"{name}: template at {templates.build(fleet, name, target)}")
            if fleet.cfg.spare_databases:
                say(f"{name}: {spares.fill(fleet, name)} spare database(s) made")
    finally:
        fleet.close()


# -- tenants -----------------------------------------------------------------------------


@tenant_app.command("create")
def tenant_create(
    slug: str,
    region: Annotated[str, typer.Option(help="Where the tenant's data lives.")],
    as_json: JsonOpt = False,
) -> None:
    """Provision a tenant: dedicated database and roles in REGION. Re-run to finish an
    interrupted create. Prints the tenant's connection string once."""
    fleet = open_fleet()
    try:
        # the output first, then the spare pool's refill: a refill (or a crash in it)
        # never stands between the sign-up and its connection string
        with fleet.refills_held():
            res = fleet.provision(slug, region, shown=False)
            _show_created(res, as_json)
            sys.stdout.flush()
            fleet.credentials_shown(slug)  # until here, a re-run shows it again
    finally:
        fleet.close()


def _show_created(res: ProvisionResult, as_json: bool) -> None:
    if as_json:
        print_json({**res.tenant, "dsn": res.dsn, "resumed": res.resumed,
                     "via_template": res.via_template})
        return
    t = res.tenant
    verb = "finished provisioning" if res.resumed else "created"
    say(f"{verb} tenant {t['slug']} in {t['region']} on {t['server']} "
         f"(revision {t['revision']})")
    say("connection string (shown once; `tenantctl tenant credentials` shows it again):")
    sys.stdout.write(res.dsn + "\n")


@tenant_app.command("list")
def tenant_list(
    region: Annotated[str | None, typer.Option(help="Only this region.")] = None,
    state: Annotated[str | None, typer.Option(help="Only this state.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List tenants."""
    from orchestrator.domain.views import tenant_json

    reads = open_reads()
    try:
        rows = [tenant_json(t) for t in reads.tenants(region, state)]
    finally:
        reads.close()
    if as_json:
        print_json(rows)
        return
    table(None, ["slug", "region", "server", "state", "revision", "created"],
           [[r["slug"], r["region"], r["server"], r["state"], r["revision"],
             (r["created_at"] or "")[:19]] for r in rows])


@tenant_app.command("show")
def tenant_show(slug: str, as_json: JsonOpt = False) -> None:
    """Everything the catalog knows about one tenant."""
    from orchestrator.domain.views import tenant_json

    reads = open_reads()
    try:
        data = tenant_json(reads.get_tenant(slug))
    finally:
        reads.close()
    if as_json:
        print_json(data)
        return
    table(f"tenant {slug}", ["field", "value"], [[k, v] for k, v in data.items()])


@tenant_app.command("credentials")
def tenant_credentials(
    slug: Annotated[str | None, typer.Argument(show_default=False)] = None,
    rotate: Annotated[bool, typer.Option(help="Set a new password first.")] = False,
    all_: Annotated[bool, typer.Option("--all", help="With --rotate: every tenant "
                                       "(breach response).")] = False,
    region: Annotated[str | None, typer.Option(help="With --all: only this region.")]
    = None,
    concurrency: Annotated[int, typer.Option(min=1, help="With --all.")] = 4,
    kill_sessions: Annotated[bool, typer.Option(help="End sessions opened with the old "
                                                "password.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show the tenant's connection string (audited), or rotate its password; with
    --rotate --all, every tenant's (the report never contains the passwords)."""
    from orchestrator.domain.errors import InvalidInput

    if all_:
        if slug or not rotate:
            raise InvalidInput("--all goes with --rotate and no slug")
        _rotate_all(region, concurrency, kill_sessions, as_json)
        return
    if not slug:
        raise InvalidInput("give a tenant, or --rotate --all")
    fleet = open_fleet()
    try:
        dsn = fleet.credentials(slug, rotate=rotate)
        if kill_sessions and rotate:
            from orchestrator.adapters.postgres import admin as pgserver

            t = fleet.get_tenant(slug)
            with fleet.server_connection(t.server) as conn:
                pgserver.terminate_sessions(conn, role=t.login_role)
    finally:
        fleet.close()
    if as_json:
        print_json({"slug": slug, "dsn": dsn, "rotated": rotate})
    else:
        sys.stdout.write(dsn + "\n")


def _rotate_all(region: str | None, concurrency: int, kill_sessions: bool,
                as_json: bool) -> None:
    import time

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    from orchestrator.domain.states import HAS_DATABASE
    from orchestrator.services import breach

    fleet = open_fleet()
    t0 = time.perf_counter()
    try:
        console = Console(stderr=True)
        if console.is_terminal and not as_json:
            with Progress(TextColumn("rotating"), BarColumn(), TextColumn(
                    "{task.completed}/{task.total}"), console=console) as progress:
                total = sum(t.state in HAS_DATABASE for t in fleet.tenants(region))
                task = progress.add_task("rotate", total=total)
                results = breach.rotate_all(fleet, region=region, concurrency=concurrency,
                                            kill_sessions=kill_sessions,
                                            on_done=lambda r: progress.advance(task))
        else:
            results = breach.rotate_all(fleet, region=region, concurrency=concurrency,
                                        kill_sessions=kill_sessions)
    finally:
        fleet.close()
    failed = [r for r in results if not r.ok]
    elapsed = round(time.perf_counter() - t0, 2)
    if as_json:
        print_json({"rotated": len(results) - len(failed), "failed": len(failed),
                    "seconds": elapsed, "tenants": [r.to_json() for r in results]})
    else:
        for r in failed:
            say(f"failed  {r.tenant}: {r.error}")
        say(f"rotated {len(results) - len(failed)} tenant passwords in {elapsed}s"
            + (f", {len(failed)} failed (re-run to retry them)" if failed else ""))
    if failed:
        raise typer.Exit(ExitCode.FAILED)


@tenant_app.command("psql")
def tenant_psql(
    slug: str,
    owner: Annotated[bool, typer.Option(help="Connect as the owner role (DDL rights).")]
    = False,
    command: Annotated[str | None, typer.Option("-c", "--command",
                                                help="Run one command and exit.")] = None,
) -> None:
    """Open psql on the tenant's database as its login role (audited)."""
    from orchestrator.services import psql

    fleet = open_fleet()
    try:
        code = psql.run(fleet, slug, owner=owner, command=command)
    finally:
        fleet.close()
    raise typer.Exit(code)  # psql's own exit status, passed through


# -- quickstart --------------------------------------------------------------------------


@app.command()
def quickstart(state_dir: Annotated[Path, typer.Option(help="State directory.")]
               = Path(".tenantctl")) -> None:
    """Set up the embedded two-region fleet, a demo tenant per region, and show it."""
    from orchestrator.config import find_config_path
    from orchestrator.devfleet import quickstart as qs

    path = find_config_path(State.config_path)
    for line in qs.run(path, state_dir):
        say(line)
    State.config_path = str(path)
    region_list()
    tenant_list()
    say(f"\nnext: `tenantctl --config {path} tenant create acme --region eu-central`")


# -- entry point -------------------------------------------------------------------------


def _fail(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    sys.stdout.flush()
    raise SystemExit(code)


@app.command()
def report(
    html: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained "
                                              "HTML page here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the fleet against the promises of the privacy policy: isolation, region,
    backups, timeliness, audit. Exit 12 when any promise is broken."""
    from orchestrator.services import report as rep

    fleet = open_fleet()
    try:
        data = rep.build(fleet)
    finally:
        fleet.close()
    if html is not None:
        html.write_text(rep.render_html(data), encoding="utf-8")
    if as_json:
        print_json(data)
    else:
        for p in data["promises"]:
            say(f"{'PASS' if p['ok'] else 'FAIL'}  {p['title']}")
            for line in p["evidence"]:
                say(f"      {line}")
            for line in p["offenders"][:20]:
                say(f"    ! {line}")
    if not data["ok"]:
        raise typer.Exit(ExitCode.PROMISE_BROKEN)


def cli_name(field: str) -> str:
    """How the CLI names an input an error is about: a parameter (``lock_timeout``)
    is its option (``--lock-timeout``); a config key (``tenants.x``) stays itself."""
    return "--" + field.replace("_", "-") if field.isidentifier() else field


def _explained(exc: BaseException) -> str:
    """A refused password at an address where this fleet's embedded cluster is not
    running: said as what it is, another server at that address."""
    from orchestrator.adapters.postgres.libpq import AUTH_FAILED
    from orchestrator.domain.errors import ServerUnavailable, TenantctlError

    if isinstance(exc, TenantctlError) and exc.field is not None:
        return exc.shown(cli_name(exc.field))
    m = AUTH_FAILED.search(str(exc))
    if not isinstance(exc, ServerUnavailable) or m is None:
        return str(exc)
    from orchestrator.devfleet import localfleet

    try:
        why = localfleet.not_ours_at(current_config(), int(m.group(2)))
    except TenantctlError:
        why = None
    if why is None:
        return str(exc)
    return (f"the server at {m.group(1)}:{m.group(2)} is not this fleet's server ({why}; "
            "another PostgreSQL answers there): `tenantctl local up` starts this fleet's "
            "clusters, `tenantctl local status` shows them")


def main() -> None:
    import logging

    from orchestrator.domain.errors import TenantctlError, first_line

    # When the catalog goes away mid-command, SQLAlchemy's pool logs a traceback for
    # every connection it fails to reset; the command itself ends with one `error:`
    # line (below). A configured handler (the scheduler's JSON log) still gets them.
    logging.getLogger("sqlalchemy.pool").addHandler(logging.NullHandler())

    try:  # typer ≥ 0.22 carries its own copy of click
        from typer._click import exceptions as click_errors
    except ImportError:  # pragma: no cover - older typer
        from click import exceptions as click_errors  # type: ignore[no-redef]

    try:
        # Not standalone: click's usage errors (a value it cannot parse) become one
        # `error:` line with exit 2, like every other bad input.
        code = app(prog_name="tenantctl", standalone_mode=False)
        if isinstance(code, int) and code:
            raise SystemExit(code)  # a typer.Exit: an ExitCode, or psql's own status
    except click_errors.NoArgsIsHelpError as exc:
        sys.stdout.write((exc.ctx.get_help() if exc.ctx else "") + "\n")
        raise SystemExit(ExitCode.INVALID) from None
    except click_errors.UsageError as exc:
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        _fail(exc.format_message().replace("\n", " ") + where, ExitCode.INVALID)
    except typer.Abort:
        _fail("aborted", ExitCode.FAILED)
    except TenantctlError as exc:
        _fail(_explained(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", ExitCode.INTERRUPTED)
    except Exception as exc:
        # A server or the catalog went away mid-command: say so on one line.
        import psycopg

        # SQLAlchemy's error only if SQLAlchemy ran: a read command never imports it
        orm = sys.modules.get("sqlalchemy.exc")
        if isinstance(exc, psycopg.OperationalError) or (
                orm is not None and isinstance(exc, orm.OperationalError)):
            _fail(f"database unavailable: {first_line(exc)}", ExitCode.UNAVAILABLE)
        raise


if __name__ == "__main__":
    main()
