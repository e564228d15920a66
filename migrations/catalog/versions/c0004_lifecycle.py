"""Lifecycle: suspension time, the verified final backup a deletion rests on, and
the indexes that let retention planning read only what is due.

Revision ID: c0004_lifecycle
Revises: c0003_backups
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c0004_lifecycle"
down_revision: str | None = "c0003_backups"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("tenants", sa.Column("suspended_at", TS, nullable=True))
    op.add_column("tenants", sa.Column("final_backup_id", sa.BigInteger(), nullable=True))
    op.create_index("ix_tenants_hold_due", "tenants", ["hold_until"],
                    postgresql_where=sa.text("state = 'cancelled'"))
    op.create_index("ix_tenants_purge_due", "tenants", ["purge_after"],
                    postgresql_where=sa.text("state = 'deleted'"))
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_backups_tenant_finished", "backups", ["tenant_id", "finished_at"],
                    postgresql_where=sa.text("status = 'completed'"))


def downgrade() -> None:
    op.drop_index("ix_backups_tenant_finished", table_name="backups")
    op.drop_index("ix_audit_log_at", table_name="audit_log")
    op.drop_index("ix_tenants_purge_due", table_name="tenants")
    op.drop_index("ix_tenants_hold_due", table_name="tenants")
    op.drop_column("tenants", "final_backup_id")
    op.drop_column("tenants", "suspended_at")
