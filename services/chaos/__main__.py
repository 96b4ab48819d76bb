"""``python -m services.chaos run``: kill services and the broker under load; audit (behind ``make chaos``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .runner import DEFAULT_BASE_PORT, DEFAULT_KAFKA_PORT, Options, run_chaos

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.callback()
def main() -> None:
    """Chaos runs of gridloop: SIGKILL services and the broker under load, then audit the loop."""


@app.command()
def run(
    ctx: typer.Context,
    incidents: Annotated[int, typer.Option(min=1, help="Reports to send through the loop.")] = 2000,
    max_incidents: Annotated[
        int, typer.Option("--max", min=1, help="The most incidents a run may be asked for.")
    ] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of the report mix and of every department's choices.")] = 1,
    pairs: Annotated[
        bool, typer.Option("--pairs/--no-pairs", help="Two instances of every service in one consumer group.")
    ] = True,
    kills_per_service: Annotated[int, typer.Option("--kills", min=1, help="SIGKILLs of each service.")] = 3,
    broker_kills: Annotated[int, typer.Option(min=0, help="SIGKILLs of the broker.")] = 1,
    together: Annotated[
        bool,
        typer.Option(
            "--together/--one-by-one",
            help="Kill one instance of every service at once in each round, or one service at a time.",
        ),
    ] = False,
    first_kill_at: Annotated[
        float, typer.Option(min=0.2, max=1.0, help="Progress (share of incidents ended) of the first round of kills.")
    ] = 0.2,
    last_kill_at: Annotated[float, typer.Option(min=0.2, max=1.0, help="Progress of the last round of kills.")] = 0.8,
    base_port: Annotated[
        int, typer.Option(help="HTTP port of the first instance; the others take the next 9 (or 4 without pairs).")
    ] = DEFAULT_BASE_PORT,
    kafka_port: Annotated[
        int, typer.Option(help="Client port of the run's own broker (the controller takes the next one).")
    ] = DEFAULT_KAFKA_PORT,
    var_dir: Annotated[
        Path | None, typer.Option(help="Where the run keeps its broker, databases and logs (emptied first).")
    ] = None,
    time_scale: Annotated[
        float, typer.Option(min=1.0, help="Business hours per real hour (3600: 1 h a second).")
    ] = 3600.0,
    session_timeout_s: Annotated[
        float,
        typer.Option(
            "--session-timeout", min=6.0, help="Seconds before a killed consumer leaves its group (faust session)."
        ),
    ] = 10.0,
    broker_down_s: Annotated[
        float,
        typer.Option("--broker-down", min=0.0, help="Seconds the killed broker stays down before it is restarted."),
    ] = 3.0,
    recovery_timeout_s: Annotated[
        float, typer.Option("--recovery-timeout", min=10.0, help="Seconds a restart gets to recover.")
    ] = 240.0,
    drain_timeout_s: Annotated[
        float, typer.Option("--drain-timeout", min=10.0, help="Seconds to wait for every incident to end.")
    ] = 900.0,
) -> None:
    """Start a broker and every service of its own, drive the load, kill, drain, audit.

    The last line printed is JSON: incidents, terminal, lost, duplicate_transitions, kills, max_recovery_s.
    Exits 1 if an incident was lost, a transition duplicated, a service's state disagrees with the log or a
    restart did not recover.
    """
    if incidents > max_incidents:
        raise typer.BadParameter(f"--incidents {incidents} is more than --max {max_incidents}")
    # every other option is a field of the run's Options, by the same name
    chosen = {name: value for name, value in ctx.params.items() if name != "max_incidents"}
    if var_dir is None:
        del chosen["var_dir"]  # the run's own default
    chosen["last_kill_at"] = max(first_kill_at, last_kill_at)
    options = Options(**chosen)
    result, line = run_chaos(options, sys.stdout)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    raise typer.Exit(0 if result is not None and result.ok else 1)


if __name__ == "__main__":
    app()
