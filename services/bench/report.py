"""What a run shows: rich tables on the terminal, a PNG plot of throughput and latency against offered rate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from . import stats
from .monitor import MACHINE, STEAL

if TYPE_CHECKING:
    from .harness import RunResult, SoakResult, StepRecord

SERVICES = ("intake", "dispatch", "handling", "verification", "opscenter", "broker", "driver")
OTHERS = "others"
"""CPU of every other process of the machine (the whole machine minus ours and what the host stole): other work
that competed."""
COLUMNS = (*SERVICES, STEAL, OTHERS)


def with_others(cpu: Mapping[str, float]) -> dict[str, float]:
    out = {k: v for k, v in cpu.items() if k != MACHINE}
    if MACHINE in cpu:
        out[OTHERS] = max(0.0, cpu[MACHINE] - sum(out.values()))
    return out


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def steps_table(steps: Sequence[StepRecord], title: str = "closed loop, by offered rate") -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("kind", "offered/s", "reported/s", "closed/s", "backlog Δ", "open", "err"):
        table.add_column(col, justify="right")
    for col in ("rep→disp p50/p99 ms", "e2e p50/p99 ms", "svc cpu ms/inc", "host probe ms"):
        table.add_column(col, justify="right")
    cpus = [with_others(s.cpu) for s in steps]
    names = [n for n in COLUMNS if any(n in c for c in cpus)]
    for name in names:
        table.add_column(f"{name[:5]} cpu%", justify="right")
    table.add_column("verdict")
    for s, cpu in zip(steps, cpus, strict=True):
        o = s.outcome
        rd = s.latencies.get("report_to_dispatched", {})
        e2e = s.latencies.get("end_to_end", {})
        table.add_row(
            s.kind,
            f"{o.offered_rate:g}",
            f"{o.sent_rate:.1f}",
            f"{o.closure_rate:.1f}",
            f"{stats.backlog_growth(o):+.0f}",
            str(o.open_end),
            str(o.errors),
            f"{_ms(rd.get('p50'))}/{_ms(rd.get('p99'))}",
            f"{_ms(e2e.get('p50'))}/{_ms(e2e.get('p99'))}",
            _ms(s.service_cpu_ms_per_incident),
            "-" if s.host_probe_ms is None else f"{s.host_probe_ms:.1f}",
            *(f"{cpu[n]:.0f}" if n in cpu else "-" for n in names),
            "[green]ok[/green]" if s.sustained else f"[red]no[/red] {s.reason.split(';')[0][:48]}",
        )
    return table


def stages_table(step: StepRecord, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("stage")
    for col in ("n", "p50 ms", "p95 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="right")
    for name, _start, _end in stats.STAGES:
        v = step.latencies.get(name)
        if not v:
            continue
        table.add_row(name, str(v["n"]), _ms(v["p50"]), _ms(v["p95"]), _ms(v["p99"]), _ms(v["max"]))
    return table


def resources_table(peak: Mapping[str, float], best: StepRecord | None) -> Table:
    table = Table(title="resources (CPU: average over the best sustained step; RSS: peak of the run)")
    table.add_column("process")
    table.add_column("cpu % of a core", justify="right")
    table.add_column("peak RSS MB", justify="right")
    cpus = with_others(best.cpu) if best else {}
    for name in COLUMNS:
        if name in peak or name in cpus:
            cpu = cpus.get(name)
            table.add_row(name, "-" if cpu is None else f"{cpu:.0f}", f"{peak[name]:.0f}" if name in peak else "-")
    return table


def print_run(result: RunResult, console: Console) -> None:
    if result.raw:
        r = result.raw
        raw = Table(
            title=f"raw Kafka limit (aiokafka, acks=all, idempotent, {r.partitions} partitions)", title_justify="left"
        )
        for col in (
            "hops/s",
            "records",
            "bytes/record",
            "seconds",
            "produce/s",
            "hop p50/p99 ms at saturation",
            "CPU s clients/broker",
            "CPU µs per hop",
        ):
            raw.add_column(col, justify="right")
        raw.add_row(
            f"{r.hops_per_s:,.0f}",
            f"{r.consumed:,}",
            f"{r.message_bytes:.0f}",
            f"{r.seconds:.1f}",
            f"{r.produce_per_s:,.0f}",
            f"{_ms(r.p50_ms)}/{_ms(r.p99_ms)}",
            f"{_s(r.client_cpu_s)}/{_s(r.broker_cpu_s)}",
            "-" if r.cpu_ms_per_hop is None else f"{r.cpu_ms_per_hop * 1000:.0f}",
        )
        console.print(raw)
    console.print(steps_table(result.steps))
    if result.half:
        console.print(stages_table(result.half, f"stages at half the maximum ({result.half.outcome.offered_rate:g}/s)"))
    if result.best:
        console.print(stages_table(result.best, f"stages at the maximum ({result.best.outcome.offered_rate:g}/s)"))
    console.print(resources_table(result.peak_rss, result.best))
    per_topic = ", ".join(f"{t.split('.', 1)[-1]} {n}" for t, n in result.hops_per_topic.items())
    console.print(
        f"hops per incident: {result.hops if result.hops is not None else '-'} measured "
        f"({stats.expected_hops()} expected for one pass of the loop); records: {per_topic}"
    )
    if result.errors:
        console.print(f"[yellow]{len(result.errors)} HTTP error samples, first: {result.errors[0]}[/yellow]")
    console.print(f"409 conflicts (repeated actions, not errors): {result.conflicts}")
    console.print(f"calls repeated after a dropped connection: {result.retries}")
    console.print(f"results: {result.out_dir}")


def print_soak(result: SoakResult, console: Console) -> None:
    console.print(steps_table(result.steps, title=f"soak at {result.rate:g} incidents/s"))
    table = Table(title="RSS: first vs last 5 minutes of the soak", title_justify="left")
    for col in ("process", "first MB", "last MB", "growth MB", "growth %"):
        table.add_column(col, justify="right")
    for name, g in sorted(result.growth.items()):
        table.add_row(name, str(g["first_mb"]), str(g["last_mb"]), str(g["growth_mb"]), str(g["growth_pct"]))
    console.print(table)
    console.print(f"results: {result.out_dir}")


# -- plots ----------------------------------------------------------------------------------------------------


def plot(steps: Sequence[StepRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted((s for s in steps if s.kind in ("ramp", "refine", "half")), key=lambda s: s.outcome.offered_rate)
    if not ordered:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    x = [s.outcome.offered_rate for s in ordered]
    ax1.plot(x, [s.outcome.closure_rate for s in ordered], "o-", label="closed/s")
    ax1.plot(x, [s.outcome.sent_rate for s in ordered], "s--", alpha=0.6, label="reported/s")
    ax1.plot([0, max(x)], [0, max(x)], ":", color="grey", label="offered")
    for s in ordered:
        if not s.sustained:
            ax1.plot(s.outcome.offered_rate, s.outcome.closure_rate, "x", color="red", markersize=12)
    ax1.set_xlabel("offered incidents/s")
    ax1.set_ylabel("incidents/s")
    ax1.set_title("throughput (x: not sustained)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    for stage, style in (("report_to_dispatched", "o-"), ("end_to_end", "s-")):
        for q, alpha in (("p50", 1.0), ("p99", 0.5)):
            ys = [s.latencies.get(stage, {}).get(q) for s in ordered]
            pts = [(a, b) for a, b in zip(x, ys, strict=True) if b is not None]
            if pts:
                ax2.plot(*zip(*pts, strict=True), style, alpha=alpha, label=f"{stage} {q}")
    ax2.set_yscale("log")
    ax2.set_xlabel("offered incidents/s")
    ax2.set_ylabel("ms")
    ax2.set_title("latency")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rss(series: Mapping[str, Sequence[tuple[float, float]]], t0: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, points in sorted(series.items()):
        if points:
            ax.plot([(t - t0) / 60 for t, _ in points], [r for _, r in points], label=name)
    ax.set_xlabel("minutes since the soak began")
    ax.set_ylabel("RSS MB")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
