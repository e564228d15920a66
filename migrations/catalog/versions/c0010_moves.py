"""Tenant moves: one row per move of a tenant between servers (and regions), its
recorded step machine and its history (orchestrator/services/move.py).

Revision ID: c0010_moves
Revises: c0011_servers
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "c0010_moves"
down_revision: str | None = "c0011_servers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tenant_moves",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("slug", sa.String(40), nullable=False),
        sa.Column("from_server", sa.String(63), nullable=False),
        sa.Column("to_server", sa.String(63), nullable=False),
        sa.Column("from_region", sa.String(40), nullable=False),
        sa.Column("to_region", sa.String(40), nullable=False),
        sa.Column("method", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("step", sa.String(40), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False, server_default="running"),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("bytes_copied", sa.BigInteger(), nullable=True),
        sa.Column("write_pause_ms", sa.Integer(), nullable=True),
        sa.Column("checks", JSONB(), nullable=False, server_default="{}"),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE",
                                name="fk_tenant_moves_tenant_id_tenants"),
        sa.PrimaryKeyConstraint("id", name="pk_tenant_moves"),
        sa.CheckConstraint("outcome IN ('running','done','aborted')",
                           name="ck_tenant_moves_outcome_known"),
        sa.CheckConstraint("method IN ('logical','dump')",
                           name="ck_tenant_moves_method_known"),
    )
    op.create_index("ix_tenant_moves_tenant_id", "tenant_moves", ["tenant_id"])
    # at most one unfinished move per tenant
    op.create_index("uq_tenant_moves_unfinished", "tenant_moves", ["tenant_id"],
                    unique=True, postgresql_where=sa.text("finished_at IS NULL"))


def downgrade() -> None:
    op.drop_index("uq_tenant_moves_unfinished", table_name="tenant_moves")
    op.drop_index("ix_tenant_moves_tenant_id", table_name="tenant_moves")
    op.drop_table("tenant_moves")
