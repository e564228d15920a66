"""Which statements of a migration's SQL destroy data or objects: the rule the
rollout guard (confirmation, `--dry-run` marks) decides on.

Pure: a small tokenizer (comments, '…'/E'…' strings, "quoted" identifiers and
$tag$ bodies are never read as keywords) and a classifier over each statement.
Destructive is: DROP <object>; ALTER TABLE … DROP [COLUMN] / DROP CONSTRAINT;
ALTER … TYPE (a column's type: a rewrite, possibly a lossy cast); other ALTER … DROP
(e.g. ALTER TYPE … DROP ATTRIBUTE); TRUNCATE; DELETE or UPDATE without WHERE (every
row); and inside a DO block the same, plus EXECUTE (dynamic SQL: not checkable).
Not destructive: CREATE …, ADD …, RENAME …, ALTER COLUMN … DROP DEFAULT / NOT NULL,
DELETE/UPDATE … WHERE, INSERT … ON CONFLICT DO UPDATE.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MARK = "!! destructive"


@dataclass(frozen=True)
class Finding:
    kind: str  # e.g. "DROP COLUMN", "DELETE without WHERE"
    subject: str  # e.g. "products.reorder_level"
    offset: int  # where the statement starts in the SQL text
    statement: str  # its first line, for humans

    def describe(self) -> str:
        return f"{self.kind} {self.subject}".strip()

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "subject": self.subject, "statement": self.statement}


@dataclass(frozen=True)
class _Tok:
    kind: str  # word | ident | str | dollar | num | punct
    text: str  # word: as written; ident/str/dollar: the content; punct: the char
    pos: int

    @property
    def kw(self) -> str:
        return self.text.upper() if self.kind == "word" else ""


_WORD = re.compile(r"[A-Za-z_\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*")
_NUM = re.compile(r"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?|\.[0-9]+")
_DOLLAR = re.compile(r"\$([A-Za-z_\u0080-\uffff][A-Za-z0-9_\u0080-\uffff]*)?\$")


def _tokens(sql: str) -> list[_Tok]:
    out: list[_Tok] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c.isspace():
            i += 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):  # block comments nest in PostgreSQL
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "'" or (c in "eEbBxXnN" and sql.startswith("'", i + 1)) or \
                (c in "uU" and sql.startswith("&'", i + 1)):
            start = i
            backslash = c in "eE"
            i = sql.index("'", i) + 1
            buf = []
            while i < n:
                ch = sql[i]
                if backslash and ch == "\\":
                    buf.append(sql[i:i + 2])
                    i += 2
                elif ch == "'":
                    if sql.startswith("''", i):
                        buf.append("'")
                        i += 2
                    else:
                        i += 1
                        break
                else:
                    buf.append(ch)
                    i += 1
            out.append(_Tok("str", "".join(buf), start))
        elif c == '"' or (c in "uU" and sql.startswith('&"', i + 1)):
            start = i
            i = sql.index('"', i) + 1
            buf = []
            while i < n:
                if sql[i] == '"':
                    if sql.startswith('""', i):
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(sql[i])
                i += 1
            out.append(_Tok("ident", "".join(buf), start))
        elif c == "$" and (m := _DOLLAR.match(sql, i)):
            tag = m.group(0)
            end = sql.find(tag, m.end())
            body_end = n if end < 0 else end
            out.append(_Tok("dollar", sql[m.end():body_end], i))
            i = n if end < 0 else end + len(tag)
        elif m := _WORD.match(sql, i):
            out.append(_Tok("word", m.group(0), i))
            i = m.end()
        elif m := _NUM.match(sql, i):
            out.append(_Tok("num", m.group(0), i))
            i = m.end()
        else:
            out.append(_Tok("punct", c, i))
            i += 1
    return out


def _statements(toks: list[_Tok]) -> list[list[_Tok]]:
    stmts: list[list[_Tok]] = []
    cur: list[_Tok] = []
    for t in toks:
        if t.kind == "punct" and t.text == ";":
            if cur:
                stmts.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        stmts.append(cur)
    return stmts


def _depths(toks: Sequence[_Tok]) -> list[int]:
    depth, out = 0, []
    for t in toks:
        if t.kind == "punct" and t.text == "(":
            out.append(depth)
            depth += 1
        elif t.kind == "punct" and t.text == ")":
            depth = max(0, depth - 1)
            out.append(depth)
        else:
            out.append(depth)
    return out


def _name_part(t: _Tok) -> str | None:
    if t.kind == "word":
        return t.text.lower()  # unquoted names fold to lower case
    if t.kind == "ident":
        return t.text if re.fullmatch(r"[a-z_][a-z0-9_$]*", t.text) else \
            '"' + t.text.replace('"', '""') + '"'
    return None


def _qualified(toks: Sequence[_Tok], i: int) -> tuple[str, int]:
    """The dotted name starting at i (``""`` if none) and the index after it."""
    parts: list[str] = []
    while i < len(toks):
        part = _name_part(toks[i])
        if part is None:
            break
        parts.append(part)
        i += 1
        if i < len(toks) and toks[i].kind == "punct" and toks[i].text == ".":
            i += 1
            continue
        break
    return ".".join(parts), i


def _skip(toks: Sequence[_Tok], i: int, *words: str) -> int:
    """Skip optional keyword runs, e.g. IF EXISTS / ONLY / CONCURRENTLY."""
    moved = True
    while moved:
        moved = False
        for w in words:
            seq = w.split()
            if [t.kw for t in toks[i:i + len(seq)]] == seq:
                i += len(seq)
                moved = True
    return i


# object kinds DROP names, longest first (so MATERIALIZED VIEW beats VIEW's absence)
_DROP_KINDS = sorted((k.split() for k in (
    "TABLE", "FOREIGN TABLE", "INDEX", "SCHEMA", "VIEW", "MATERIALIZED VIEW", "SEQUENCE",
    "TYPE", "DOMAIN", "FUNCTION", "PROCEDURE", "ROUTINE", "AGGREGATE", "TRIGGER", "RULE",
    "POLICY", "EXTENSION", "DATABASE", "ROLE", "USER", "GROUP", "OWNED", "SERVER",
    "COLLATION", "CONVERSION", "OPERATOR", "OPERATOR CLASS", "OPERATOR FAMILY",
    "PUBLICATION", "SUBSCRIPTION", "STATISTICS", "TABLESPACE", "EVENT TRIGGER", "CAST",
    "TRANSFORM", "LANGUAGE", "ACCESS METHOD", "FOREIGN DATA WRAPPER", "USER MAPPING",
    "TEXT SEARCH CONFIGURATION", "TEXT SEARCH DICTIONARY", "TEXT SEARCH PARSER",
    "TEXT SEARCH TEMPLATE", "PROCEDURAL LANGUAGE", "TRUSTED PROCEDURAL LANGUAGE")),
    key=len, reverse=True)
_SUBJECT_END = {"CASCADE", "RESTRICT", "ON", "BY", "FOR", "RESTART", "CONTINUE"}


def _names_list(toks: Sequence[_Tok], i: int) -> list[str]:
    """Comma-separated names from i (args in parentheses skipped), stopping at
    CASCADE / RESTRICT / ON …."""
    names: list[str] = []
    depth = 0
    while i < len(toks):
        t = toks[i]
        if t.kind == "punct" and t.text == "(":
            depth += 1
        elif t.kind == "punct" and t.text == ")":
            depth -= 1
        elif depth == 0 and t.kw in _SUBJECT_END:
            break
        elif depth == 0 and (name := _qualified(toks, i))[0]:
            names.append(name[0])
            i = name[1]
            continue
        i += 1
    return names


def _drop(toks: Sequence[_Tok]) -> list[tuple[str, str]]:
    words = [t.kw for t in toks[1:5]]
    kind = next((k for k in _DROP_KINDS if words[:len(k)] == k), words[:1] or ["?"])
    i = _skip(toks, 1 + len(kind), "IF EXISTS", "CONCURRENTLY")
    label = "DROP " + " ".join(kind)
    if kind == ["OWNED"]:  # DROP OWNED BY role, …: every object those roles own
        return [(label, ", ".join(_names_list(toks, _skip(toks, i, "BY"))))]
    names = _names_list(toks, i) or [""]
    if kind in (["TRIGGER"], ["RULE"], ["POLICY"]):  # DROP TRIGGER t ON table
        on = next((j for j in range(i, len(toks)) if toks[j].kw == "ON"), None)
        table = _qualified(toks, on + 1)[0] if on is not None else ""
        return [(label, f"{names[0]} ON {table}" if table else names[0])]
    return [(label, n) for n in names]


def _actions(toks: Sequence[_Tok], i: int) -> list[Sequence[_Tok]]:
    """An ALTER's comma-separated actions (commas inside parentheses are not)."""
    out: list[Sequence[_Tok]] = []
    cur: list[_Tok] = []
    depth = 0
    for t in toks[i:]:
        if t.kind == "punct" and t.text in "()":
            depth += 1 if t.text == "(" else -1
        if depth == 0 and t.kind == "punct" and t.text == ",":
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        out.append(cur)
    return out


