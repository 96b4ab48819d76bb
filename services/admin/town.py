"""``gridloop town validate DIR``: check a town package and say everything wrong with it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from schemas.towns import load_town, validate

cli = typer.Typer(help="town packages: grids, departments, categories, routing, roster, calendar", no_args_is_help=True)


@cli.command("validate")
def town_validate(
    folder: Annotated[Path, typer.Argument(help="the package's folder, e.g. towns/gaohang")],
) -> None:
    """Report every problem of the package, each with its file, feature index or line; exit 1 if there is one."""
    problems = validate(folder)
    for problem in problems:
        typer.echo(str(problem), err=True)
    if problems:
        typer.echo(f"{folder}: {len(problems)} problem(s)", err=True)
        raise typer.Exit(1)
    town = load_town(folder)
    workers = sum(len(g.workers) for g in town.grids.values())
    typer.echo(
        f"{folder}: {town.code} version {town.version} is valid: {len(town.grids)} grid cells, "
        f"{len(town.departments)} departments, {len(town.categories)} categories, {len(town.routing)} routing "
        f"rules, {len(town.roster)} people on the roster ({workers} grid workers), {len(town.layers)} map layers"
    )
