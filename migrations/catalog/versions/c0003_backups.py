"""Backups: per-tenant age keys (identity wrapped by the master key) and backup records.

Revision ID: c0003_backups
Revises: c0002_rollouts
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c0003_backups"
down_revision: str | None = "c0002_rollouts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("tenants", sa.Column("restored_from", sa.BigInteger(), nullable=True))
    op.create_table(
        "tenant_keys",
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("recipient", sa.Text(), nullable=False),
        sa.Column("identity_wrapped", sa.Text(), nullable=True),
        sa.Column("master_key_id", sa.String(32), nullable=True),
        sa.Column("created_at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("destroyed_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_tenant_keys"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE",
                                name="fk_tenant_keys_tenant_id_tenants"),
    )
    op.create_table(
        "backups",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("slug", sa.String(40), nullable=False),
        sa.Column("region", sa.String(40), nullable=False),
        sa.Column("store_url", sa.Text(), nullable=False),
        sa.Column("object_key", sa.Text(), nullable=False),
        sa.Column("manifest_key", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(20), server_default="manual", nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("key_id", sa.String(16), nullable=True),
        sa.Column("server_version", sa.String(40), nullable=True),
        sa.Column("pg_dump_version", sa.String(80), nullable=True),
        sa.Column("revision", sa.String(64), nullable=True),
        sa.Column("started_at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("verified_at", TS, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_backups"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"],
                                name="fk_backups_tenant_id_tenants"),
        sa.CheckConstraint("status IN ('running','completed','failed','deleted')",
                           name="ck_backups_status_known"),
    )
    op.create_index("ix_backups_tenant_id", "backups", ["tenant_id"])
    op.create_index("ix_backups_status", "backups", ["status"])


def downgrade() -> None:
    op.drop_table("backups")
    op.drop_table("tenant_keys")
    op.drop_column("tenants", "restored_from")
