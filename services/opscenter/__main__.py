"""``python -m services.opscenter`` runs the service; ``python -m services.opscenter rebuild …`` rebuilds."""

from __future__ import annotations

import sys
from datetime import date, datetime
from typing import Annotated

import typer


def _rebuild_cli() -> None:
    cli = typer.Typer(add_completion=False)

    @cli.command()
    def rebuild(
        database_url: Annotated[str, typer.Option(help="where to build the read model (dropped first)")],
        period: Annotated[str, typer.Option()] = "day",
        at: Annotated[str, typer.Option(help="a date in the period (YYYY-MM-DD); default today")] = "",
        by: Annotated[str, typer.Option()] = "department",
        now: Annotated[str, typer.Option(help="ISO time the snapshot figures are taken at; default now")] = "",
    ) -> None:
        """Fold the lifecycle log from offset 0 and print the KPIs as JSON."""
        from schemas import utcnow

        from .kpis import Dimension, Period
        from .rebuild import rebuild as run
        from .rebuild import report
        from .settings import OpsCenterSettings

        settings = OpsCenterSettings()
        applied = run(settings.kafka_bootstrap, database_url, security=settings.kafka_client_options())
        moment = datetime.fromisoformat(now) if now else utcnow()
        day = date.fromisoformat(at) if at else moment.date()
        typer.echo(f"applied {applied} events", err=True)
        typer.echo(report(database_url, Period(period), day, Dimension(by), moment).model_dump_json())

    cli(sys.argv[2:], prog_name="python -m services.opscenter rebuild")


if len(sys.argv) > 1 and sys.argv[1] == "rebuild":
    _rebuild_cli()
else:
    from .app import build

    build().run()
