"""The real time an audit record was written, beside the time it is about
(``at``, which a retention run's --now sets): the audit purge needs both past its
cutoff, so a run at a past --now cannot date its own evidence into the purge window.

Revision ID: c0014_audit_recorded_at
Revises: c0010_moves
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c0014_audit_recorded_at"
down_revision: str | None = "c0010_moves"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # existing records: written when they say (nothing dated them otherwise before)
    op.add_column("audit_log", sa.Column("recorded_at", sa.DateTime(timezone=True),
                                         nullable=True))
    op.execute("UPDATE audit_log SET recorded_at = at")
    op.alter_column("audit_log", "recorded_at", nullable=False,
                    server_default=sa.text("now()"))


def downgrade() -> None:
    op.drop_column("audit_log", "recorded_at")
