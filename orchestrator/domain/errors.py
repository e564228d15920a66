"""Expected failures: the CLI prints their message on one line and exits non-zero.

Anything that is not a TenantctlError is a bug and keeps its traceback.

ExitCode is the one table of what tenantctl's exit statuses mean: every error class
carries one, and the CLI exits with these names only (README's table is this one).
"""

from enum import IntEnum, unique


@unique  # one meaning per code
class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    INVALID = 2
    NOT_FOUND = 3
    CONFLICT = 4
    CAPACITY = 5
    UNAVAILABLE = 6
    MASTER_KEY = 7
    ROLLOUT_STOPPED = 8
    STORE_FAILED = 9
    DUMP_OR_RESTORE = 10
    RETENTION = 11
    PROMISE_BROKEN = 12
    CATALOG_INTEGRITY = 13
    DOCTOR_ERRORS = 14
    MIGRATIONS_NOT_CURRENT = 15
    INJECTED_FAULT = 99  # tests only: a fault injected with $TENANTCTL_FAULT
    INTERRUPTED = 130  # 128 + SIGINT, as shells report it


# what each code means, as README's table says it (a test keeps the two the same)
MEANING = {
    ExitCode.FAILED: "other expected failure (e.g. a provisioning step failed; re-run to "
                     "finish)",
    ExitCode.INVALID: "invalid input or config (bad slug, unknown region, config error), "
                      "or a confirmation needed with no terminal to ask on (add --yes): "
                      "nothing changed",
    ExitCode.NOT_FOUND: "not found (no such tenant); `local status` when a cluster is down",
    ExitCode.CONFLICT: "conflict (tenant exists, another process works on it, a foreign "
                       "role of that name, a rollout to another target is running)",
    ExitCode.CAPACITY: "capacity (region full)",
    ExitCode.UNAVAILABLE: "a server or the catalog is unreachable",
    ExitCode.MASTER_KEY: "master key missing or wrong",
    ExitCode.ROLLOUT_STOPPED: "a rollout stopped: canary failed or failure budget exceeded",
    ExitCode.STORE_FAILED: "a backup store failed (after retries), e.g. it is full or its "
                           "root is not a directory",
    ExitCode.DUMP_OR_RESTORE: "a backup is not restorable (missing manifest, checksum, "
                              "tampered, purged) or pg_dump/pg_restore failed",
    ExitCode.RETENTION: "retention: a step failed (the next run retries it), or "
                        "`retention status` found something overdue",
    ExitCode.PROMISE_BROKEN: "`report`: a promise is broken",
    ExitCode.CATALOG_INTEGRITY: "a catalog row contradicts itself (e.g. a tenant's "
                                "database named after another tenant): refused before "
                                "any server is touched",
    ExitCode.DOCTOR_ERRORS: "`doctor`: something at error severity was found (after "
                            "`--fix`: remains)",
    ExitCode.MIGRATIONS_NOT_CURRENT: "`migrate status --check`: a tenant's last migration "
                                     "failed, a tenant is not at its target revision, or "
                                     "its revision could not be read",
    ExitCode.INTERRUPTED: "a rollout interrupted (Ctrl-C / SIGTERM): tenants in flight "
                          "finished, none started",
}


def first_line(exc: BaseException) -> str:
    """The first line of an error (of the driver's own error when SQLAlchemy wraps
    one): what goes into one-line messages and the catalog, never a DETAIL/SQL dump."""
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def printable(text: str) -> str:
    """``text`` on one printable line: anything else (a newline, an escape code, a
    byte that was not UTF-8) shown escaped, as Python would write it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode()
                   for c in text)


FIELD = "{field}"  # where a message names the input it is about


class TenantctlError(Exception):
    """Base for failures an operator can act on; the message is the whole story.

    A message about one input names it by its field (``field="reason"``, the
    parameter's name, written ``{field}`` in the message); whoever shows it may
    name it its own way (the CLI says ``--reason``), so the domain never quotes a
    CLI flag."""

    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, *args: object, field: str | None = None) -> None:
        super().__init__(*args)
        self.field = field

    def shown(self, name: str | None = None) -> str:
        """The message, its field named ``name`` (default: the field itself)."""
        text = super().__str__()
        if self.field is not None:
            text = text.replace(FIELD, name or self.field)
        # Messages quote user input (a path, a config key, a name): whatever that
        # holds, the message stays one printable line — no newline, no escape code.
        return printable(text)

    def __str__(self) -> str:
        return self.shown()


class ConfigError(TenantctlError):
    exit_code = ExitCode.INVALID


class InvalidInput(TenantctlError):
    exit_code = ExitCode.INVALID


class NotFound(TenantctlError):
    exit_code = ExitCode.NOT_FOUND


class Conflict(TenantctlError):
    """Already exists, or another process is working on the same thing."""

    exit_code = ExitCode.CONFLICT


class CapacityError(TenantctlError):
    exit_code = ExitCode.CAPACITY


class ServerUnavailable(TenantctlError):
    exit_code = ExitCode.UNAVAILABLE


class MasterKeyError(TenantctlError):
    """A missing or wrong master key."""

    exit_code = ExitCode.MASTER_KEY


class CatalogIntegrityError(TenantctlError):
    """A catalog row contradicts itself (e.g. a tenant's database named after another
    tenant): refused before anything touches a server. `tenantctl doctor` lists them."""

    exit_code = ExitCode.CATALOG_INTEGRITY
