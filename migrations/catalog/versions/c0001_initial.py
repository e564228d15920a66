"""Catalog: regions, servers, tenants, credentials, audit log.

Revision ID: c0001_initial
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "c0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "regions",
        sa.Column("name", sa.String(40), nullable=False),
        sa.Column("backup_store", sa.Text(), nullable=False),
        sa.Column("created_at", TS, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_regions"),
    )
    op.create_table(
        "servers",
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("region", sa.String(40), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("available", sa.Boolean(), server_default="true", nullable=False),
        sa.Column("template_revision", sa.String(64), nullable=True),
        sa.Column("template_updated_at", TS, nullable=True),
        sa.Column("created_at", TS, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_servers"),
        sa.ForeignKeyConstraint(["region"], ["regions.name"],
                                name="fk_servers_region_regions"),
        sa.CheckConstraint("capacity > 0", name="ck_servers_capacity_positive"),
    )
    op.create_index("ix_servers_region", "servers", ["region"])
    op.create_table(
        "tenants",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("slug", sa.String(40), nullable=False),
        sa.Column("region", sa.String(40), nullable=False),
        sa.Column("server", sa.String(63), nullable=False),
        sa.Column("database", sa.String(63), nullable=False),
        sa.Column("login_role", sa.String(63), nullable=False),
        sa.Column("owner_role", sa.String(63), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("step", sa.String(40), nullable=True),
        sa.Column("revision", sa.String(64), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("activated_at", TS, nullable=True),
        sa.Column("cancelled_at", TS, nullable=True),
        sa.Column("hold_until", TS, nullable=True),
        sa.Column("deleted_at", TS, nullable=True),
        sa.Column("purge_after", TS, nullable=True),
        sa.Column("purged_at", TS, nullable=True),
        sa.Column("legal_hold", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("legal_hold_reason", sa.Text(), nullable=True),
        sa.Column("updated_at", TS, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
        sa.UniqueConstraint("slug", name="uq_tenants_slug"),
        sa.ForeignKeyConstraint(["region"], ["regions.name"],
                                name="fk_tenants_region_regions"),
        sa.ForeignKeyConstraint(["server"], ["servers.name"],
                                name="fk_tenants_server_servers"),
        sa.CheckConstraint(
            "state IN ('provisioning','active','suspended','cancelled','deleted','purged')",
            name="ck_tenants_state_known"),
    )
    op.create_index("ix_tenants_region", "tenants", ["region"])
    op.create_index("ix_tenants_server", "tenants", ["server"])
    op.create_index("ix_tenants_state", "tenants", ["state"])
    op.create_table(
        "tenant_credentials",
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("password_wrapped", sa.Text(), nullable=False),
        sa.Column("master_key_id", sa.String(32), nullable=False),
        sa.Column("applied_at", TS, nullable=True),
        sa.Column("created_at", TS, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_tenant_credentials"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE",
                                name="fk_tenant_credentials_tenant_id_tenants"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(60), nullable=False),
        sa.Column("tenant", sa.String(40), nullable=True),
        sa.Column("region", sa.String(40), nullable=True),
        sa.Column("outcome", sa.String(20), server_default="ok", nullable=False),
        sa.Column("detail", JSONB(), server_default="{}", nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_action", "audit_log", ["action"])
    op.create_index("ix_audit_log_tenant", "audit_log", ["tenant"])


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_table("tenant_credentials")
    op.drop_table("tenants")
    op.drop_table("servers")
    op.drop_table("regions")
