"""What the commands print, read as cron mail and grep read it: piped (no terminal) at
COLUMNS=80. Long slugs, servers and revisions print whole on one line; -o json/yaml
parse and --json is -o json; sizes are for people; empty lists say so; `--output -`
is stdout. (Rendering at a terminal: tests/test_output_fast.py.)"""

from __future__ import annotations

import io
import json
import re
import subprocess
import zipfile
from typing import Any

import yaml

from tests.conftest import REPO, TENANTCTL, OwnCatalog, PgFleet, connect_as, run_cli

NARROW = {"COLUMNS": "80"}


def cli(test_fleet: PgFleet, own: OwnCatalog, *args: str
        ) -> subprocess.CompletedProcess[str]:
    proc = run_cli(test_fleet, *args, config=own.config_path, env=NARROW)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def ok(test_fleet: PgFleet, own: OwnCatalog, *args: str) -> str:
    proc = cli(test_fleet, own, *args)
    assert proc.returncode == 0, (args, proc.stderr)
    return proc.stdout


def line_with(text: str, *needles: str) -> str:
    """The one line holding the first needle; it must hold the others too."""
    lines = [x for x in text.splitlines() if needles[0] in x]
    assert len(lines) == 1, text
    assert all(n in lines[0] for n in needles), (needles, text)
    return lines[0]


def formats_agree(test_fleet: PgFleet, own: OwnCatalog, *args: str) -> Any:
    """-o json, --json and -o yaml say the same; --json with another -o is refused."""
    data = json.loads(ok(test_fleet, own, *args, "-o", "json"))
    assert json.loads(ok(test_fleet, own, *args, "--json")) == data
    assert json.loads(ok(test_fleet, own, *args, "--output-format", "JSON")) == data
    assert yaml.safe_load(ok(test_fleet, own, *args, "-o", "yaml")) == data
    refused = cli(test_fleet, own, *args, "--json", "-o", "yaml")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("error: --json and -o yaml disagree")
    return data


def test_empty_lists_and_sections_say_none(test_fleet: PgFleet,
                                           own_catalog: OwnCatalog) -> None:
    own = own_catalog
    assert ok(test_fleet, own, "tenant", "list") == "no tenants\n"
    assert ok(test_fleet, own, "backup", "list") == "no backups\n"
    assert ok(test_fleet, own, "access", "list") == "no support grants\n"
    assert ok(test_fleet, own, "audit", "list", "--action", "nosuch.") == "no audit events\n"
    assert ok(test_fleet, own, "backup", "prune", "--dry-run") == "dry run: nothing to prune\n"
    assert "revisions: none" in ok(test_fleet, own, "migrate", "status")
    shown = ok(test_fleet, own, "retention", "status")
    assert "next deletions: none" in shown and "next purges: none" in shown
    assert formats_agree(test_fleet, own, "tenant", "list") == []
    assert formats_agree(test_fleet, own, "backup", "list") == []
    bad = cli(test_fleet, own, "tenant", "list", "-o", "xml")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "error: -o 'xml': use table, wide, json or yaml\n"


