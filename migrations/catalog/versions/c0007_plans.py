"""Each tenant's plan ([plans.NAME] in tenantctl.toml): the limits its login role is
held to. Tenants made before plans had [tenants]' bounds, which is the implicit plan
"default": they keep it.

Revision ID: c0007_plans
Revises: c0006_scheduler_jobs
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c0007_plans"
down_revision: str | None = "c0006_scheduler_jobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("plan", sa.String(40), nullable=False,
                                       server_default="default"))


def downgrade() -> None:
    op.drop_column("tenants", "plan")
