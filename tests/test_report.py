"""`tenantctl report`: passes on a healthy fleet; each promise fails, naming the
tenant, when the test breaks it."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import func, update

from backups import service as pipeline
from orchestrator.adapters.catalog.models import Tenant
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

    code, data = _report(test_fleet, own, "--html", str(tmp_path / "bad.html"))
    assert code == 12 and not data["ok"]
    assert names["obj"] in _offenders(data, "backups")
    assert names["moved"] in _offenders(data, "region")
    assert names["moved"] in _offenders(data, "backups")  # gone from its own store too
    assert names["public"] in _offenders(data, "isolation")
    assert names["late"] in _offenders(data, "timeliness")
    assert _offenders(data, "audit") == ""
    page = (tmp_path / "bad.html").read_text()
    parser = _Tags()
    parser.feed(page)
    assert parser.tags.count("section") == 5 and "<script" not in page
    assert "FAIL" in page and names["late"] in page
    with psycopg.connect(test_fleet.admin_dsn(t.server), autocommit=True) as conn:
        conn.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(
            sql.Identifier(t.database)))


def test_report_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    from orchestrator.services.report import render_html

    page = tmp_path / "report.html"
    page.write_text(render_html({"generated_at": "2026-11-23T00:00:00+00:00", "ok": False,
                                 "promises": [{"promise": "region", "title": "Region <&>",
                                               "ok": False, "evidence": ["1 store"],
                                               "offenders": ["acme: moved"]}]}))
    assert "Region &lt;&amp;&gt;" in page.read_text()
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser",
                                               "google-chrome", "headless_shell")
                    if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless Chromium on this machine: HTML checked by parsing only")
    shot = tmp_path / "page.png"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           f"--screenshot={shot}", page.as_uri()], capture_output=True,
                          timeout=120)
    assert done.returncode == 0 and shot.stat().st_size > 1000, done.stderr
