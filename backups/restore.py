"""Restores. ``restore_as`` makes a new tenant from a backup: the backup is read
and checked whole first (manifest, checksum, decryption, archive listing), so
a bad backup creates nothing; then the tenant is provisioned with its
database filled by ``pg_restore --single-transaction`` instead of the
template, streamed from the store through age, never via disk. If anything
fails after that, the half-made tenant is removed again."""

from __future__ import annotations

from typing import TYPE_CHECKING

from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from backups import pipeline
from orchestrator import pgserver
from orchestrator.errors import Conflict, TenantctlError
from orchestrator.localfleet import pg_tool
from orchestrator.models import Tenant, TenantState
from orchestrator.names import tenant_names, validate_slug
from orchestrator.provisioning import tenant_lock

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
