"""Write a synthetic Alembic script directory with N revisions, for benchmarks
that need a long migration history (provisioning, rollouts)."""

from __future__ import annotations

from pathlib import Path

ENV_PY = '''"""Synthetic benchmark history: same connection contract as migrations/tenant."""
from alembic import context

config = context.config
if context.is_offline_mode():
    context.configure(url="postgresql://", literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = config.attributes["connection"]
    context.configure(connection=connection, transaction_per_migration=False)
    with context.begin_transaction():
        context.run_migrations()
'''

REVISION = '''"""synthetic revision {n}"""
import sqlalchemy as sa
from alembic import op

revision = "s{n:04d}"
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
{body}


def downgrade() -> None:
{undo}
'''


def _bodies(n: int) -> tuple[str, str]:
    """Every third revision adds a column and an index to an earlier table; the
    others create a table — the mix a real product's history has."""
    if n % 3 == 2 and n > 2:
        table = f"entity_{n - 2:04d}"
        return (
            f'    op.add_column("{table}", sa.Column("extra_{n}", sa.Text(), nullable=True))\n'
            f'    op.create_index("ix_{table}_extra_{n}", "{table}", ["extra_{n}"])',
            f'    op.drop_index("ix_{table}_extra_{n}", table_name="{table}")\n'
            f'    op.drop_column("{table}", "extra_{n}")',
        )
    table = f"entity_{n:04d}"
    return (
        f'    op.create_table(\n'
        f'        "{table}",\n'
        f'        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),\n'
        f'        sa.Column("name", sa.String(200), nullable=False),\n'
        f'        sa.Column("amount", sa.Numeric(12, 2), server_default="0"),\n'
        f'        sa.Column("created_at", sa.DateTime(timezone=True),\n'
        f'                  server_default=sa.func.now()),\n'
        f'    )\n'
        f'    op.create_index("ix_{table}_name", "{table}", ["name"])',
        f'    op.drop_table("{table}")',
    )


def write_history(target: Path, revisions: int) -> Path:
    (target / "versions").mkdir(parents=True, exist_ok=True)
    (target / "env.py").write_text(ENV_PY)
    for n in range(1, revisions + 1):
        body, undo = _bodies(n)
        down = f"s{n - 1:04d}" if n > 1 else None
        (target / "versions" / f"s{n:04d}.py").write_text(
            REVISION.format(n=n, down=down, body=body, undo=undo))
    return target


CLI_ENV_PY = '''"""What a typical operator script runs: `alembic upgrade head` against a URL."""
from alembic import context
from sqlalchemy import create_engine

url = context.get_x_argument(as_dictionary=True)["url"]
engine = create_engine(url)
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
'''


def cli_copy(source: Path, target: Path) -> Path:
    """A copy of an Alembic script directory whose env.py takes `-x url=...`, plus an
    alembic.ini, so the stock `alembic` command can run it. Returns the ini path."""
    (target / "versions").mkdir(parents=True, exist_ok=True)
    for rev in (source / "versions").glob("*.py"):
        (target / "versions" / rev.name).write_text(rev.read_text())
    (target / "env.py").write_text(CLI_ENV_PY)
    ini = target / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {target}\n")
    return ini
