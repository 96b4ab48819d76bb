"""``python -m services.simulator demo``: run gridloop with a simulation of Gaohang town (behind ``make demo``)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from .demo import (
    DEFAULT_BASE_PORT,
    PORT_OFFSETS,
    Options,
    Tokens,
    plan,
    print_outcome,
    run_demo,
    simulate,
    wide_console,
)

app = typer.Typer(add_completion=False, no_args_is_help=True)

Incidents = Annotated[int, typer.Option(min=1, help="How many reports the town sends.")]
Seed = Annotated[int, typer.Option(help="Seed of the report mix and of everyone's choices.")]
TimeScale = Annotated[float, typer.Option(min=1.0, help="Business hours per real hour (3600: one hour a second).")]
Rate = Annotated[float, typer.Option(min=0.1, help="Reports per second.")]
Timeout = Annotated[float, typer.Option(min=1.0, help="Seconds to wait for every incident to be terminal.")]


@app.callback()
def main() -> None:
    """Simulations of Gaohang town (高行镇) over gridloop's public APIs."""


@app.command()
def demo(
    incidents: Incidents = 300,
    seed: Seed = 7,
    time_scale: TimeScale = 3600.0,
    rate: Rate = 10.0,
    timeout: Timeout = 600.0,
    keep_running: Annotated[bool, typer.Option(help="Leave the services running at the end (Ctrl-C stops).")] = False,
    base_port: Annotated[
        int, typer.Option(help="Port of intake; handling, verification, opscenter and dispatch take the next four.")
    ] = DEFAULT_BASE_PORT,
) -> None:
    """Start every service in a fresh namespace, simulate the town, print a table per department.

    Exits 0 only if every reported incident ended closed, rejected or merged and no service answered a 5xx.
    """
    options = Options(incidents, seed, time_scale, rate, timeout, keep_running, base_port)
    raise typer.Exit(run_demo(options))


@app.command("simulate")
def simulate_running(
    incidents: Incidents = 100,
    seed: Seed = 7,
    time_scale: Annotated[float, typer.Option(min=1.0, help="The running services' GRIDLOOP_TIME_SCALE.")] = 1.0,
    rate: Rate = 5.0,
    timeout: Timeout = 600.0,
    base_port: Annotated[int, typer.Option(help="Port of the running intake (the others follow).")] = DEFAULT_BASE_PORT,
    run_id: Annotated[str, typer.Option(help="Prefix of the client report ids (unique per run).")] = "",
) -> None:
    """Drive services that are already running (``make run``) instead of starting them.

    Tokens for the town's people are issued in the services' token store for the run and revoked after it."""
    from datetime import datetime

    from .actors import Urls, principals

    def url(service: str) -> str:
        return f"http://127.0.0.1:{base_port + PORT_OFFSETS[service]}"

    console = wide_console()
    urls = Urls(
        intake=url("intake"), dispatch=url("dispatch"), handling=url("handling"), verification=url("verification")
    )
    options = Options(incidents, seed, time_scale, rate, timeout, False, base_port)
    run_id = run_id or f"sim{datetime.now():%Y%m%d%H%M%S}"
    tokens = Tokens(principals(plan(options, run_id)), f"simulator {run_id}")
    try:
        outcome = asyncio.run(simulate(urls, options, console, run_id=run_id, tokens=tokens.secrets))
    finally:
        tokens.revoke()
    print_outcome(console, outcome)
    raise typer.Exit(0 if outcome.ok else 1)


if __name__ == "__main__":
    app()
