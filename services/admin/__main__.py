"""gridloop administration CLI.

python -m services.admin topics create     # create every topic of the catalog (idempotent)
python -m services.admin topics list
"""

from __future__ import annotations

import typer

from schemas.topics import CATALOG
from services.common.admin import create_topics, list_topics
from services.common.settings import ServiceSettings

cli = typer.Typer(help="gridloop administration", no_args_is_help=True)
topics_cli = typer.Typer(help="Kafka topics of the catalog", no_args_is_help=True)
cli.add_typer(topics_cli, name="topics")


def _bootstrap() -> str:
    return ServiceSettings().kafka_bootstrap


@topics_cli.command("create")
def topics_create() -> None:
    """Create every topic in the catalog that does not exist yet."""
    created = create_topics(_bootstrap())
    for name in created:
        typer.echo(f"created {name}")
    typer.echo(f"topics: {len(CATALOG)} in catalog, {len(created)} created, {len(CATALOG) - len(created)} existed")


@topics_cli.command("list")
def topics_list() -> None:
    """Show the catalog and whether each topic exists on the broker."""
    existing = list_topics(_bootstrap())
    for t in CATALOG:
        mark = "ok     " if t.name in existing else "MISSING"
        typer.echo(f"{mark} {t.name:34} p={t.partitions} {t.description}")


if __name__ == "__main__":
    cli()
