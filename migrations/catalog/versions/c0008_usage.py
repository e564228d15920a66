"""Usage metering: one row per tenant and period (orchestrator/domain/usage.py).

Revision ID: c0008_usage
Revises: c0007_plans
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c0008_usage"
down_revision: str | None = "c0007_plans"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    big = [sa.Column(name, sa.BigInteger(), nullable=False) for name in (
        "transactions", "rows_written", "rows_read", "datid", )]
    raw = [sa.Column(name, sa.BigInteger(), nullable=False) for name in (
        "xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted",
        "tup_returned", "tup_fetched")]
    op.create_table(
        "usage_samples",
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("period_start", TS, nullable=False),
        sa.Column("slug", sa.String(40), nullable=False),
        sa.Column("server", sa.String(63), nullable=False),
        sa.Column("collected_at", TS, nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("storage_bytes", sa.BigInteger(), nullable=True),
        sa.Column("storage_bytes_peak", sa.BigInteger(), nullable=True),
        sa.Column("connections", sa.Integer(), nullable=False),
        sa.Column("connections_peak", sa.Integer(), nullable=False),
        *big,
        sa.Column("stats_reset", TS, nullable=True),
        *raw,
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE",
                                name="fk_usage_samples_tenant_id_tenants"),
        sa.PrimaryKeyConstraint("tenant_id", "period_start", name="pk_usage_samples"),
    )
    op.create_index("ix_usage_samples_period_start", "usage_samples", ["period_start"])


def downgrade() -> None:
    op.drop_index("ix_usage_samples_period_start", table_name="usage_samples")
    op.drop_table("usage_samples")
