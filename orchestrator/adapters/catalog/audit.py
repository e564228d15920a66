"""Reading the audit log, and keeping secrets out of it."""

from __future__ import annotations

import re
from typing import Any

from orchestrator.domain.errors import FIELD, InvalidInput, printable

_SECRET_KEY = re.compile(r"password|passwd|secret|identity|private|token|credential",
                         re.IGNORECASE)
_DSN_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@|(password=)\S+", re.IGNORECASE)
# secrets in typed text (a `tenant psql -c` command, a reason): each pattern with
# what replaces it
_SECRET_TEXT = (
    (re.compile(r"AGE-SECRET-KEY-1[0-9A-Z]+", re.IGNORECASE), "AGE-SECRET-KEY-[redacted]"),
    # ALTER/CREATE ROLE … [ENCRYPTED] PASSWORD '…' (also E'…' and dollar quotes)
    (re.compile(r"(\bPASSWORD\s+)(?:E?'(?:[^']|'')*'|(\$\w*\$).*?\2)",
                re.IGNORECASE | re.DOTALL), r"\1'[redacted]'"),
    # password = s3cr3t, passwd: x, PGPASSWORD=x, "password": "x"
    (re.compile(r"(\b\w*(?:password|passwd|pwd)[\"']?\s*[=:]\s*)"
                r"(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s,;&)]+)", re.IGNORECASE),
     r"\1[redacted]"),
    (re.compile(r"SCRAM-SHA-256\$[^\s'\"]+"), "SCRAM-SHA-256$[redacted]"),
    (re.compile(r"\bmd5[0-9a-f]{32}\b"), "md5[redacted]"),
)
MAX_REASON = 500  # characters of a --reason (one line of plain text)


def redact_text(value: str) -> str:
    """Free text with every secret-looking part replaced: passwords in connection
    strings, ``password = …`` settings, ``… PASSWORD '…'`` clauses, SCRAM/md5
    verifiers and age private keys. Applied to every text the audit log stores."""
    value = _DSN_PASSWORD.sub(
        lambda m: f"{m.group(1)}[redacted]@" if m.group(1) else f"{m.group(2)}[redacted]",
        value)
    for pattern, replacement in _SECRET_TEXT:
        value = pattern.sub(replacement, value)
    return value


def reason_text(value: str, what: str = "reason") -> str:
    """A reason bound for the catalog and for terminals (`tenant show`, `access
    list`): at most MAX_REASON characters of one printable line, refused otherwise
    (never echoed: it may be long, or hold escape sequences)."""
    if len(value) > MAX_REASON:
        raise InvalidInput(f"{FIELD} is {len(value)} characters long: at most {MAX_REASON}",
                           field=what)
    value = storable(value, what).strip()
    if not value.isprintable():
        raise InvalidInput(f"{FIELD} holds control characters (a newline, a tab or a "
                           "terminal escape): give one line of plain text", field=what)
    return value


def storable(value: str, what: str) -> str:
    """Free text bound for the catalog (a reason, a name, a filter): Postgres text
    holds no NUL byte and only valid UTF-8 (argv bytes that are not UTF-8 reach
    Python as lone surrogates). Refused in one line, before anything changes."""
    if "\x00" in value or not _encodable(value):
        raise InvalidInput(f"{FIELD} {printable(value)!r} is not storable text "
                           "(NUL byte or invalid UTF-8)", field=what)
    return value


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def redact(detail: dict[str, Any]) -> dict[str, Any]:
    """Audit parameters with anything secret-looking replaced: values under a
    secret-sounding key, and passwords inside connection strings. Text the
    catalog cannot store (a path that is not UTF-8) is kept escaped: the record
    of something already done must not fail."""
    out: dict[str, Any] = {}
    for key, value in detail.items():
        if _SECRET_KEY.search(key):
            out[key] = "[redacted]"
        elif isinstance(value, dict):
            out[key] = redact(value)
        elif isinstance(value, str):
            value = redact_text(value)
            out[key] = value if "\x00" not in value and _encodable(value) \
                else printable(value)
        else:
            out[key] = value
    return out


