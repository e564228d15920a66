"""What to do about a finding, by its code: the one text doctor prints as a finding's
remedy (domain/health.py) and the report prints beside each broken promise
(domain/promises.py). A code here is doctor's where doctor has the rule; the codes
only the report finds (an audit record missing, a backup not encrypted) sit beside
them so the report names no remedy of its own making.

``remedy(code, **args)`` fills the text in; an argument the text does not use is
ignored, so a rule passes what it has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# the role attributes only a superuser may take away: doctor --fix does not try
SUPERUSER_ONLY = frozenset({"SUPERUSER", "BYPASSRLS", "REPLICATION"})


def _role_powers(role: str, powers: Sequence[str], **_: object) -> str:
    fixable = not SUPERUSER_ONLY & set(powers)
    return (f"ALTER ROLE {role} " + " ".join(f"NO{p}" for p in powers)
            + ("" if fixable else " (as a superuser)"))


def _backup_missing_object(live: bool = True, **_: object) -> str:
    return "tenantctl doctor --fix (marks it failed" + (", takes a new backup)" if live
                                                         else ")")


def _retention_overdue(kind: str, **_: object) -> str:
    return f"tenantctl retention run --only {kind} (tenantctl doctor --fix, after asking)"


def _pooler_down(where: str = "its address", **_: object) -> str:
    return (f"start the pooler ({where}; `tenantctl local up` for the embedded fleet), "
            "then tenantctl doctor --fix (writes its files, RELOAD)")


def _pooler_stale(server: str = "SERVER", **_: object) -> str:
    return (f"tenantctl doctor --fix (or tenantctl pooler sync {server}): writes its "
            "files from the catalog, RELOAD")


REMEDIES: dict[str, Callable[..., str]] = {
    # doctor's rules (domain/health.py)
    "server-unreachable": "check the server and the admin DSN in tenantctl.toml "
                          "(`tenantctl local status` for the embedded fleet)".format,
    "tenant-outside-region": "move it back with a backup and `tenantctl backup restore "
                             "--as` in its region; correct the row by hand".format,
    "database-missing": "restore it: tenantctl backup list {slug}, then tenantctl backup "
                        "restore <id> --as <new slug>".format,
    "role-missing": "tenantctl tenant credentials {slug} --rotate recreates nothing: "
                    "recreate the role by hand, then re-grant with `tenantctl doctor "
                    "--fix`".format,
    "public-connect": "REVOKE ALL ON DATABASE {database} FROM PUBLIC "
                      "(tenantctl doctor --fix)".format,
    "role-reaches-other-database": "REVOKE CONNECT ON DATABASE {database} FROM {role} "
                                   "(tenantctl doctor --fix)".format,
    "role-powers": _role_powers,
    "login-password-changed": "tenantctl doctor --fix (gives the role its stored "
                              "password back)".format,
    "plan-unknown": "add the plan back as [plans.NAME] in tenantctl.toml, or "
                    "tenantctl tenant set-plan SLUG PLAN".format,
    "backup-overdue": "tenantctl backup run {slug} (tenantctl doctor --fix)".format,
    "backup-missing-object": _backup_missing_object,
    "store-unreachable": "check the store and its credentials".format,
    "backup-outside-region": "tenantctl doctor --fix (deletes this copy, after "
                             "asking)".format,
    "deletion-overdue": _retention_overdue,
    "purge-overdue": _retention_overdue,
    "grant-expired": "tenantctl retention run --only access (tenantctl doctor --fix)".format,
    "pooler-down": _pooler_down,
    "pooler-stale": _pooler_stale,
    # found only by the report (domain/promises.py)
    "backup-not-encrypted": "tenantctl backup run {slug} (a new backup, encrypted to its "
                            "tenant's key)".format,
    "backup-recorded-outside-region": "tenantctl backup run {slug} (a new backup in its "
                                      "region's store), then tenantctl doctor".format,
    "audit-record-missing": "tenantctl audit list --tenant {slug} shows what the log "
                            "holds; a lost record cannot be made up: find out how its "
                            "state changed outside tenantctl".format,
    "audit-kept-too-long": "tenantctl retention run --only audit (deletes records older "
                           "than [lifecycle] audit_days)".format,
    "probe-inconclusive": "tenantctl doctor (names the cause and its remedy)".format,
}


def remedy(code: str, **args: object) -> str:
    return REMEDIES[code](**args)
