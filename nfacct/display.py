"""Human-readable output with rich. Process names come from other users and are hostile until
escaped: they are shown as plain Text (never markup) with control characters and bytes that are
not UTF-8 made visible (`text.escape`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from . import text, topview, units
from .tables import COUNTER_NAMES

UNIT_WIDTH = 20  # docker:<12 hex> and most unit names whole; longer ones cut with …


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


def several_namespaces(rows: list[dict]) -> bool:
    """Rows of more than one namespace: tables show a NETNS column (one namespace's look as
    they always did). A history group may name several, comma-separated (`Store.history`)."""
    names = {n for r in rows for n in (r.get("netns") or "").split(",")}
    return len(names) > 1


def print_tasks(tasks: list[dict], console: Console | None = None) -> None:
    console = console or default_console()
    table = Table(title="nfacct: per-process traffic (packets/bytes)")
    table.add_column("PID", justify="right", no_wrap=True)
    table.add_column("COMMAND", no_wrap=True)
    table.add_column("UID", justify="right", no_wrap=True)
    named = several_namespaces(tasks)
    if named:
        table.add_column("NETNS", no_wrap=True)
    for name in ("TCP SND", "TCP RCV", "UDP SND", "UDP RCV"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("CMDLINE", no_wrap=True, overflow="ellipsis", max_width=50)
    for t in tasks:
        cells = [
            f"{t[f'{proto}{d}packs']}/{human_bytes(t[f'{proto}{d}bytes'])}"
            for proto in ("tcp", "udp")
            for d in ("snd", "rcv")
        ]
        where = [safe(t.get("netns") or topview.OWN_NETNS)] if named else []
        table.add_row(str(t["pid"]), safe(t["comm"]), str(t["uid"]), *where, *cells, safe(t["cmdline"]))
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
    spaces = status.get("namespaces", [])
    if len(spaces) > 1:  # the rows above are the first's queue, offload and coverage; each one's:
        for ns in spaces:
            q, off, cov = ns["queue"], ns["offload"], ns["coverage"]
            flows = f", {off['flows']} flows in the kernel" if "flows" in off else ""
            lost = cov.get("unaccounted", "unknown")
            table.add_row(
                f"netns {safe(ns['name'] or topview.OWN_NETNS)}",
                f"queue {q.get('number')}: {q.get('received', 0)} pk read, {q.get('missed', '?')} missed;"
                f" {safe(str(off.get('mode')))}{flows}; unaccounted {lost}",
            )
    console.print(table)


def print_history(
    rows: list[dict], by: str, unaccounted: tuple[int, int] = (0, 0), console: Console | None = None
) -> None:
    console = console or default_console()
    table = Table(title=f"nfacct history: exited processes by {by} (packets/bytes)")
    table.add_column(by.upper(), no_wrap=True)
    named = by != "netns" and several_namespaces(rows)
    if named:
        table.add_column("NETNS", no_wrap=True)
    table.add_column("PROCESSES", justify="right")
    for name in ("TCP SND", "TCP RCV", "UDP SND", "UDP RCV"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        cells = [
            f"{r[f'{proto}{d}packs']}/{human_bytes(r[f'{proto}{d}bytes'])}"
            for proto in ("tcp", "udp")
            for d in ("snd", "rcv")
        ]
        where = [safe(r["netns"] or topview.OWN_NETNS)] if named else []
        if by == "unit":
            label = r[by] or units.NONE
        elif by == "netns":
            label = r[by] or topview.OWN_NETNS
        else:
            label = str(r[by])
        table.add_row(safe(label), *where, str(r["processes"]), *cells)
    packets, gaps = unaccounted
    if packets:
        table.caption = f"{packets} packets passed unaccounted in {gaps} gaps (table `unaccounted`)"
    console.print(table)


# ---- nfacct top's live view (nfacct.live): rows from nfacct.topview ----------------------------


def _rate(r: float | None) -> str:
    return "-" if r is None else f"{human_bytes(r)}/s"


def _cut(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _tail(name: str, width: int) -> str:
    """`name` cut from the left to `width` characters: a cgroup path keeps its unit."""
    return name if len(name) <= width else "…" + name[len(name) - width + 1 :]


def _figure(label: str, value: int | None, alarm: bool) -> Text:
    shown = "?" if value is None else f"{value:,}"
    style = "bold red" if alarm and value else ""
    return Text.assemble(f"{label} ", (shown, style))


def top_header(status: dict, by: str, interval: float, problem: str | None = None) -> Text:
    """Two lines: where and how, then the engine's health (red when something passed unseen)."""
    h = topview.health(status)
    netns = status.get("netns") or "own"
    first = Text(f"nfacct top  netns {text.escape(netns)}  by {by}  every {interval:g}s")
    parts = [
        _figure("packets", h.packets, False),
        _figure("unaccounted", h.unaccounted, True),
        _figure("unidentified", h.unidentified, True),
        _figure("malformed", h.malformed, True),
        _figure("queue drops", h.queue_drops, True),
    ]
    second = Text("  ").join(parts)
    lines = [first, second]
    if problem is not None:
        lines.append(Text(text.escape(problem), style="bold red"))
    return Text("\n").join(lines)


