"""`tenantctl report`: passes on a healthy fleet; each promise fails, naming the
tenant, when the test breaks it. The promises themselves are judged over plain
data (domain/promises.py), checked at the end of this file without a database."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from importlib import metadata
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import func, update

from backups import service as pipeline
from orchestrator.adapters.catalog.models import Tenant
from orchestrator.adapters.postgres import fleet_identity
from orchestrator.domain import promises
from orchestrator.domain.health import BackupRow, StoreFacts, TenantRow
from orchestrator.domain.promises import GrantRow
from tests.conftest import OwnCatalog, PgFleet, run_cli


def _report(test_fleet: PgFleet, own: OwnCatalog, *extra: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    proc = run_cli(test_fleet, "report", "--json", *extra, config=own.config_path)
    assert proc.returncode in (0, 12), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _offenders(data: dict, key: str) -> str:  # type: ignore[type-arg]
    (p,) = [p for p in data["promises"] if p["promise"] == key]
    return "\n".join(p["offenders"])


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)


def test_report_passes_then_names_each_broken_promise(test_fleet: PgFleet,
                                                      own_catalog: OwnCatalog, slug: str,
                                                      tmp_path: Path) -> None:
    own = own_catalog
    names = {k: f"{slug}_{k}" for k in ("obj", "moved", "public", "late")}
    for k, s in names.items():
        own.fleet.provision(s, "eu-central" if k == "moved" else "ap-south")
        if k != "late":
            pipeline.run_backup(own.fleet, s)
    own.fleet.credentials(names["obj"])  # the live probe needs a password
    # the fleet id the report names: the servers' own, as `catalog upgrade` adopts it
    marks = [m for m in fleet_identity.server_marks(own.fleet.cfg).values()
             if isinstance(m, str)]
    fleet_id = own.fleet.catalog.adopt_fleet_id(marks[0] if marks else "0123456789abcdef")
    code, data = _report(test_fleet, own, "--html", str(tmp_path / "ok.html"))
    assert code == 0 and data["ok"], json.dumps(data, indent=1)
    assert {p["promise"] for p in data["promises"]} == {
        "isolation", "region", "backups", "timeliness", "audit"}

    # break one promise per tenant
    obj = pipeline.latest_backup(own.fleet, names["obj"])
    eu_root = Path(own.fleet.cfg.region("eu-central").backup_store.removeprefix("file://"))
    ap_root = Path(own.fleet.cfg.region("ap-south").backup_store.removeprefix("file://"))
    (ap_root / obj.object_key).unlink()
    moved = pipeline.latest_backup(own.fleet, names["moved"])
    target = ap_root / moved.object_key
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(eu_root / moved.object_key), target)
    t = own.fleet.get_tenant(names["public"])
    with psycopg.connect(test_fleet.admin_dsn(t.server), autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO PUBLIC").format(
            sql.Identifier(t.database)))
    run_cli(test_fleet, "tenant", "cancel", names["late"], "--yes", config=own.config_path)
    with own.fleet.catalog.session() as s, s.begin():
        s.execute(update(Tenant).where(Tenant.slug == names["late"])
                  .values(hold_until=func.now() - timedelta(days=2)))

    proc = run_cli(test_fleet, "report", "--json", "--html", str(tmp_path / "bad.html"),
                   config=own.config_path)
    code, data = proc.returncode, json.loads(proc.stdout)
    assert code == 12 and not data["ok"]
    assert names["obj"] in _offenders(data, "backups")
    assert names["moved"] in _offenders(data, "region")
    assert names["moved"] in _offenders(data, "backups")  # gone from its own store too
    assert names["public"] in _offenders(data, "isolation")
    assert names["late"] in _offenders(data, "timeliness")
    assert _offenders(data, "audit") == ""
    assert re.fullmatch(r"1/5 promises kept; broken: isolation \(\d offenders?\), region "
                        r"\(\d offenders?\), backups \(\d offenders?\), timeliness "
                        r"\(1 offender\)", data["summary"]), data["summary"]
    catalog = conninfo_to_dict(own.fleet.cfg.catalog_dsn)
    assert data["fleet"]["catalog"].endswith(f":{catalog.get('port', 5432)}/"
                                             f"{catalog['dbname']}")
    assert data["fleet"]["fleet_id"] == fleet_id
    assert data["tenantctl_version"] == metadata.version("tenantctl")
    datetime.fromisoformat(data["generated_at"])  # whole seconds, with its zone
    assert "." not in data["generated_at"] and data["generated_at"].endswith("+00:00")

    # each offender's remedy is doctor's for the same finding
    (late,) = [f for p in data["promises"] for f in p["failures"]
               if f["subject"] == names["late"] and p["promise"] == "timeliness"]
    doctor = run_cli(test_fleet, "doctor", "--json", config=own.config_path)
    (finding,) = [x for x in json.loads(doctor.stdout)["findings"]
                  if x["subject"] == names["late"] and x["code"] == late["code"]]
    assert late["code"] == "deletion-overdue" and late["remedy"] == finding["remedy"]
    reach = [f for p in data["promises"] for f in p["failures"]
             if f["problem"] == f"its role may connect to tenant_{names['public']} (PUBLIC may)"]
    assert reach and all(f["code"] == "public-connect" for f in reach)

    page = (tmp_path / "bad.html").read_text()
    parser = _Tags()
    parser.feed(page)
    scripts, body = _embedded(page)
    assert parser.tags.count("section") == 5 and scripts == 1
    assert json.loads(body) == data  # the page carries what --json printed
    assert "FAIL" in page and names["late"] in page and html.escape(data["summary"]) in page
    assert html.escape(late["remedy"]) in page

    # the terminal: the summary first, which fleet, a remedy under each offender
    # (wide: wrapping of piped lines is cli/output.py's concern, not the report's)
    text = run_cli(test_fleet, "report", config=own.config_path, env={"COLUMNS": "500"})
    assert text.returncode == 12, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith("1/5 promises kept; broken: isolation (")
    assert lines[1].startswith(f"fleet {fleet_id}, catalog "
                               f"{data['fleet']['catalog']}, tenantctl ")
    assert f"    ! {names['late']}: hold ended " in text.stdout
    assert f"      remedy: {late['remedy']}" in text.stdout
    # the catalog's password (in its passfile: a DSN may not hold one) is nowhere
    passfile = catalog.get("passfile")
    secrets = [line.rsplit(":", 1)[1] for line in Path(passfile).read_text().splitlines()
               if line.strip()] if passfile else []
    for out in (proc.stdout, proc.stderr, page, text.stdout, text.stderr):
        assert "passfile" not in out and not any(pw in out for pw in secrets)
    with psycopg.connect(test_fleet.admin_dsn(t.server), autocommit=True) as conn:
        conn.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(
            sql.Identifier(t.database)))


# a string a tenant's data could carry into the report (an object key in a store, a
# server's error): it must neither end the JSON's <script> element nor be read as markup
HOSTILE = '</script><script>alert(1)</script><!--<img src=x onerror=alert(2)>&amp;"'


def _hostile_report() -> dict:  # type: ignore[type-arg]
    """A report as build() assembles it, with HOSTILE where tenants' data goes."""
    from orchestrator.services.report import assemble

    alpha = _tenant(1, "alpha")
    stores = {"eu": StoreFacts("eu", "file:///eu", keys=set()),
              "ap": StoreFacts("ap", "file:///ap", keys={f"tenants/alpha/{HOSTILE}"}),
              "us": StoreFacts("us", "s3://us", error=HOSTILE)}
    region, _listed = promises.check_region([alpha], [], {"s1": "eu"}, stores)
    timeliness = promises.check_timeliness([alpha], [], NOW)
    return assemble([region, timeliness], NOW, {"catalog": "tenantctl@db.example:5432/catalog",
                                                "fleet_id": "f00d"}, "9.9.9")


