"""``python -m services.bench run`` (behind ``make bench``), ``python -m services.bench soak`` (``make soak``) and
``python -m services.bench read`` (``make bench-read``).

The last line printed is the result as one JSON object; everything before it is for people.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer
from rich.console import Console

from . import stats
from .harness import DEFAULT_BASE_PORT, DEFAULT_RATES, Bench, Options, Soak
from .read import DEFAULT_BASE_PORT as READ_BASE_PORT
from .read import ReadBench, ReadOptions

app = typer.Typer(add_completion=False, no_args_is_help=True)

BasePort = Annotated[
    int,
    typer.Option(help="intake listens on base+1, handling +2, verification +3, opscenter +4, dispatch +5."),
]
Bootstrap = Annotated[str, typer.Option(envvar="GRIDLOOP_KAFKA_BOOTSTRAP", help="Kafka bootstrap servers.")]
Profile = Annotated[
    list[str] | None,
    typer.Option(help="Run this service under pyinstrument (repeatable); the HTML report lands in the run dir."),
]
PollS = Annotated[
    float, typer.Option(min=0.01, help="How often department desks and grid workers poll a queue that has work.")
]
IdlePollS = Annotated[
    float, typer.Option(min=0.01, help="How often at most they poll once their queue was empty (backing off).")
]
LongPollS = Annotated[
    float,
    typer.Option(
        min=0.0, max=30.0, help="How long the API holds an empty queue's answer until work comes (0: poll instead)."
    ),
]
BatchActions = Annotated[
    bool,
    typer.Option(
        help="Desks and grid workers act on all they found in one request (批量签收/处置/核查), or one at a time."
    ),
]
KeepDb = Annotated[bool, typer.Option(help="Keep the services' SQLite databases of the run.")]
KeepTopics = Annotated[bool, typer.Option(help="Keep the run's topics on the broker (deleted after the run).")]


@dataclass(frozen=True)
class Loop:
    """The options ``run`` and ``soak`` share: how desks and grid workers work, where the services and the broker
    are, what is profiled and kept."""

    poll_s: PollS = 0.2
    idle_poll_s: IdlePollS = 1.0
    long_poll_s: LongPollS = 10.0
    batch_actions: BatchActions = True
    base_port: BasePort = DEFAULT_BASE_PORT
    bootstrap: Bootstrap = "127.0.0.1:9092"
    profile: Profile = None
    keep_db: KeepDb = False
    keep_topics: KeepTopics = False

    def options(self, **rest: Any) -> Options:
        """The run's :class:`Options`: these and ``rest``."""
        values: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        return Options(**values | {"profile": tuple(self.profile or ())}, **rest)