_TABLE_LIKE = (["TABLE"], ["FOREIGN", "TABLE"], ["MATERIALIZED", "VIEW"])


def _alter(toks: Sequence[_Tok]) -> list[tuple[str, str]]:
    words = [t.kw for t in toks[1:3]]
    kind = next((k for k in _TABLE_LIKE if words[:len(k)] == k), None)
    found: list[tuple[str, str]] = []
    if kind is None:  # ALTER TYPE / DOMAIN / …: an action dropping something
        what = words[:1] or ["?"]
        obj, i = _qualified(toks, _skip(toks, 2, "IF EXISTS"))
        for act in _actions(toks, i):
            kws = [t.kw for t in act[:2]]
            if kws[:1] == ["DROP"] and kws[1:] not in (["DEFAULT"], ["NOT"]):
                sub = _qualified(act, _skip(act, 2, "IF EXISTS"))[0]
                found.append((f"ALTER {what[0]} DROP {kws[1] if len(kws) > 1 else ''}"
                              .rstrip(), f"{obj}.{sub}" if sub else obj))
            elif kws[:1] == ["ALTER"] and any(t.kw == "TYPE" for t in act[2:]):
                sub = _qualified(act, _skip(act, 1, "ATTRIBUTE"))[0]
                found.append((f"ALTER {what[0]} … TYPE", f"{obj}.{sub}"))
        return found
    i = _skip(toks, 1 + len(kind), "IF EXISTS", "ONLY")
    table, i = _qualified(toks, i)
    if i < len(toks) and toks[i].text == "*":
        i += 1
    for act in _actions(toks, i):
        kws = [t.kw for t in act]
        if kws[:1] == ["DROP"]:
            if kws[1:2] == ["CONSTRAINT"]:
                name = _qualified(act, _skip(act, 2, "IF EXISTS"))[0]
                found.append(("DROP CONSTRAINT", f"{table}.{name}"))
            else:
                name = _qualified(act, _skip(act, 1, "COLUMN", "IF EXISTS"))[0]
                found.append(("DROP COLUMN", f"{table}.{name}"))
        elif kws[:1] == ["ALTER"] and kws[1:2] != ["CONSTRAINT"]:
            j = _skip(act, 1, "COLUMN")
            col, j = _qualified(act, j)
            rest = kws[j:j + 3]
            if rest[:1] == ["TYPE"] or rest == ["SET", "DATA", "TYPE"]:
                found.append(("ALTER COLUMN TYPE", f"{table}.{col}"))
    return found


