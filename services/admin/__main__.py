"""gridloop administration CLI.

python -m services.admin topics create     # create every topic of the catalog (idempotent)
python -m services.admin topics list
python -m services.admin topics drop NS... # delete the topics of test or benchmark namespaces (never the town's)
python -m services.admin acls show [--commands]   # each service's Kafka ACLs, made from the topic catalog
python -m services.admin acls apply      # grant them on the broker (SASL + authorizer), drop those no longer due
python -m services.admin init [--acls]   # topics create, then (--acls) acls apply: a deployment's one-shot set-up
python -m services.admin deadletters list      # records no consumer could process, with the reason
python -m services.admin deadletters replay --offset N   # send one again to its source topic after a fix
python -m services.admin tokens issue --role ROLE --subject ID [--expires 30d|never]
python -m services.admin tokens rotate TOKEN_ID [--grace 1h]   # a new secret for the same principal
python -m services.admin tokens list | revoke TOKEN_ID
python -m services.admin town validate DIR   # check a town package (also: gridloop town validate DIR)
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer

from schemas import utcnow
from schemas.topics import CATALOG
from services.admin.deadletters import cli as deadletters_cli
from services.admin.town import cli as town_cli
from services.common.acls import apply_acls, grants, kafka_acls_commands
from services.common.admin import create_topics, drop_namespace, list_topics, partitions_for
from services.common.auth import DEFAULT_LIFETIME, SAME_LIFETIME, AuthToken, Role, TokenStore, parse_span
from services.common.settings import ServiceSettings

cli = typer.Typer(help="gridloop administration", no_args_is_help=True)
topics_cli = typer.Typer(help="Kafka topics of the catalog", no_args_is_help=True)
cli.add_typer(topics_cli, name="topics")
tokens_cli = typer.Typer(
    help="API tokens: issue (shown once, stored hashed), list, rotate, revoke", no_args_is_help=True
)
cli.add_typer(tokens_cli, name="tokens")
cli.add_typer(deadletters_cli, name="deadletters")
cli.add_typer(town_cli, name="town")
acls_cli = typer.Typer(help="Kafka ACLs: each service writes and reads only its own topics", no_args_is_help=True)
cli.add_typer(acls_cli, name="acls")


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
        typer.echo(f"{mark} {t.name:34} p={partitions_for(t)} {t.description}")


@topics_cli.command("drop")
def topics_drop(
    namespaces: Annotated[
        list[str], typer.Argument(help="namespaces whose topics to delete (GRIDLOOP_TOPIC_NAMESPACE)")
    ],
) -> None:
    """Delete the topics of throwaway namespaces (tests', benchmarks') left on the broker."""
    bootstrap = _bootstrap()
    for ns in namespaces:
        try:
            names = drop_namespace(bootstrap, ns)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        typer.echo(f"{ns}: {len(names)} topics deleted")


@acls_cli.command("show")
def acls_show(
    commands: Annotated[
        bool, typer.Option("--commands", help="print them as kafka-acls.sh command lines (--command-config: admin's)")
    ] = False,
) -> None:
    """Every ACL the services need (from the topic catalog's producers and consumers), and no other."""
    wanted = grants()
    lines = kafka_acls_commands(wanted, _bootstrap()) if commands else [str(g) for g in wanted]
    for line in lines:
        typer.echo(line)


@acls_cli.command("apply")
def acls_apply(
    prune: Annotated[
        bool, typer.Option(help="remove the services' ACLs on this namespace that the catalog no longer grants")
    ] = True,
) -> None:
    """Grant each service its ACLs on the broker (run as the administrator, a super user). Idempotent."""
    applied = apply_acls(_bootstrap(), prune=prune)
    for grant in applied.added:
        typer.echo(f"added   {grant}")
    for grant in applied.removed:
        typer.echo(f"removed {grant}")
    typer.echo(f"acls: {len(applied.added)} added, {len(applied.removed)} removed, {len(applied.kept)} in place")


@cli.command("init")
def init(
    acls: Annotated[bool, typer.Option(help="also grant each service its ACLs (a broker with SASL and ACLs)")] = False,
) -> None:
    """A deployment's one-shot Kafka set-up: create the catalog's topics, then (--acls) apply the ACLs."""
    topics_create()
    if acls:
        acls_apply(prune=True)


def _span(text: str) -> timedelta | None:
    try:
        return parse_span(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _show(row: AuthToken, secret: str) -> None:
    typer.echo(
        f"token id {row.token_id}  role {row.role}  subject {row.subject}"
        f"{'  department ' + row.department if row.department else ''}{'  grids ' + row.grids if row.grids else ''}"
        f"  {'expires ' + format(row.expires_at, '%Y-%m-%d %H:%M UTC') if row.expires_at else 'never expires'}"
    )
    typer.echo(secret)


@tokens_cli.command("issue")
def tokens_issue(
    role: Annotated[Role, typer.Option(help="who the token is for")],
    subject: Annotated[
        str, typer.Option(help="the person or system's id: worker id, staff id, application name (≤ 64, ASCII)")
    ],
    department: Annotated[str | None, typer.Option(help="department code (department staff only)")] = None,
    grid: Annotated[list[str] | None, typer.Option(help="grid cell (grid workers; default: the worker's own)")] = None,
    name: Annotated[str, typer.Option(help="a human-readable label")] = "",
    expires: Annotated[
        str,
        typer.Option(help="lifetime: days (30 or 30d), hours (12h), minutes (15m); never: sensors only"),
    ] = f"{DEFAULT_LIFETIME.days}d",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the token")] = False,
) -> None:
    """Issue a token. The secret is printed once; only its hash is stored."""
    try:
        secret, row = TokenStore.from_env().issue(
            role, subject, department=department, grids=tuple(grid or ()), name=name, expires_in=_span(expires)
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if quiet:
        typer.echo(secret)
        return
    _show(row, secret)


@tokens_cli.command("rotate")
def tokens_rotate(
    token_id: str,
    expires: Annotated[
        str | None, typer.Option(help="lifetime of the new token (default: as long as the old one was given)")
    ] = None,
    grace: Annotated[
        str, typer.Option(help="keep the old token this much longer (15m, 1h, 2d) instead of revoking it now")
    ] = "0m",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the new token")] = False,
) -> None:
    """A new secret for the same principal; the old token is revoked (or expires after --grace)."""
    kept = _span(grace)
    if kept is None:
        raise typer.BadParameter("a grace is a span (15m, 1h, 2d), not never")
    try:
        secret, row = TokenStore.from_env().rotate(
            token_id, expires_in=SAME_LIFETIME if expires is None else _span(expires), grace=kept
        )
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    if quiet:
        typer.echo(secret)
        return
    typer.echo(f"replaces {token_id}: {'revoked' if not kept else f'it stops working in {kept}'}")
    _show(row, secret)


@tokens_cli.command("list")
def tokens_list() -> None:
    """Every token issued: id, role, binding, whether revoked or expired and until when (never the secret)."""
    now = utcnow()
    for t in TokenStore.from_env().list():
        binding = t.department or t.grids or "-"
        typer.echo(f"{t.token_id}  {t.role:12} {t.subject:20} {binding:20} {t.state(now)}  {t.name}")


@tokens_cli.command("revoke")
def tokens_revoke(token_id: str) -> None:
    """Revoke a token by its id; it stops working within seconds."""
    if not TokenStore.from_env().revoke(token_id):
        typer.echo(f"no active token {token_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {token_id}")


if __name__ == "__main__":
    cli()
