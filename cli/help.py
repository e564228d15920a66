"""Help text helpers: the `Examples:` epilog every command carries, and a typer fix
so that flags show no value type in `--help`."""

from __future__ import annotations

from typing import Any


def examples(*commands: str) -> str:
    """An epilog listing example invocations, kept as written (``\\b`` stops click
    from re-wrapping the paragraph)."""
    return "\b\nExamples:\n" + "\n".join(f"  {c}" for c in commands)


def flags_without_type() -> None:
    """typer 0.29's rich help prints every option's value type, flags included
    (`--yes <bool>`), though a flag takes no value. A flag's type column is left
    empty; other options keep theirs. tests/test_help.py checks the result."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - typer without it: nothing to fix
        return
    original = TyperOption.display_type_rich
    if getattr(original, "flags_fixed", False):
        return

    def display_type_rich(self: TyperOption, ctx: object) -> str | None:
        if self.is_flag and self.metavar is None:
            return None
        return original(self, ctx)  # type: ignore[arg-type]

    display_type_rich.flags_fixed = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


def print_version(value: bool) -> None:
    """`tenantctl --version`: the installed package's version (its metadata)."""
    if not value:
        return
    import typer

    from orchestrator.adapters.package import installed_version

    typer.echo(f"tenantctl {installed_version()}")
    raise typer.Exit()


