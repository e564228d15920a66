"""The scheduler's persisted cadence: each job's last counted run, so a restart or
a leader failover keeps the intervals instead of running every job at once.

Revision ID: c0006_scheduler_jobs
Revises: c0005_support_grants
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c0006_scheduler_jobs"
down_revision: str | None = "c0005_support_grants"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "scheduler_jobs",
        sa.Column("job", sa.String(40), nullable=False),
        sa.Column("last_started_at", TS, nullable=False),
        sa.Column("last_finished_at", TS, nullable=False),
        sa.Column("last_outcome", sa.String(20), nullable=False),
        sa.Column("instance", sa.String(300), nullable=False),
        sa.PrimaryKeyConstraint("job", name="pk_scheduler_jobs"),
    )


def downgrade() -> None:
    op.drop_table("scheduler_jobs")
