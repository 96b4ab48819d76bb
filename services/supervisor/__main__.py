"""``python -m services.supervisor``: run every gridloop service in the foreground (``make run``).

python -m services.supervisor                      # all of them; Ctrl-C stops them
python -m services.supervisor --without handling   # all but one
python -m services.supervisor --only intake --only dispatch
"""

from __future__ import annotations

from typing import Annotated

import typer

from . import SERVICES, ServiceFailed, run_foreground, select_services

cli = typer.Typer(add_completion=False, help="Run every gridloop service in the foreground.")
_NAMES = ", ".join(s.name for s in SERVICES)


@cli.command()
def run(
    only: Annotated[
        list[str] | None, typer.Option("--only", metavar="NAME", help=f"Run just this service ({_NAMES}).")
    ] = None,
    without: Annotated[
        list[str] | None, typer.Option("--without", metavar="NAME", help="Do not run this service.")
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, metavar="SECONDS", help="Seconds the services get to answer /health.")
    ] = 150.0,
) -> None:
    """Start the services, print each API's address once it answers, stop them all on Ctrl-C or SIGTERM.

    Exits non-zero if a service dies or they are not all up within --timeout.
    """
    try:
        services = select_services(only, without or ())
        code = run_foreground(services, timeout)
    except ServiceFailed as exc:
        typer.echo(f"supervisor: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


if __name__ == "__main__":
    cli()
