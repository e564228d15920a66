"""The Python API a SaaS application (and the CLI) calls: ``Fleet``.

    fleet = Fleet.from_config()           # tenantctl.toml, $TENANTCTL_CONFIG, --config
    result = fleet.provision("acme", "eu-central")
    result.dsn                            # the tenant's connection string, shown once

``Fleet`` is the top of the house: the dependencies every service takes
(``orchestrator.bootstrap.Deps``) plus the use cases a caller asks for by name.
Nothing below this module imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator import ports
from orchestrator.bootstrap import TARGET_KEY, Deps, ServerInfo
from orchestrator.config import Config
from orchestrator.domain.names import check_integrity
from orchestrator.domain.views import tenant_json

if TYPE_CHECKING:
    from collections.abc import Callable

    from orchestrator.services.move import MoveResult
    from orchestrator.services.plans import PlanChange
    from orchestrator.services.provisioning import ProvisionResult

__all__ = ["TARGET_KEY", "Fleet", "ServerInfo", "check_integrity", "tenant_json"]


class Fleet(Deps):
    def __init__(self, cfg: Config, *, actor: str | None = None) -> None:
        super().__init__(cfg, actor=actor)
        self.refiller = _refill

    def provision(self, slug: str, region: str, *, restore_from: int | None = None,
                  shown: bool = True, plan: str | None = None) -> ProvisionResult:
        """Create (or finish creating) a tenant; the result carries its connection
        string. With ``shown=False`` the caller calls ``credentials_shown`` once the
        string has reached its reader; until then a re-run returns it again."""
        # start-up: provisioning brings Alembic (~0.5 s); read commands never need it
        from orchestrator.services import provisioning

        return provisioning.provision_tenant(self, slug, region, restore_from=restore_from,
                                             shown=shown, plan=plan)

    def set_plan(self, slug: str, plan: str) -> PlanChange:
        """Move a tenant to ``plan`` ([plans.NAME]) at once: its login role's limits,
        and its storage quota judged again by its last measured size (writes given
        back under a larger quota or none, revoked past a smaller one)."""
        from orchestrator.services import plans  # start-up: as provision()

        return plans.set_plan(self, slug, plan)

    def pipeline_jobs(self) -> ports.BackupJobs:
        from backups.service import PipelineJobs  # start-up: only commands that back up

        return PipelineJobs(self)

    def credentials(self, slug: str, *, rotate: bool = False,
                    kill_sessions: bool = False, direct: bool = False) -> str:
        """The tenant's connection string; with ``rotate``, after changing the password.
        The new password is stored (wrapped) before the role gets it, so a crash in
        between leaves a pending password that the next call applies."""
        from orchestrator.services import credentials  # start-up: as provision()

        return credentials.credentials(self, slug, rotate=rotate,
                                       kill_sessions=kill_sessions, direct=direct)

    def move(self, slug: str, *, server: str | None = None, region: str | None = None,
             reason: str | None = None, method: str | None = None, dry_run: bool = False,
             progress: Callable[[str], None] | None = None) -> MoveResult:
        """Move (or finish moving) a tenant to ``server``, or to the least-filled server
        of ``region`` ("change my data region": ``reason`` is required and audited).
        The application's connection string changes host and port only; the
        password stays. ``dry_run``: the plan, nothing changed."""
        from orchestrator.services import move  # start-up: as provision()

        return move.move_tenant(self, slug, server=server, region=region, reason=reason,
                                method=method, dry_run=dry_run, progress=progress)

    def abort_move(self, slug: str) -> MoveResult:
        """Undo an unfinished move that has not cut over."""
        from orchestrator.services import move  # start-up: as provision()

        return move.abort_move(self, slug)


def _refill(deps: Deps, server: str) -> None:
    from orchestrator.services import spares  # start-up: as Fleet.provision

    spares.fill(deps, server)