def with_options(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with the fields of each of its option groups (a parameter typed as a dataclass: :class:`Loop`,
    :class:`Reading`) in place of that parameter (typer reads them from the signature); it is called with each
    group's fields gathered into one value."""
    signature = inspect.signature(command, eval_str=True)
    groups: dict[str, type[Any]] = {
        name: param.annotation
        for name, param in signature.parameters.items()
        if isinstance(param.annotation, type) and is_dataclass(param.annotation)
    }
    keyword = inspect.Parameter.KEYWORD_ONLY
    params: list[inspect.Parameter] = []
    for param in signature.parameters.values():
        if group := groups.get(param.name):
            hints = get_type_hints(group, include_extras=True)
            params += [
                inspect.Parameter(f.name, keyword, default=f.default, annotation=hints[f.name]) for f in fields(group)
            ]
        else:
            params.append(param.replace(kind=keyword))

    @functools.wraps(command)
    def gathered(**kwargs: Any) -> None:
        for name, group in groups.items():
            kwargs[name] = group(**{f.name: kwargs.pop(f.name) for f in fields(group)})
        command(**kwargs)

    gathered.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return gathered


def _rates(text: str) -> tuple[float, ...]:
    rates = tuple(sorted({float(r) for r in text.replace(" ", "").split(",") if r}))
    if not rates or rates[0] <= 0:
        raise typer.BadParameter("a comma-separated list of positive incidents/s")
    return rates


def stop_on_sigterm() -> None:
    """SIGTERM stops a run as Ctrl-C does (KeyboardInterrupt), so it still stops the services it started and
    deletes its topics; Python's default for SIGTERM ends the process at once and leaves the services running."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@app.callback()
def main() -> None:
    """gridloop's benchmark: the raw Kafka limit, the closed loop's sustained rate, latency and resources; and the
    read side on months of history."""
    stop_on_sigterm()


@app.command()
@with_options
def run(
    rates: Annotated[str, typer.Option(help="Offered rates to climb (incidents/s), comma-separated.")] = ",".join(
        f"{r:g}" for r in DEFAULT_RATES
    ),
    step_s: Annotated[float, typer.Option(min=1.0, help="Seconds per step.")] = 60.0,
    refine: Annotated[int, typer.Option(min=0, help="Bisections past the last sustained rate.")] = 3,
    raw_s: Annotated[float, typer.Option(min=0.0, help="Seconds of the raw Kafka measurement (0: skip).")] = 15.0,
    raw_count: Annotated[int, typer.Option(min=0, help="Produce exactly this many raw records instead.")] = 0,
    smoke: Annotated[bool, typer.Option(help="Tiny steps, to try the benchmark in about a minute.")] = False,
    half: Annotated[bool, typer.Option(help="End with a step at half the maximum (for the latency figures).")] = True,
    loop: Loop = Loop(),
    out: Annotated[Path | None, typer.Option(help="Where run directories go (default var/bench).")] = None,
) -> None:
    """Measure the raw limit, climb the offered rates until the loop no longer keeps up, then measure latency at
    half the maximum. Prints tables, then the summary as one JSON line."""
    options = loop.options(
        rates=_rates(rates), step_s=step_s, refine=refine, raw_s=raw_s, raw_count=raw_count, half_step=half
    )
    if out is not None:
        options.out_root = out
    if smoke:
        options.rates, options.step_s, options.refine, options.warmup_s = (1.0, 2.0), 5.0, 0, 2.0
        options.raw_s, options.raw_count, options.settle_s, options.overlap_startup = 3.0, 0, 8.0, True
        options.warmup_offer_s = 2.0
    os.environ.setdefault("GRIDLOOP_LOG_LEVEL", "warning")
    result = Bench(options).run()
    from .report import print_run

    console = Console(width=200)
    print_run(result, console)
    print(stats.json_line(result.summary), flush=True)


@app.command()
@with_options
def soak(
    minutes: Annotated[float, typer.Option(min=1.0, help="How long to run at the soak rate.")] = 30.0,
    rate: Annotated[
        float | None, typer.Option(min=0.1, help="Incidents/s; default half the maximum of a quick ramp.")
    ] = None,
    ramp_step_s: Annotated[float, typer.Option(min=2.0, help="Seconds per step of the quick ramp.")] = 10.0,
    loop: Loop = Loop(),
) -> None:
    """Run at half the maximum rate (or --rate) for --minutes; report RSS growth per service (first vs last five
    minutes). Prints tables, then the summary as one JSON line."""
    options = loop.options(raw_s=0.0, refine=1)
    result = Soak(options, minutes, rate, ramp_step_s).run_soak()
    from .report import print_soak

    print_soak(result, Console(width=200))
    print(stats.json_line(result.summary), flush=True)


@dataclass(frozen=True)
class Reading:
    """The options of ``read``: what history, which databases, how the reads are timed and what is kept."""

    incidents: Annotated[int, typer.Option(min=1, help="Incidents of synthetic history (about 8.3 events each).")] = (
        20_000
    )
    days: Annotated[int, typer.Option(min=1, help="Days the history spans, ending now.")] = 365
    seed: Annotated[int, typer.Option(help="The history's seed: the same seed, the same incidents.")] = 1
    database_url: Annotated[
        list[str] | None,
        typer.Option(
            help="A read model to rebuild and read (its tables are dropped first), repeatable. Default: a SQLite "
            "file in the run's directory, and PostgreSQL in a scratch database where --postgres-url gives a server."
        ),
    ] = None
    postgres_url: Annotated[
        str,
        typer.Option(
            envvar="GRIDLOOP_TEST_POSTGRES_URL",
            help="A PostgreSQL server (as a database URL): the run makes a database of its own there, and drops it.",
        ),
    ] = ""
    read_model: Annotated[
        list[str] | None,
        typer.Option(
            help="A read model filled before (tests/readmodel_fill.py), repeatable: no history is published and "
            "nothing rebuilt; it is served and read as it is, and the live events fold into it."
        ),
    ] = None
    repeats: Annotated[int, typer.Option(min=1, help="Timed requests per endpoint.")] = 100
    budget_s: Annotated[
        float, typer.Option(min=0.0, help="Fewer requests (at least 3) once an endpoint has taken this long.")
    ] = 10.0
    live_s: Annotated[float, typer.Option(min=0.0, help="Seconds of live events under the dashboard (0: none).")] = 30.0
    live_rate: Annotated[float, typer.Option(min=0.1, help="Live events per second.")] = 100.0
    refresh_s: Annotated[float, typer.Option(min=0.1, help="How often the dashboard refreshes.")] = 5.0
    base_port: Annotated[int, typer.Option(help="opscenter listens on base+4.")] = READ_BASE_PORT
    bootstrap: Bootstrap = "127.0.0.1:9092"
    keep_db: Annotated[bool, typer.Option(help="Keep the rebuilt databases.")] = False
    keep_topics: KeepTopics = False

    def options(self) -> ReadOptions:
        """The run's :class:`ReadOptions`: the databases named, or else the default ones (a scratch database on
        ``postgres_url``'s server among them)."""
        values: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        named = tuple(values.pop("database_url") or ())
        filled = tuple(values.pop("read_model") or ())
        postgres_url = "" if named or filled else self.postgres_url
        return ReadOptions(**values | {"databases": named, "read_models": filled, "postgres_url": postgres_url})


@app.command()
@with_options
def read(
    reading: Reading = Reading(),
    out: Annotated[Path | None, typer.Option(help="Where run directories go (default var/bench-read).")] = None,
) -> None:
    """Generate a history of --incidents incidents, publish it to a fresh lifecycle topic, rebuild the operations
    center's read model from it, and time every read endpoint and the live fold's lag under a dashboard. Prints
    tables, then the result as one JSON line; exits 1 if an endpoint answered anything but 200."""
    options = reading.options()
    if out is not None:
        options.out_root = out
    os.environ.setdefault("GRIDLOOP_LOG_LEVEL", "warning")
    result = ReadBench(options).run()
    from ._read_report import print_read

    print_read(result, Console(width=200))
    print(stats.json_line(result), flush=True)
    if any(r["errors"] for r in result["databases"].values()):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