def _embedded(page: str) -> tuple[int, str]:
    """(how many <script> elements, the text of the report's data block)."""
    parser = _Tags()
    parser.feed(page)
    start = page.index('<script type="application/json" id="tenantctl-report">')
    body = page[page.index(">", start) + 1:page.index("</script>", start)]
    return parser.tags.count("script"), body


def test_report_html_escapes_tenants_data_and_embeds_the_json_intact() -> None:
    from orchestrator.services.report import render_html

    data = _hostile_report()
    page = render_html(data)
    scripts, body = _embedded(page)
    assert scripts == 1 and json.loads(body) == data
    assert "</" not in body and "<!--" not in body
    assert HOSTILE not in page  # only escaped: as text in the page, as \u003c in the JSON
    assert "store of us</td><td>&lt;/script&gt;&lt;script&gt;alert(1)" in page
    assert data["summary"] == "1/2 promises kept; broken: region (2 offenders)"
    assert f'class="summary fail">{data["summary"]}</p>' in page
    assert "<dd>2026-11-23 12:00 UTC</dd>" in page and "<dd>9.9.9</dd>" in page
    assert "<code>check the store and its credentials</code>" in page


def _chromium() -> str:
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser",
                                               "google-chrome", "headless_shell")
                    if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless Chromium on this machine: HTML checked by parsing only")
    return browser