def top_table(found: list[topview.Row], by: str, width: int, limit: int | None = None) -> Table:
    """The rows as a table that fits `width` columns (80 at least), `limit` rows at most."""
    # Every column has its width, the names cut to theirs: rich would otherwise squeeze the
    # figures or fold a row in two when a name is long.
    t = Table(box=None, pad_edge=False, header_style="bold", expand=False)
    t.add_column("S", no_wrap=True, width=1)
    unit_width = 0
    if by == "process":
        wide = width >= 120
        # From 140 columns (a pipe's width) the unit fits beside a command line still 37 wide.
        unit_width = UNIT_WIDTH if width >= 140 else 0
        name_width = 16 if wide else max(8, width - 63)  # 63: the other columns and their gaps
        t.add_column("PID", justify="right", no_wrap=True, width=7)
        t.add_column("USER", no_wrap=True, width=8)
        t.add_column("COMMAND", no_wrap=True, width=name_width)
        if unit_width:
            t.add_column("UNIT", no_wrap=True, width=unit_width)
    else:
        wide = False
        name_width = max(8, width - 51)
        t.add_column(by.upper(), no_wrap=True, width=name_width)
        t.add_column("PROCS", justify="right", no_wrap=True, width=5)
    for name, room in (("SEND/s", 9), ("RECV/s", 9), ("SENT", 7), ("RECEIVED", 8)):
        t.add_column(name, justify="right", no_wrap=True, width=room)
    cmdline_width = width - 81 - (unit_width + 2 if unit_width else 0)
    if wide:
        t.add_column("CMDLINE", no_wrap=True, width=cmdline_width)
    shown = found if limit is None else found[: max(limit, 0)]
    for r in shown:
        figures = [_rate(r.send_rate), _rate(r.recv_rate), human_bytes(r.sent), human_bytes(r.received)]
        if by == "process":
            cells = [str(r.pid), _cut(text.escape(r.user), 8), _cut(text.escape(r.label), name_width)]
            if unit_width:
                cells.append(_cut(text.escape(r.unit), unit_width))
        else:
            cut = _tail if by == "cgroup" else _cut
            cells = [cut(text.escape(r.label), name_width), str(r.processes)]
        names = [Text(c) for c in cells]  # Text: a name is never markup
        if wide:
            figures.append(Text(_cut(text.escape(r.cmdline), cmdline_width)))
        t.add_row(r.state, *names, *figures, style="dim" if r.state else "")
    if len(shown) < len(found):
        t.caption = f"{len(found) - len(shown)} more (a taller terminal shows them)"
    return t


HEADER_LINES = 5  # two lines of header, the legend, the table's header, its caption


def top_screen(
    prev: topview.Snapshot | None,
    cur: topview.Snapshot,
    by: str,
    interval: float,
    width: int,
    height: int | None = None,
    user_name: Callable[[int], str] = str,
    problem: str | None = None,
) -> Group:
    """The whole view: header, legend and table, cut to `height` lines if given."""
    found = topview.rows(prev, cur, by, user_name)
    limit = None if height is None else height - HEADER_LINES - (problem is not None)
    legend = Text(
        f"keys g/p/c/u/s/t/n group, q quit   S: {topview.EXITED_NOW} exited since the last poll,"
        f" {topview.EXITED_BEFORE} before",
        style="dim",
    )
    return Group(top_header(cur.status, by, interval, problem), legend, top_table(found, by, width, limit))
