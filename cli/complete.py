"""Shell completion of values (`tenantctl --install-completion`): tenant slugs from the
catalog, regions and servers from the config, revisions from the tenant migrations.

A completion callback never raises and never makes the shell wait: anything that
goes wrong (no config, catalog down, a slow network) completes nothing, and the
catalog is given CATALOG_BUDGET_S at most. Imports stay inside the callbacks: this
module is imported by every command.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from orchestrator.config import Config

CATALOG_BUDGET_S = 1.5
_REVISION = re.compile(r"""^revision\s*(?::\s*str\s*)?=\s*["']([^"']+)["']""", re.M)


def _config(ctx: Any) -> Config | None:
    """The config the command line names (--config on the root), else the lookup's."""
    from orchestrator.config import load_config

    root = ctx.find_root() if ctx is not None else None
    explicit = root.params.get("config") if root is not None else None
    return load_config(explicit)


def _quiet(source: Callable[[Any], list[str]]) -> Callable[[Any, str], list[str]]:
    def complete(ctx: typer.Context, incomplete: str) -> list[str]:
        try:
            return [v for v in source(ctx) if v.startswith(incomplete)]
        except Exception:  # completion must never break the shell
            return []
    complete.__name__ = source.__name__
    _unannotated(complete)
    return complete


def _unannotated(fn: Callable[..., list[str]]) -> None:
    """typer reads a completion callback's signature when it builds the command tree,
    for every command: string annotations would be evaluated each time (~0.2 ms
    each). Without them it matches the parameters by name (ctx, incomplete)."""
    fn.__annotations__ = {}


def regions(ctx: Any) -> list[str]:
    cfg = _config(ctx)
    return sorted(cfg.regions) if cfg else []


def plans(ctx: Any) -> list[str]:
    cfg = _config(ctx)
    return sorted(cfg.plans) if cfg else []


def servers(ctx: Any) -> list[str]:
    cfg = _config(ctx)
    return sorted(s.name for s in cfg.servers) if cfg else []


def revisions(ctx: Any) -> list[str]:
    """The revision ids of the tenant migrations' files (read as text, no Alembic)."""
    cfg = _config(ctx)
    if cfg is None:
        return []
    found = {"head"}
    for path in (cfg.tenant_migrations / "versions").glob("*.py"):
        m = _REVISION.search(path.read_text(encoding="utf-8", errors="replace"))
        if m:
            found.add(m.group(1))
    return sorted(found)


def slugs(ctx: Any) -> list[str]:
    """The catalog's tenant slugs, if it answers within CATALOG_BUDGET_S."""
    from orchestrator.adapters.catalog.reads import CatalogReads

    cfg = _config(ctx)
    if cfg is None:
        return []
    found: list[str] = []

    def read() -> None:
        try:
            with CatalogReads(cfg) as reads:
                found.extend(t.slug for t in reads.tenants())
        except Exception:  # noqa: S110 - nothing to complete; never a traceback
            pass

    # a daemon thread: a catalog that does not answer is left behind when the
    # completion process exits
    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(CATALOG_BUDGET_S)
    return [] if worker.is_alive() else list(found)


def complete_jobs(incomplete: str) -> list[str]:
    """`scheduler run --jobs backups,re` → backups,retention: the comma list's last
    name, among the jobs not named yet."""
    from orchestrator.domain.jobs import SCHEDULED

    done, comma, last = incomplete.rpartition(",")
    named = set(done.split(","))
    return [f"{done}{comma}{job.value}" for job in SCHEDULED
            if job.value.startswith(last) and job.value not in named]


def complete_states(incomplete: str) -> list[str]:
    from orchestrator.domain.states import TenantState

    return [s for s in TenantState.__members__ if s.startswith(incomplete)]


_unannotated(complete_jobs)
_unannotated(complete_states)
complete_regions = _quiet(regions)
complete_servers = _quiet(servers)
complete_revisions = _quiet(revisions)
complete_slugs = _quiet(slugs)
complete_plans = _quiet(plans)

# parameter types that complete themselves, for the command modules
SlugArg = Annotated[str, typer.Argument(autocompletion=complete_slugs, show_default=False)]
OptionalSlugArg = Annotated[str | None, typer.Argument(autocompletion=complete_slugs,
                                                       show_default=False)]