def _headless(browser: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_report_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    """The page renders, its summary line is on it, and the browser's own parsers read
    the embedded JSON back whole, hostile strings included, with no script run."""
    from orchestrator.services.report import render_html

    data = _hostile_report()
    page = tmp_path / "report.html"
    page.write_text(render_html(data))
    browser = _chromium()
    shot = tmp_path / "page.png"
    _headless(browser, f"--screenshot={shot}", page.as_uri())
    assert shot.stat().st_size > 1000
    dom = _headless(browser, "--dump-dom", page.as_uri()).stdout
    assert f'<p id="summary" class="summary fail">{data["summary"]}</p>' in dom

    # the report inside a frame of a page whose script (the report runs none) reads it
    # as a reader of the JSON would: getElementById(...).textContent, JSON.parse
    harness = tmp_path / "harness.html"
    harness.write_text(
        "<!DOCTYPE html><html><body><pre id=\"out\">not loaded</pre><script>"
        "function check(frame) { var d = frame.contentDocument, out = "
        "document.getElementById('out'); try { out.textContent = JSON.stringify({"
        "data: JSON.parse(d.getElementById('tenantctl-report').textContent), "
        "summary: d.getElementById('summary').textContent, scripts: d.scripts.length, "
        "images: d.images.length}); } catch (e) { out.textContent = 'error ' + e; } }"
        f"</script><iframe onload=\"check(this)\" srcdoc=\"{html.escape(page.read_text())}\">"
        "</iframe></body></html>")
    dom = _headless(browser, "--dump-dom", "--virtual-time-budget=10000",
                    harness.as_uri()).stdout
    out = html.unescape(re.search(r'<pre id="out">(.*?)</pre>', dom, re.S).group(1))  # type: ignore[union-attr]
    seen = json.loads(out)
    assert seen == {"data": data, "summary": data["summary"], "scripts": 1, "images": 0}


# -- the promises are judged over plain data: no Postgres below ----------------------------

NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)


def _tenant(i: int, slug: str, *, state: str = "active", region: str = "eu",
            server: str = "s1", **kw: object) -> TenantRow:
    base = dict(id=i, slug=slug, region=region, server=server, database=f"tenant_{slug}",
                login_role=f"tenant_{slug}", owner_role=f"owner_{slug}", state=state,
                revision="r1", migration_error=None, legal_hold=False, legal_hold_reason=None,
                hold_until=None, purge_after=None, activated_at=NOW - timedelta(days=30),
                created_at=NOW - timedelta(days=30))
    base.update(kw)
    return TenantRow(**base)  # type: ignore[arg-type]


def _backup(i: int, t: TenantRow, *, age: timedelta, store: str = "file:///eu",
            key_id: str | None = "k1") -> BackupRow:
    return BackupRow(i, t.id, t.slug, t.region, f"tenants/{t.slug}/{i}.dump.age",
                     f"tenants/{t.slug}/{i}.manifest.json", "completed", NOW - age,
                     NOW - age, key_id=key_id, store_url=store)


def test_timeliness_exempts_legal_holds_and_allows_an_hour_of_grace() -> None:
    tenants = [
        _tenant(1, "late", state="cancelled", hold_until=NOW - timedelta(hours=2)),
        _tenant(2, "fresh", state="cancelled", hold_until=NOW - timedelta(minutes=10)),
        _tenant(3, "held", state="cancelled", hold_until=NOW - timedelta(days=9),
                legal_hold=True, legal_hold_reason="court"),
        _tenant(4, "unpurged", state="deleted", purge_after=NOW - timedelta(hours=3)),
    ]
    grants = [GrantRow(7, "held", NOW - timedelta(hours=2), None),
              GrantRow(8, "late", NOW - timedelta(hours=2), NOW - timedelta(hours=1))]
    p = promises.check_timeliness(tenants, grants, NOW)
    assert not p.ok
    assert [line.split(":")[0] for line in p.offenders] == ["held", "late", "unpurged"]
    assert "support grant 7 past its TTL" in p.offenders[0]
    assert p.evidence == ["3 tenants in hold", "1 deleted tenant awaiting purge",
                          "1 live support grant", "1 tenant under legal hold (exempt)"]


