"""The tenantctl CLI: the root app, its global options, the wiring of the command
groups (one module of cli/ each: parse, confirm, call, render) and `main()`, which
maps errors to the exit-code table.

Imports of the orchestrator happen inside commands so that `--help` stays fast
(but for the exit-code table, orchestrator.domain.errors: pure and small).
Expected failures (TenantctlError) become one line on stderr and a non-zero
exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

import typer

from cli import logs
from cli.access import access_app
from cli.audit import audit_app
from cli.backup import backup_app
from cli.breach import breach_app
from cli.catalog import catalog_app
from cli.common import State, current_config
from cli.config import config_app
from cli.doctor import doctor
from cli.help import add_examples, flags_without_type, print_version
from cli.keys import keys_app
from cli.local import init, local_app, quickstart
from cli.migrate import migrate_app
from cli.output import err, plain
from cli.pooler import pooler_app
from cli.region import region_app
from cli.report import report
from cli.retention import retention_app
from cli.scheduler import scheduler_app
from cli.server import server_app
from cli.template import template_app
from cli.tenant import tenant_app
from cli.usage import usage_app
from orchestrator.domain.errors import ExitCode


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
flags_without_type()
if "TYPER_USE_RICH" not in os.environ:
    # `--help` in click's plain layout: typer's rich layout imports rich, markdown-it
    # and pygments first (half of the ~0.25 s a `--help` took). TYPER_USE_RICH=1 (typer's
    # own switch) brings it back. Our tables and messages still use rich.
    typer.core.HAS_RICH = False


app = typer.Typer(no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
                  help="Database-per-tenant provisioning and operations for PostgreSQL.")
# `--help` lists the commands, then the groups, each in the order registered here
for command in (doctor, init, quickstart, report):
    app.command()(command)
for group, name in [(local_app, "local"), (catalog_app, "catalog"), (config_app, "config"),
                    (region_app, "region"), (server_app, "server"), (tenant_app, "tenant"),
                    (template_app, "template"), (migrate_app, "migrate"),
                    (backup_app, "backup"), (keys_app, "keys"),
                    (retention_app, "retention"), (audit_app, "audit"),
                    (scheduler_app, "scheduler"), (access_app, "access"),
                    (breach_app, "breach"), (usage_app, "usage"), (pooler_app, "pooler")]:
    app.add_typer(group, name=name)
add_examples(app)  # the `Examples:` epilog of every command (cli/help.py)


@app.callback()
def _root(config: Annotated[str | None, typer.Option(
        "--config", "-C", help="Config file (default: $TENANTCTL_CONFIG, else the first of "
        "./tenantctl.toml, $XDG_CONFIG_HOME/tenantctl/tenantctl.toml, "
        "/etc/tenantctl/tenantctl.toml).", show_default=False)] = None,
        version: Annotated[bool, typer.Option(
            "--version", help="Print tenantctl's version and exit.", is_eager=True,
            callback=print_version)] = False,
        actor: Annotated[str | None, typer.Option(
            "--actor", help="Who is acting, for the audit log (default: $TENANTCTL_ACTOR, "
            "else OS user@host).", show_default=False)] = None,
        log_level: Annotated[str | None, typer.Option(
            "--log-level", envvar=logs.LEVEL_ENV, show_default=False,
            help="Log lines on stderr at this level and above: debug, info, warning "
            "(default; the scheduler: info) or error.")] = None,
        log_format: Annotated[str | None, typer.Option(
            "--log-format", envvar=logs.FORMAT_ENV, show_default=False,
            help="text (default) or json (the scheduler's default: JSON lines on "
            "stdout).")] = None) -> None:
    State.config_path = config
    State.actor = actor
    logs.configure(log_level, log_format)


# -- entry point -------------------------------------------------------------------------


def _fail(message: str, code: ExitCode) -> NoReturn:
    if not logs.failed(message):  # with --log-format json: the `command` line says it
        err(f"error: {message}")
    sys.stdout.flush()
    raise SystemExit(code)


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


@logs.logged_command(lambda: app)
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
        plain(exc.ctx.get_help() if exc.ctx else "")
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
