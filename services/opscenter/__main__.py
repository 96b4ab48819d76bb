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
        database_url: Annotated[str, typer.Option(help="where to build the read model")],
        fresh: Annotated[
            bool, typer.Option(help="drop what the target holds and start from offset 0 (else it is resumed)")
        ] = False,
        topic: Annotated[str, typer.Option(help="the log to fold; default: the namespace's lifecycle log")] = "",
        workers: Annotated[int, typer.Option(min=0, help="worker processes; 0: one per partition, per CPU")] = 0,
        batch: Annotated[int, typer.Option(min=1, max=100_000, help="records per transaction")] = 10_000,
        follow: Annotated[bool, typer.Option(help="keep folding what comes (Ctrl-C stops, resumably)")] = False,
        swap: Annotated[
            str, typer.Option(help="the running opscenter (http://host:port) to swap the model into once caught up")
        ] = "",
        token: Annotated[
            str, typer.Option(envvar="GRIDLOOP_ADMIN_TOKEN", help="an administrator's token for --swap")
        ] = "",
        hold_s: Annotated[
            float, typer.Option(min=1, max=600, help="how long the service may hold its fold for the swap")
        ] = 60.0,
        stop_after: Annotated[int, typer.Option(min=0, help="stop (resumably) after this many records")] = 0,
        quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
        period: Annotated[str, typer.Option()] = "day",
        at: Annotated[str, typer.Option(help="a day in the period (YYYY-MM-DD); default the town's today")] = "",
        by: Annotated[str, typer.Option()] = "department",
        now: Annotated[str, typer.Option(help="ISO time the snapshot figures are taken at; default now")] = "",
    ) -> None:
        """Fold the lifecycle log into a read model (resuming what the target holds), then print its KPIs as
        JSON. With --follow --swap, swap it into the running service once it has caught up."""
        import logging

        from schemas import utcnow
        from schemas.reference import GAOHANG

        from .kpis import Dimension, Period
        from .rebuild import Options, RebuildError, SwapTarget, report, run
        from .settings import OpsCenterSettings

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        if swap and not token:
            raise typer.BadParameter("--swap needs an administrator's token (--token or GRIDLOOP_ADMIN_TOKEN)")
        settings = OpsCenterSettings()
        options = Options(
            topic=topic,
            fresh=fresh,
            workers=workers,
            batch=batch,
            follow=follow or bool(swap),
            stop_after=stop_after,
            progress=not quiet,
        )
        target = SwapTarget(swap.rstrip("/"), token, hold_s) if swap else None
        try:
            outcome = run(
                settings.kafka_bootstrap,
                database_url,
                security=settings.kafka_client_options(),
                options=options,
                swap=target,
            )
        except RebuildError as exc:
            typer.echo(f"rebuild: {exc}", err=True)
            raise typer.Exit(2) from None
        resumed = f" (resumed from {outcome.started_at})" if outcome.resumed else ""
        typer.echo(
            f"applied {outcome.applied} events, {outcome.skipped} set aside, in {outcome.seconds:.1f} s: "
            f"{outcome.rate:,.0f} events/s{resumed}; peak RSS {outcome.peak_rss_mb:.0f} MB",
            err=True,
        )
        if outcome.stopped:
            typer.echo(f"stopped at {outcome.positions}: run it again to resume", err=True)
        if outcome.swapped is not None:
            typer.echo(f"swapped in: {outcome.swapped}", err=True)
        moment = datetime.fromisoformat(now) if now else utcnow()
        day = date.fromisoformat(at) if at else GAOHANG.local_day(moment)
        typer.echo(report(database_url, Period(period), day, Dimension(by), moment).model_dump_json())

    cli(sys.argv[2:], prog_name="python -m services.opscenter rebuild")


if len(sys.argv) > 1 and sys.argv[1] == "rebuild":
    _rebuild_cli()
else:
    from .app import build

    build().run()
