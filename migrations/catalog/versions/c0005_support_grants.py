"""Time-limited support access grants.

Revision ID: c0005_support_grants
Revises: c0004_lifecycle
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c0005_support_grants"
down_revision: str | None = "c0004_lifecycle"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "support_grants",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("slug", sa.String(40), nullable=False),
        sa.Column("server", sa.String(63), nullable=False),
        sa.Column("role_name", sa.String(63), nullable=False),
        sa.Column("grantee", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("read_only", sa.Boolean(), server_default="true", nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("created_at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("dropped_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_support_grants"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE",
                                name="fk_support_grants_tenant_id_tenants"),
    )
    op.create_index("ix_support_grants_tenant_id", "support_grants", ["tenant_id"])
    op.create_index("ix_support_grants_live", "support_grants", ["expires_at"],
                    postgresql_where=sa.text("dropped_at IS NULL"))


def downgrade() -> None:
    op.drop_index("ix_support_grants_live", table_name="support_grants")
    op.drop_index("ix_support_grants_tenant_id", table_name="support_grants")
    op.drop_table("support_grants")