# Every command's examples, by command path. A command may carry its own epilog
# instead (epilog= on its decorator); tests/test_help.py requires one or the other.
EXAMPLES: dict[str, tuple[str, ...]] = {
    "doctor": ("tenantctl doctor", "tenantctl doctor --region eu-central --json",
               "tenantctl doctor --fix"),
    "init": ("tenantctl init --local",
             "tenantctl init --local --base-port 26000 --no-start",
             "tenantctl init --local --servers-per-region 2  # to try drains and moves"),
    "quickstart": ("tenantctl quickstart", "tenantctl quickstart --state-dir /tmp/fleet",
                   "tenantctl quickstart --servers-per-region 2"),
    "report": ("tenantctl report", "tenantctl report --html promises.html"),
    "local up": ("tenantctl local up",),
    "local down": ("tenantctl local down",),
    "local status": ("tenantctl local status", "tenantctl local status --json"),
    "catalog upgrade": ("tenantctl catalog upgrade",),
    "config check": ("tenantctl config check",
                     "TENANTCTL_CATALOG_DSN=postgresql://admin@db1/tenantctl_catalog "
                     "tenantctl config check --json"),
    "region list": ("tenantctl region list", "tenantctl region list --json"),
    "region rebalance": ("tenantctl region rebalance eu-central --dry-run",
                         "tenantctl region rebalance eu-central --concurrency 2 --yes --json"),
    "server drain": ("tenantctl server drain eu-central-1 --dry-run",
                     "tenantctl server drain eu-central-1 --concurrency 4",
                     "tenantctl server drain eu-central-1 --yes --json  # from a script"),
    "server retire": ("tenantctl server retire eu-central-1  # once drained",),
    "server accept": ("tenantctl server accept eu-central-1  # undo a drain",),
    "tenant cancel": ("tenantctl tenant cancel acme", "tenantctl tenant cancel acme --yes"),
    "tenant reactivate": ("tenantctl tenant reactivate acme",),
    "tenant suspend": ("tenantctl tenant suspend acme",),
    "tenant resume": ("tenantctl tenant resume acme",),
    "tenant legal-hold": ("tenantctl tenant legal-hold acme --on --reason 'case 42'",
                          "tenantctl tenant legal-hold acme --off --reason 'case closed'"),
    "tenant move": ("tenantctl tenant move acme --server eu-central-2 --dry-run",
                    "tenantctl tenant move acme --region ap-south --reason 'customer asked' "
                    "--yes --json",
                    "tenantctl tenant move acme --abort"),
    "tenant erase": ("tenantctl tenant erase acme --reason 'GDPR request 1234'",),
    "tenant export": ("tenantctl tenant export acme --format sql --output acme.sql",
                      "tenantctl tenant export acme --format csv --output acme.zip"),
    "tenant create": ("tenantctl tenant create acme --region eu-central",
                      "tenantctl tenant create acme --region eu-central --plan pro"),
    "tenant set-plan": ("tenantctl tenant set-plan acme pro",
                        "tenantctl tenant set-plan acme basic --json"),
    "tenant list": ("tenantctl tenant list", "tenantctl tenant list --region eu-central "
                    "--state active --json"),
    "tenant show": ("tenantctl tenant show acme", "tenantctl tenant show acme --json"),
    "tenant credentials": ("tenantctl tenant credentials acme",
                           "tenantctl tenant credentials acme --rotate",
                           "tenantctl tenant credentials acme --direct  # not through the pooler",
                           "tenantctl tenant credentials --rotate --all --kill-sessions"),
    "tenant psql": ("tenantctl tenant psql acme", "tenantctl tenant psql acme -c 'select 1'"),
    "template build": ("tenantctl template build",
                       "tenantctl template build --server eu-central-1"),
    "migrate status": ("tenantctl migrate status", "tenantctl migrate status --live --json",
                       "tenantctl migrate status --check  # exit 15 if any tenant is off target"),
    "migrate rollout": ("tenantctl migrate rollout --dry-run",
                        "tenantctl migrate rollout --canary 2 --waves 1,10%,100%",
                        "tenantctl migrate rollout --to 0005_reorder_level --region ap-south"),
    "migrate history": ("tenantctl migrate history", "tenantctl migrate history --json"),
    "migrate rollouts show": ("tenantctl migrate rollouts show 12",
                              "tenantctl migrate rollouts show 12 --json"),
    "migrate tenant": ("tenantctl migrate tenant acme",
                       "tenantctl migrate tenant acme --to 0004_order_status_idx --dry-run"),
    "backup run": ("tenantctl backup run acme", "tenantctl backup run --due  # from cron",
                   "tenantctl backup run --all --concurrency 8"),
    "backup list": ("tenantctl backup list", "tenantctl backup list acme --json"),
    "backup download": ("tenantctl backup download 42 --output acme.dump.age",
                        "tenantctl backup download 42 --output - | age -d -i key.txt "
                        "| pg_restore --list"),
    "backup verify": ("tenantctl backup verify 42", "tenantctl backup verify --latest acme "
                      "--restore-test", "tenantctl backup verify --all"),
    "backup prune": ("tenantctl backup prune --dry-run", "tenantctl backup prune"),
    "backup restore": ("tenantctl backup restore 42 --as acme-copy",
                       "tenantctl backup restore 42 --in-place --yes"),
    "backup key export": ("tenantctl backup key export acme --output acme.agekey",),
    "keys generate": ("tenantctl keys generate /etc/tenantctl/master.key",),
    "keys rotate-master": ("tenantctl keys rotate-master --new-key-file new-master.key",),
    "retention run": ("tenantctl retention run --dry-run",
                      "tenantctl retention run --only delete --only purge"),
    "retention status": ("tenantctl retention status",
                         "tenantctl retention status --now 2027-01-31T00:00:00Z --json"),
    "audit list": ("tenantctl audit list --since yesterday",
                   "tenantctl audit list --tenant acme --since 7d --action tenant.",
                   "tenantctl audit list --since 2026-12-01 --json"),
    "scheduler run": ("tenantctl scheduler run --metrics-port 9187",
                      "tenantctl scheduler run --jobs backups,retention"),
    "access grant": ("tenantctl access grant acme --to alice@example.com --ttl 2h "
                     "--reason 'TICKET-123'",),
    "access list": ("tenantctl access list", "tenantctl access list --all --json"),
    "access revoke": ("tenantctl access revoke 7", "tenantctl access revoke --all"),
    "usage show": ("tenantctl usage show  # also: tenantctl usage",
                   "tenantctl usage acme --since 30d",
                   "tenantctl usage --since yesterday -o json"),
    "usage collect": ("tenantctl usage collect  # from cron, e.g. hourly",
                      "tenantctl usage collect --json"),
    "usage export": ("tenantctl usage export --since 2026-11-01 --until 2026-12-01 "
                     "--output november.csv",
                     "tenantctl usage export --since 7d --tenant acme --output -"),
    "pooler sync": ("tenantctl pooler sync", "tenantctl pooler sync eu-central-1 --json"),
    "pooler status": ("tenantctl pooler status", "tenantctl pooler status --json"),
    "breach drill": ("tenantctl breach drill --new-key-file new-master.key",),
}


def add_examples(app: object) -> None:
    """Give each registered command of ``app`` (typer.Typer) its `Examples:` epilog
    from EXAMPLES, unless it has an epilog already."""
    def walk(typer_app: Any, prefix: str) -> None:
        for info in typer_app.registered_commands:
            name = info.name or info.callback.__name__.lower().replace("_", "-")
            path = f"{prefix}{name}"
            if info.epilog is None and path in EXAMPLES:
                info.epilog = examples(*EXAMPLES[path])
        for group in typer_app.registered_groups:
            walk(group.typer_instance, f"{prefix}{group.name} ")

    walk(app, "")
