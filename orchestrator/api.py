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


def _refill(deps: Deps, server: str) -> None:
    from orchestrator.services import spares  # start-up: as Fleet.provision

    spares.fill(deps, server)