_NOT_A_STATEMENT = {"FOR", "ON", "KEY", "DO", "OF", "OR", "BEFORE", "AFTER", "INSTEAD",
                    "GRANT", "REVOKE", ","}


def _dml(toks: Sequence[_Tok]) -> list[tuple[str, str]]:
    """DELETE FROM / UPDATE … SET anywhere in the statement (CTEs, DO bodies) that
    have no WHERE of their own (at their own parenthesis depth)."""
    depths = _depths(toks)
    found = []
    for i, t in enumerate(toks):
        if t.kw not in ("DELETE", "UPDATE"):
            continue
        prev = toks[i - 1] if i else None
        if prev is not None and (prev.kw in _NOT_A_STATEMENT or prev.text == ","):
            continue  # FOR UPDATE, ON DELETE CASCADE, DO UPDATE, GRANT UPDATE, …
        j = i + 1
        if t.kw == "DELETE":
            if j >= len(toks) or toks[j].kw != "FROM":
                continue
            j += 1
        j = _skip(toks, j, "ONLY")
        table, j = _qualified(toks, j)
        if not table:
            continue
        if t.kw == "UPDATE":  # UPDATE t [*] [[AS] alias] SET
            k = j + (j < len(toks) and toks[j].text == "*")
            k = _skip(toks, k, "AS")
            if k < len(toks) and toks[k].kw != "SET":
                k += 1  # an alias
            if k >= len(toks) or toks[k].kw != "SET":
                continue
        d = depths[i]
        where = False
        for k in range(j, len(toks)):
            if depths[k] < d or (depths[k] == d and toks[k].text == ")"):
                break  # the end of this (sub)statement
            if depths[k] == d and toks[k].kw == "WHERE":
                where = True
                break
        if not where:
            found.append((f"{t.kw} without WHERE", table))
    return found


