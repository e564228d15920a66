"""Restores. ``restore_as`` makes a new tenant from a backup: the backup is read
and checked whole first (manifest, checksum, decryption, archive listing), so
a bad backup creates nothing; then the tenant is provisioned with its
database filled by ``pg_restore --single-transaction`` instead of the
template, streamed from the store through age, never via disk. If anything
fails after that, the half-made tenant is removed again."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import update

from backups import service as pipeline
from orchestrator.adapters.catalog.db import with_dbname
from orchestrator.adapters.catalog.models import Tenant, TenantState
from orchestrator.adapters.faults import checkpoint
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres.pgtools import pg_tool
from orchestrator.domain.errors import Conflict, TenantctlError, first_line
from orchestrator.domain.names import tenant_lock, tenant_names, validate_slug
from orchestrator.services.provisioning import holding_tenant

if TYPE_CHECKING:
    from orchestrator.api import Fleet, ProvisionResult


def restore_into(fleet: Fleet, backup_id: int, dsn: str, owner_role: str) -> None:
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


def restore_as(fleet: Fleet, backup_id: int, new_slug: str) -> ProvisionResult:
    validate_slug(new_slug)
    row = pipeline.get_backup(fleet, backup_id)
    existing = fleet.find_tenant(new_slug)
    resuming = existing is not None and existing.state == TenantState.provisioning \
        and existing.restored_from == backup_id
    if existing is not None and not resuming:
        raise Conflict(f"tenant {new_slug!r} already exists")
    pipeline.verify_backup(fleet, backup_id)  # a bad backup stops here, nothing made
    try:
        result = fleet.provision(new_slug, row.region, restore_from=backup_id)
    except TenantctlError:
        abandon(fleet, new_slug, backup_id)
        raise
    fleet.catalog.audit("backup.restore", tenant=new_slug, region=row.region,
                        backup=backup_id, source=row.slug)
    return result


def abandon(fleet: Fleet, slug: str, backup_id: int) -> None:
    """Remove a tenant that was being made from a backup and failed: its database,
    its roles (only if they carry our marker), its catalog rows."""
    with fleet.catalog.advisory_lock(tenant_lock(slug)) as got:
        if not got:
            return
        tenant = fleet.find_tenant(slug)
        if tenant is None or tenant.state != TenantState.provisioning \
                or tenant.restored_from != backup_id:
            return
        names = tenant_names(slug)
        marker = pgserver.role_marker(tenant.id, slug)
        with fleet.server_connection(tenant.server) as conn:
            if pgserver.database_owner(conn, names.database) == names.owner_role:
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                    sql.Identifier(names.database)))
            for role in (names.login_role, names.owner_role):
                if pgserver.role_exists(conn, role) and \
                        pgserver.role_comment(conn, role) == marker:
                    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        with fleet.catalog.session() as s, s.begin():
            row = s.get(Tenant, tenant.id)
            if row is not None:
                s.delete(row)
            fleet.catalog.audit("backup.restore", tenant=slug, region=tenant.region,
                                session=s, outcome="abandoned", backup=backup_id)


def restore_in_place(fleet: Fleet, backup_id: int) -> dict[str, object]:
    """Replace a tenant's database with a backup, never half-restored: the backup
    is checked whole, restored into a side database and secured; only then are
    the two swapped by renaming, in one transaction. On any error before the
    swap, the live database is untouched (and open)."""
    row = pipeline.get_backup(fleet, backup_id)
    tenant = fleet.get_tenant(row.slug)
    if tenant.state not in pipeline.BACKUPABLE:
        raise Conflict(f"tenant {row.slug!r} is {tenant.state}: nothing to restore into")
    pipeline.verify_backup(fleet, backup_id)  # a bad backup stops here, nothing touched
    names = tenant_names(row.slug)
    live, side, old = names.database, f"{names.database}__r", f"{names.database}__old"
    admin = fleet.cfg.server(tenant.server).admin_dsn
    ident = sql.Identifier
    with holding_tenant(fleet, row.slug):
        with fleet.server_connection(tenant.server) as conn:
            # leftovers of a run that died: a side copy, a closed live database
            for leftover in (side, old):
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    ident(leftover)))
            conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(
                ident(live)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0 "
                                  "ALLOW_CONNECTIONS false").format(
                ident(side), ident(names.owner_role)))
            pgserver.revoke_public(conn, side)
            conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(
                ident(side)))
        try:
            restore_into(fleet, backup_id, with_dbname(admin, side), names.owner_role)
            with pgserver.connect(admin, side, server=tenant.server) as sconn:
                pgserver.secure_tenant_database(sconn, names, side)
                if tenant.state == TenantState.cancelled:  # still on hold: no writes
                    pgserver.restrict_to_reads(sconn, names, side)
                rev_row = sconn.execute(
                    "SELECT version_num FROM alembic_version").fetchone()
            checkpoint("restore.ready")
            with fleet.server_connection(tenant.server) as conn:
                conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false")
                             .format(ident(live)))
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = %s AND pid <> pg_backend_pid()", (live,))
                with conn.transaction():
                    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        ident(live), ident(old)))
                    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        ident(side), ident(live)))
                checkpoint("restore.swapped")
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(ident(old)))
        except BaseException as exc:
            with fleet.server_connection(tenant.server) as conn:
                if pgserver.database_owner(conn, live) is not None:
                    conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true")
                                 .format(ident(live)))
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    ident(side)))
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
