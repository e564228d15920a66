"""Restores. ``restore_as`` makes a new tenant from a backup: the backup is read
and checked whole first (manifest, checksum, decryption, archive listing), so
a bad backup creates nothing; then the tenant is provisioned with its
database filled by ``pg_restore --single-transaction`` instead of the
template, streamed from the store through age, never via disk. If anything
fails after that, the half-made tenant is removed again."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import update

from backups import service as pipeline
from orchestrator.adapters.catalog.db import with_dbname
from orchestrator.adapters.catalog.locks import holding_tenant
from orchestrator.adapters.catalog.models import Tenant, TenantState
from orchestrator.adapters.faults import checkpoint
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres.pgtools import pg_tool
from orchestrator.domain.errors import Conflict, first_line
from orchestrator.domain.names import tenant_names
from orchestrator.domain.states import HAS_DATABASE

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps


def restore_into(fleet: Deps, backup_id: int, dsn: str, owner_role: str) -> None:
    """pg_restore a backup into the (empty) database behind ``dsn``, every object
    owned by ``owner_role``, all or nothing."""
    row = pipeline.get_backup(fleet, backup_id)
    dbname = str(conninfo_to_dict(dsn).get("dbname"))
    argv = [pg_tool(fleet.cfg, "pg_restore"), "--no-owner", "--no-acl",
            f"--role={owner_role}", "--single-transaction", "--exit-on-error",
            f"--dbname={dbname}"]
    done = pipeline.stream_plaintext(fleet, row, argv, pipeline.libpq_env(dsn))
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise pipeline.BackupError(f"pg_restore of backup {backup_id} failed: "
                                   f"{lines[-1] if lines else done.returncode}")


def restore_in_place(fleet: Deps, backup_id: int) -> dict[str, object]:
    """Replace a tenant's database with a backup, never half-restored: the backup
    is checked whole, restored into a side database and secured; only then are
    the two swapped by renaming, in one transaction. On any error before the
    swap, the live database is untouched (and open)."""
    row = pipeline.get_backup(fleet, backup_id)
    tenant = fleet.get_tenant(row.slug)
    if tenant.state not in HAS_DATABASE:
        raise Conflict(f"tenant {row.slug!r} is {tenant.state}: nothing to restore into")
    pipeline.verify_backup(fleet, backup_id)  # a bad backup stops here, nothing touched
    names = tenant_names(row.slug)
    live, side, old = names.database, f"{names.database}__r", f"{names.database}__old"
    admin = fleet.cfg.server(tenant.server).admin_dsn
    with holding_tenant(fleet.catalog, row.slug):
        with fleet.server_connection(tenant.server) as conn:
            pgserver.make_side_database(conn, names, side, leftovers=(side, old))
        try:
            restore_into(fleet, backup_id, with_dbname(admin, side), names.owner_role)
            with pgserver.connect(admin, side, server=tenant.server) as sconn:
                pgserver.secure_tenant_database(sconn, names, side)
                # still on hold, or past its storage quota: no writes
                if tenant.state == TenantState.cancelled or tenant.over_quota:
                    pgserver.restrict_to_reads(sconn, names, side)
                rev_row = sconn.execute(
                    "SELECT version_num FROM alembic_version").fetchone()
            checkpoint("restore.ready")
            with fleet.server_connection(tenant.server) as conn:
                pgserver.swap_in(conn, live, side, old)
                checkpoint("restore.swapped")
                pgserver.drop_database(conn, old)
        except BaseException as exc:
            with fleet.server_connection(tenant.server) as conn:
                if pgserver.database_owner(conn, live) is not None:
                    pgserver.set_connections(conn, live, True)
                pgserver.drop_database(conn, side, if_exists=True)
            if isinstance(exc, psycopg.Error):
                raise pipeline.BackupError(f"in-place restore of {row.slug!r} failed, the "
                                           f"live database is untouched: "
                                           f"{first_line(exc)}") from None
            raise
    revision = rev_row[0] if rev_row else None
    with fleet.catalog.session() as s, s.begin():
        s.execute(update(Tenant).where(Tenant.id == tenant.id).values(revision=revision))
        fleet.catalog.audit("backup.restore", session=s, tenant=row.slug, region=row.region,
                            backup=backup_id, in_place=True)
    return {"tenant": row.slug, "backup": backup_id, "revision": revision, "in_place": True}