# in a PL/pgSQL body, a statement starts at the beginning or after one of these
_PLPGSQL_STARTS = {"BEGIN", "THEN", "ELSE", "LOOP"}


def _classify(toks: list[_Tok], plpgsql: bool = False) -> list[tuple[str, str]]:
    if not toks:
        return []
    found: list[tuple[str, str]] = []
    starts = [0]
    if plpgsql:
        starts += [i for i in range(1, len(toks)) if toks[i - 1].kw in _PLPGSQL_STARTS]
    for s in starts:
        head = toks[s:]
        kw = head[0].kw
        if kw == "DROP":
            found += _drop(head)
        elif kw == "ALTER":
            found += _alter(head)
        elif kw == "TRUNCATE":
            i = _skip(head, 1, "TABLE", "ONLY")
            found += [("TRUNCATE", n) for n in _names_list(head, i) or [""]]
        elif kw == "EXECUTE" and plpgsql:
            found.append(("EXECUTE", "(dynamic SQL in a DO block, not checked)"))
        elif kw == "DO":
            body = next((t for t in head[1:] if t.kind in ("dollar", "str")), None)
            if body is not None:
                for stmt in _statements(_tokens(body.text)):
                    found += _classify(stmt, plpgsql=True)
    found += [f for f in _dml(toks) if f not in found]
    return found


def classify(sql: str) -> list[Finding]:
    """Every destructive statement of ``sql``, in order (one finding per object)."""
    out: list[Finding] = []
    for stmt in _statements(_tokens(sql)):
        start = stmt[0].pos
        line = sql[start:].split("\n", 1)[0].strip()
        out += [Finding(kind, subject, start, line) for kind, subject in _classify(stmt)]
    return out


def annotate(sql: str, findings: Iterable[Finding] | None = None) -> str:
    """``sql`` with a ``-- !! destructive: …`` comment line above each destructive
    statement (still valid SQL: only comments are added)."""
    by_line: dict[int, list[str]] = {}
    for f in classify(sql) if findings is None else findings:
        line_start = sql.rfind("\n", 0, f.offset) + 1
        by_line.setdefault(line_start, []).append(f.describe())
    out, last = [], 0
    for at in sorted(by_line):
        out += [sql[last:at], f"-- {MARK}: {'; '.join(by_line[at])}\n"]
        last = at
    out.append(sql[last:])
    return "".join(out)


# kinds that lose rows or values (listed first in a summary); the rest lose objects
# that can be made again (an index, a view, a constraint)
DATA_LOSS = frozenset({"DROP TABLE", "DROP COLUMN", "DROP SCHEMA", "DROP DATABASE",
                       "DROP SEQUENCE", "DROP TYPE", "DROP OWNED", "TRUNCATE",
                       "DELETE without WHERE", "UPDATE without WHERE", "ALTER COLUMN TYPE",
                       "ALTER TYPE DROP ATTRIBUTE", "EXECUTE"})


def summarize(findings: Iterable[Finding], *, names: int = 3) -> str:
    """``1 DROP COLUMN (products.reorder_level), 2 DROP INDEX (a, b)``: one entry per
    kind (those that lose data first, else in order of appearance), each object once."""
    kinds: dict[str, list[str]] = {}
    for f in sorted(findings, key=lambda f: f.kind not in DATA_LOSS):
        subjects = kinds.setdefault(f.kind, [])
        if f.subject not in subjects:
            subjects.append(f.subject)
    parts = []
    for kind, subjects in kinds.items():
        shown = [s for s in subjects if s][:names]
        more = len(subjects) - len(shown)
        listed = ", ".join(shown) + (f", +{more} more" if more and shown else "")
        parts.append(f"{len(subjects)} {kind}" + (f" ({listed})" if listed else ""))
    return ", ".join(parts)


def unique(findings: Iterable[Finding]) -> list[Finding]:
    """One finding per (kind, subject): the same DROP in several migration paths
    counts once."""
    seen: set[tuple[str, str]] = set()
    out = []
    for f in findings:
        if (f.kind, f.subject) not in seen:
            seen.add((f.kind, f.subject))
            out.append(f)
    return out
