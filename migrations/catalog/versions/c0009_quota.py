"""Storage quota enforcement: whether a tenant's writes are revoked for being past its
plan's storage_quota (a flag beside the lifecycle state, never a state of its own),
and since when.

Revision ID: c0009_quota
Revises: c0008_usage
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c0009_quota"
down_revision: str | None = "c0008_usage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("over_quota", sa.Boolean(), nullable=False,
                                       server_default="false"))
    op.add_column("tenants", sa.Column("over_quota_since", sa.DateTime(timezone=True),
                                       nullable=True))


def downgrade() -> None:
    op.drop_column("tenants", "over_quota_since")
    op.drop_column("tenants", "over_quota")
