"""Servers: whether a server accepts new tenants (a drain stops it; `server retire`
keeps it stopped and stamps the retirement), apart from ``available`` (in the config).

Revision ID: c0011_servers
Revises: c0009_quota
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c0011_servers"
down_revision: str | None = "c0009_quota"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("servers", sa.Column("accepting", sa.Boolean(), nullable=False,
                                       server_default=sa.true()))
    op.add_column("servers", sa.Column("retired_at", sa.DateTime(timezone=True),
                                       nullable=True))


def downgrade() -> None:
    op.drop_column("servers", "retired_at")
    op.drop_column("servers", "accepting")
