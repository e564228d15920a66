"""`tenantctl scheduler …`: the daemon that runs due backups and retention."""

from __future__ import annotations

from typing import Annotated

import typer

from cli import logs
from cli.common import open_fleet
from cli.complete import complete_jobs

scheduler_app = typer.Typer(no_args_is_help=True,
                            help="The scheduler daemon: due backups, retention, pruning, usage.")


@scheduler_app.command("run")
def run(
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve Prometheus metrics on this port (GET /metrics, and GET /healthz: 200 "
        "or 503; 0: any free port, logged in the `started` line).",
        show_default=False)] = None,
    metrics_host: Annotated[str, typer.Option(help="Address the metrics endpoint "
                                              "binds to.")] = "127.0.0.1",
    standby_poll: Annotated[str, typer.Option(
        help="How often a standby tries to take the lead: seconds, or a duration "
        "(500ms, 10s, 1m).")] = "10",
    interval_seconds: Annotated[str | None, typer.Option(
        help="Run every job this often instead of the intervals of the config's "
        "scheduler table (tests, drills): seconds, or a duration (90s, 5m).",
        show_default=False)] = None,
    backup_concurrency: Annotated[int, typer.Option(help="Backups in flight.")] = 2,
    jobs: Annotated[str | None, typer.Option(
        help="Only these jobs: a comma-separated subset of backups,retention,prune,"
        "audit_purge,usage (default: all).", show_default=False,
        autocompletion=complete_jobs)] = None,
) -> None:
    """Run due backups, retention (deletions and purges), backup pruning, the audit
    purge and usage metering on the intervals of the config's scheduler table. Each
    job's last run is kept in the catalog: a restart or a new leader runs at once only
    the jobs that are due. Several instances may run: one leads (a catalog advisory
    lock), the others wait as standbys and take over when it dies. Log lines on
    stdout (JSON and info unless --log-format/--log-level say otherwise); SIGTERM
    stops it cleanly (exit 0)."""
    from datetime import timedelta

    from orchestrator.daemon import jobs as daemon_jobs
    from orchestrator.daemon import jsonlog
    from orchestrator.daemon import metrics as daemon_metrics
    from orchestrator.daemon import scheduler as sch
    from orchestrator.domain.durations import parse_seconds
    from orchestrator.domain.errors import InvalidInput

    poll = parse_seconds(standby_poll, "standby_poll", at_most=timedelta(seconds=60))
    every = parse_seconds(interval_seconds, "interval_seconds") \
        if interval_seconds is not None else None
    if backup_concurrency < 1:
        raise InvalidInput("--backup-concurrency must be at least 1")
    if metrics_port is not None and not 0 <= metrics_port <= 65535:
        raise InvalidInput("--metrics-port must be between 0 and 65535")
    selected = daemon_jobs.parse_jobs(jobs)

    fleet = open_fleet()
    server = None
    try:
        options = sch.SchedulerOptions(
            intervals=daemon_jobs.job_intervals(fleet.cfg.scheduler, every, selected),
            standby_poll=poll, heartbeat=min(2.0, poll),
            backup_concurrency=backup_concurrency)
        # the daemon's lines are its output: stdout, info and json unless told otherwise
        log = jsonlog.JsonLog(level=logs.level_or("info"), fmt=logs.format_or("json"),
                              instance=sch.instance_name())
        # /healthz: the loop ticks every 0.2 s, but a standby's try for the lock may
        # wait out a connect timeout; the catalog gauges are re-read every 15 s
        metrics = daemon_metrics.Metrics(selected, loop_max=max(60.0, 3 * poll),
                                         refresh_max=max(60.0, 4 * options.metrics_refresh))
        if metrics_port is not None:
            server = daemon_metrics.MetricsServer(metrics_host, metrics_port, metrics.render,
                                                  metrics.health)
        daemon = sch.SchedulerDaemon(fleet, options, log, metrics, server)
        daemon.install_signal_handlers()
        daemon.run()
    finally:
        if server is not None:
            server.stop()
        fleet.close()
