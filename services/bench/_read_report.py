"""The read benchmark's tables (rich), from its result."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table


def _n(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{value:,.0f}" if isinstance(value, int | float) else str(value)


def history_table(result: Mapping[str, Any]) -> Table:
    h = result["history"]
    table = Table(
        title=f"history: {result['incidents']:,} incidents over {result['days']} days (seed {result['seed']})"
    )
    for column in ("events", "events/incident", "drawn /s", "published /s", "wall s"):
        table.add_column(column, justify="right")
    table.add_row(
        _n(h["events"]),
        _n(h["events_per_incident"], 2),
        _n(h["generate_events_per_s"]),
        _n(h["publish_events_per_s"]),
        _n(h["wall_s"], 1),
    )
    return table


def rebuild_table(result: Mapping[str, Any]) -> Table:
    table = Table(title="rebuild from the lifecycle log")
    for column in ("database", "events", "seconds", "events/s", "peak RSS MB", "database MB", "bytes/event"):
        table.add_column(column, justify="right")
    for label, round_ in result["databases"].items():
        r = round_.get("rebuild")
        if not r:
            continue  # a read model filled before the run
        table.add_row(
            label,
            _n(r["events"]),
            _n(r["seconds"], 1),
            _n(r["events_per_s"]),
            _n(r["peak_rss_mb"], 1),
            _n(r["db_bytes"] / 2**20, 1),
            _n(r["bytes_per_event"]),
        )
    return table


def reads_table(label: str, round_: Mapping[str, Any]) -> Table:
    table = Table(title=f"reads on {label} (one client, ms)")
    table.add_column("endpoint")
    for column in ("n", "p50", "p95", "p99", "max", "server CPU", "bytes", "status"):
        table.add_column(column, justify="right")
    for name, t in round_.get("endpoints", {}).items():
        status = " ".join(f"{code}×{n}" for code, n in t["status"].items())
        table.add_row(
            name,
            _n(t["n"]),
            _n(t.get("p50_ms"), 1),
            _n(t.get("p95_ms"), 1),
            _n(t.get("p99_ms"), 1),
            _n(t.get("max_ms"), 1),
            _n(t.get("server_cpu_ms"), 1),
            _n(t["bytes"]),
            status if set(t["status"]) == {"200"} else f"[red]{status}[/red]",
        )
    return table


def live_table(result: Mapping[str, Any]) -> Table:
    table = Table(title="live fold under a dashboard refreshing every few seconds (lag: send → folded, ms)")
    for column in ("database", "events", "sent /s", "lag p50", "p95", "p99", "max", "not folded", "refresh p99"):
        table.add_column(column, justify="right")
    for label, round_ in result["databases"].items():
        live = round_.get("live")
        if not live:
            continue
        lag = live["lag_ms"]
        table.add_row(
            label,
            _n(live["events"]),
            _n(live["sent_rate"], 1),
            _n(lag["p50"], 1),
            _n(lag["p95"], 1),
            _n(lag["p99"], 1),
            _n(lag["max"], 1),
            _n(live["unfolded"]),
            _n(live["dashboard_refresh_ms"]["p99"], 1),
        )
    return table


def print_read(result: Mapping[str, Any], console: Console) -> None:
    if host := result.get("host"):
        console.print(
            f"host: {host['cpus']} CPUs, load {host['load_start']} → {host.get('load_end')}, "
            f"probe {host['probe_ms_start']} → {host.get('probe_ms_end')} ms (higher: a busier host, slower figures)"
        )
    if result.get("history"):
        console.print(history_table(result))
        console.print(rebuild_table(result))
    for label, round_ in result["databases"].items():
        console.print(reads_table(label, round_))
    console.print(live_table(result))


__all__ = ["history_table", "live_table", "print_read", "reads_table", "rebuild_table"]