def test_region_names_data_outside_its_region_and_a_store_that_cannot_be_listed() -> None:
    a, b = _tenant(1, "alpha"), _tenant(2, "bravo", region="ap", server="s1")
    stores = {"eu": StoreFacts("eu", "file:///eu",
                               keys={"tenants/alpha/1.dump.age", "tenants/bravo/2.dump.age"}),
              "ap": StoreFacts("ap", "file:///ap", error="connection refused")}
    backups = [_backup(1, a, age=timedelta(hours=1), store="file:///elsewhere")]
    p, listed = promises.check_region([a, b], backups, {"s1": "eu"}, stores)
    assert listed == {"eu": stores["eu"].keys, "ap": set()}
    assert p.offenders == ["alpha: backup 1 recorded outside its region's store",
                           "bravo: backup object tenants/bravo/2.dump.age in the eu store, "
                           "not ap", "store of ap: connection refused"]
    assert "2 objects listed in 2 region stores" in p.evidence


def test_backups_overdue_missing_from_the_store_or_not_encrypted() -> None:
    ok, late, gone, plain = (_tenant(i, s) for i, s in
                             enumerate(("okay", "late", "gone", "plain"), 1))
    backups = [_backup(1, ok, age=timedelta(hours=2)), _backup(2, late, age=timedelta(hours=26)),
               _backup(3, gone, age=timedelta(hours=2)),
               _backup(4, plain, age=timedelta(hours=2), key_id=None)]
    listed = {"eu": {k for b in backups if b.id != 3 for k in (b.object_key, b.manifest_key)}}
    p = promises.check_backups([ok, late, gone, plain], backups, listed, NOW, 24)
    assert p.offenders == [
        "gone: latest backup 3: object or manifest missing from the store",
        "late: latest backup 2 is 26.0 h old",
        "plain: latest backup 4 is not encrypted to a tenant key"]
    assert "age of the oldest latest backup: 26.0 h" in p.evidence


def test_isolation_judges_what_each_server_said_and_what_the_probe_found() -> None:
    pub, strong, lost, reach = (_tenant(i, s) for i, s in
                                enumerate(("pub", "strong", "lost", "reach"), 1))
    other = _tenant(5, "other", server="s2")
    seen = [promises.ServerIsolation(
                "s1", databases={"tenant_pub": True, "tenant_strong": False,
                                 "tenant_reach": False, "postgres": False},
                roles={"tenant_pub": (False,) * 4, "tenant_strong": (False, True, False, False),
                       "tenant_reach": (False,) * 4},
                reaches=[("tenant_reach", "postgres")],
                probe=promises.Probe("pub", 3)),
            promises.ServerIsolation("s2", error="cannot connect")]
    p = promises.check_isolation([pub, strong, lost, reach, other], seen)
    assert p.offenders == ["lost: database tenant_lost missing on s1",
                           "pub: PUBLIC may connect to its database",
                           "reach: its role may connect to postgres",
                           "server s2: cannot connect",
                           "strong: its role has CREATEDB"]
    assert p.evidence[:2] == ["5 live tenants on 2 servers",
                              "12 role/database pairs checked in the catalogs of the servers"]
    clean = promises.check_isolation([reach], [promises.ServerIsolation(
        "s1", databases={"tenant_reach": False, "postgres": False},
        roles={"tenant_reach": (False,) * 4}, reaches=[],
        probe=promises.Probe("reach", 1))])
    assert clean.ok and clean.evidence[2] == \
        "1 live connection attempt to other databases, refused"
    probed = promises.check_isolation([reach], [promises.ServerIsolation(
        "s1", databases={"tenant_reach": False}, roles={"tenant_reach": (False,) * 4},
        reaches=[], probe=promises.Probe("reach", 0, "live probe: its role connected to x"))])
    assert probed.offenders == ["reach: live probe: its role connected to x"]


def test_audit_wants_a_record_per_state_and_nothing_past_its_age() -> None:
    tenants = [_tenant(1, "seen"), _tenant(2, "unseen", state="suspended"),
               _tenant(3, "erased", state="deleted")]
    seen: set[tuple[str | None, str]] = {("seen", "tenant.provision.start"),
                                         ("unseen", "tenant.provision.start"),
                                         ("erased", "tenant.erase.key_destroyed")}
    p = promises.check_audit(tenants, seen, NOW - timedelta(days=400), 9, 365, NOW)
    assert p.offenders == [f"audit log: records from {(NOW - timedelta(days=400)).date()} "
                           "kept past 365 days",
                           "unseen: suspended, but no tenant.suspend in the audit log"]
    assert promises.check_audit(tenants[:1], seen, NOW - timedelta(days=365), 9, 365, NOW).ok