def test_long_values_print_whole_on_one_line_when_piped(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    own = own_catalog
    long = f"{slug}_{'x' * 40}"[:40]  # the longest slug there is
    created = ok(test_fleet, own, "tenant", "create", long, "--region", "eu-central")
    (tenant,) = formats_agree(test_fleet, own, "tenant", "list")
    server, revision = tenant["server"], tenant["revision"]
    # tenant create's result: one line to grep, however long
    line_with(created, f"created tenant {long} in eu-central on {server} "
              f"(revision {revision})")

    listed = ok(test_fleet, own, "tenant", "list")
    line_with(listed, long, server, revision, "active")
    assert "…" not in listed and "eu-central " not in listed  # the region: -o wide only
    wide = ok(test_fleet, own, "tenant", "list", "-o", "wide")
    line_with(wide, long, server, revision, "eu-central ", tenant["created_at"])

    shown = ok(test_fleet, own, "tenant", "show", long)
    assert "False" not in shown and "None" not in shown and "…" not in shown
    rows = [x.strip("│ ").split("│") for x in shown.splitlines() if x.startswith("│")]
    assert all(len(r) == 2 and r[1].strip() not in ("", "-") for r in rows), shown
    assert re.search(r"│ legal_hold\s+│ no\s+│", shown)
    line_with(shown, "│ revision ", revision)
    full = formats_agree(test_fleet, own, "tenant", "show", long)
    assert full["legal_hold"] is False and "hold_until" in full  # JSON keeps every field

    ran = ok(test_fleet, own, "backup", "run", long)
    (backup,) = formats_agree(test_fleet, own, "backup", "list")
    assert isinstance(backup["size"], int) and backup["size"] > 0  # JSON: bytes
    assert "bytes" not in ran and re.search(r"\d (B|KiB|MiB)$", line_with(ran, long))
    row = line_with(ok(test_fleet, own, "backup", "list"), long, "completed")
    assert re.search(r"│ \d+(\.\d)? (B|KiB|MiB) +│", row) and f" {backup['size']} " not in row

    events = formats_agree(test_fleet, own, "audit", "list", "--tenant", long)
    audit = ok(test_fleet, own, "audit", "list", "--tenant", long)
    for e in events:  # every action whole, beside the whole slug
        assert any(e["action"] in x and long in x for x in audit.splitlines()), audit


def test_dash_is_stdout_for_every_output_file(test_fleet: PgFleet, own_catalog: OwnCatalog,
                                              slug: str) -> None:
    own = own_catalog
    own.fleet.provision(slug, "ap-south")
    with connect_as(own.fleet.credentials(slug), autocommit=True) as conn:
        conn.execute("INSERT INTO customers (email, name) SELECT 'c' || i || '@example.com', "
                     "repeat('n', 200) FROM generate_series(1, 10000) AS i")  # > a pipe's buffer
    assert not (REPO / "-").exists()
    proc = cli(test_fleet, own, "tenant", "export", slug, "--format", "sql", "--output", "-")
    assert proc.returncode == 0, proc.stderr
    assert "PostgreSQL database dump" in proc.stdout and "CREATE TABLE" in proc.stdout
    assert proc.stderr.startswith(f"exported {slug} to stdout (")  # the note beside the data
    zipped = subprocess.run([*TENANTCTL, "--config", str(own.config_path), "tenant", "export",
                             slug, "--format", "csv", "--output", "-"],
                            capture_output=True, cwd=REPO, timeout=120)
    assert zipped.returncode == 0, zipped.stderr
    with zipfile.ZipFile(io.BytesIO(zipped.stdout)) as zf:
        assert "customers.csv" in zf.namelist() and zf.testzip() is None
    exports = [e for e in json.loads(ok(test_fleet, own, "audit", "list", "--tenant", slug,
                                        "--action", "tenant.export", "--json"))]
    assert [e["detail"]["output"] for e in exports] == ["-", "-"]
    assert {e["detail"]["size"] for e in exports} == {len(zipped.stdout),
                                                     len(proc.stdout.encode())}

    # the reader goes away early (`| head`): one line on stderr, no traceback
    with subprocess.Popen([*TENANTCTL, "--config", str(own.config_path), "tenant", "export",
                           slug, "--format", "sql", "--output", "-"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, cwd=REPO) as early:
        assert early.stdout is not None and early.stderr is not None
        assert early.stdout.read(10) == b"--\n-- Post"
        early.stdout.close()
        said = early.stderr.read().decode()
    assert early.returncode == 10 and "Traceback" not in said, said
    assert said.startswith("error: cannot write to stdout") and said.count("\n") == 1, said

    both = cli(test_fleet, own, "tenant", "export", slug, "--format", "sql", "--output", "-",
               "--json")
    assert both.returncode == 2 and both.stdout == "" and "--output -" in both.stderr

    page = cli(test_fleet, own, "report", "--html", "-")
    assert page.returncode in (0, 12), page.stderr
    assert page.stdout.startswith("<!DOCTYPE html>") and "PASS  " not in page.stdout

    key = cli(test_fleet, own, "backup", "key", "export", slug, "--output", "-")
    assert key.returncode == 0 and key.stdout.startswith("AGE-SECRET-KEY-1")
    assert not (REPO / "-").exists()
