"""Rollouts: fleet migrations with per-tenant results; the fleet's target revision.

Revision ID: c0002_rollouts
Revises: c0001_initial
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "c0002_rollouts"
down_revision: str | None = "c0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("tenants", sa.Column("migration_error", sa.Text(), nullable=True))
    op.add_column("tenants", sa.Column("migrated_at", TS, nullable=True))
    op.create_table(
        "fleet_settings",
        sa.Column("key", sa.String(60), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_at", TS, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_fleet_settings"),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("target", sa.String(64), nullable=True),
        sa.Column("options", JSONB(), server_default="{}", nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("created_at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_rollouts"),
        sa.CheckConstraint(
            "status IN ('running','completed','failed','stopped','interrupted')",
            name="ck_rollouts_status_known"),
    )
    op.create_index("ix_rollouts_key", "rollouts", ["key"])
    op.create_table(
        "rollout_tenants",
        sa.Column("rollout_id", sa.BigInteger(), nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("slug", sa.String(40), nullable=False),
        sa.Column("server", sa.String(63), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(20), server_default="pending", nullable=False),
        sa.Column("from_revision", sa.String(64), nullable=True),
        sa.Column("to_revision", sa.String(64), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("rollout_id", "tenant_id", name="pk_rollout_tenants"),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE",
                                name="fk_rollout_tenants_rollout_id_rollouts"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE",
                                name="fk_rollout_tenants_tenant_id_tenants"),
        sa.CheckConstraint("status IN ('pending','running','ok','skipped','failed')",
                           name="ck_rollout_tenants_status_known"),
    )
    op.create_index("ix_rollout_tenants_claim", "rollout_tenants",
                    ["rollout_id", "wave", "status", "seq"])


def downgrade() -> None:
    op.drop_table("rollout_tenants")
    op.drop_table("rollouts")
    op.drop_table("fleet_settings")
    op.drop_column("tenants", "migrated_at")
    op.drop_column("tenants", "migration_error")
