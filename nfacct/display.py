"""Human-readable output with rich. Process names come from other users and are hostile until
escaped: they are shown as plain Text (never markup) with control characters and bytes that are
not UTF-8 made visible (`text.escape`).
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import text
from .tables import COUNTER_NAMES


def safe(name: str) -> Text:
    """Plain text with control characters and undecodable bytes shown as escapes, so a name
    cannot move the cursor or garble the terminal."""
    return Text(text.escape(name))


def human_bytes(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


def default_console() -> Console:
    # Piped output has no terminal width to fit; 80 columns would squeeze the table unreadable.
    return Console() if sys.stdout.isatty() else Console(width=140)


def print_tasks(tasks: list[dict], console: Console | None = None) -> None:
    console = console or default_console()
    table = Table(title="nfacct: per-process traffic (packets/bytes)")
    table.add_column("PID", justify="right", no_wrap=True)
    table.add_column("COMMAND", no_wrap=True)
    table.add_column("UID", justify="right", no_wrap=True)
    for name in ("TCP SND", "TCP RCV", "UDP SND", "UDP RCV"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("CMDLINE", no_wrap=True, overflow="ellipsis", max_width=50)
    for t in tasks:
        cells = [
            f"{t[f'{proto}{d}packs']}/{human_bytes(t[f'{proto}{d}bytes'])}"
            for proto in ("tcp", "udp")
            for d in ("snd", "rcv")
        ]
        table.add_row(str(t["pid"]), safe(t["comm"]), str(t["uid"]), *cells, safe(t["cmdline"]))
    console.print(table)


def print_status(status: dict, console: Console | None = None) -> None:
    console = console or default_console()
    eng, q = status["engine"], status["queue"]
    table = Table(
        title=f"nfacct status (pid {status['pid']}, netns {status['netns'] or 'own'})", show_header=False
    )
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("packets seen by the daemon", str(eng["packets"]))
    for d, protos in eng["by_protocol"].items():
        for p, (pk, by) in protos.items():
            table.add_row(f"  {p} {d}", f"{pk} pk / {human_bytes(by)}")
    off = status.get("offload", {})
    table.add_row(
        "offload", safe(str(off.get("mode"))) + (f" ({safe(off['problem'])})" if off.get("problem") else "")
    )
    if "flows" in off:
        table.add_row("  flows counted by the kernel now", f"{off['flows']} (at most {off['limit']})")
        table.add_row(
            "  added / removed / overflow", f"{off['added']} / {off['removed']} / {off['overflow']}"
        )
        age = off["counter_age"]
        table.add_row("  counters read", "never" if age is None else f"{age:.1f} s ago")
        for d, protos in eng.get("offloaded_by_protocol", {}).items():
            for p, (pk, by) in protos.items():
                table.add_row(f"  {p} {d} counted by the kernel", f"{pk} pk / {human_bytes(by)}")
    table.add_row("malformed packets", str(eng["malformed_total"]))
    unid = eng["unidentified"]
    table.add_row("unidentified packets", str(sum(unid[n] for n in COUNTER_NAMES if n.endswith("packs"))))
    table.add_row("#sockinfo / #taskinfo", f"{eng['sockinfo']} / {eng['taskinfo']}")
    table.add_row("attribution in flight", str(status["resolver"]["in_flight"]))
    for k in ("number", "waiting", "queue_dropped", "user_dropped", "id_sequence", "missed"):
        if k in q:
            table.add_row(f"queue {k}", str(q[k]))
    cov = status.get("coverage", {})
    if "unaccounted" in cov:
        table.add_row("sent to the queue (kernel)", str(cov["queued_by_kernel"]))
        table.add_row("passed unaccounted", str(cov["unaccounted"]))
    else:
        table.add_row("unaccounted packets", f"unknown: {safe(str(cov.get('rules')))}")
    console.print(table)


def print_history(
    rows: list[dict], by: str, unaccounted: tuple[int, int] = (0, 0), console: Console | None = None
) -> None:
    console = console or default_console()
    table = Table(title=f"nfacct history: exited processes by {by} (packets/bytes)")
    table.add_column(by.upper(), no_wrap=True)
    table.add_column("PROCESSES", justify="right")
    for name in ("TCP SND", "TCP RCV", "UDP SND", "UDP RCV"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        cells = [
            f"{r[f'{proto}{d}packs']}/{human_bytes(r[f'{proto}{d}bytes'])}"
            for proto in ("tcp", "udp")
            for d in ("snd", "rcv")
        ]
        table.add_row(safe(str(r[by])), str(r["processes"]), *cells)
    packets, gaps = unaccounted
    if packets:
        table.caption = f"{packets} packets passed unaccounted in {gaps} gaps (table `unaccounted`)"
    console.print(table)
