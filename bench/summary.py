"""What bench/modes.py's runs come to: medians, ratios, percentiles, issue 9's targets, and the
tables (markdown, as docs/performance.md shows them). Pure: reads the results dict, no I/O.

The results dict (bench/modes.json): `runs[workload][config]` is the list of that pair's runs,
in the order they ran; `flows` the 100,000-flow scenario by mode; `element_bytes` the measured
kernel memory of one flow set element; `harness` the client's own ceiling.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

CONFIGS = ("kernel", "consumer", "queue", "offload")
HEADS = {
    "kernel": "kernel, no rules",
    "consumer": "C consumer",
    "queue": "nfacct queue",
    "offload": "nfacct offload",
}
DAEMONS = ("queue", "offload")


class Figure(NamedTuple):
    title: str
    unit: str
    key: str  # in each run's dict


# The throughput workloads, by the name modes.py runs them under; higher is better.
FIGURES = {
    "tcp": Figure("TCP bulk (iperf3)", "Gbit/s", "gbit_s"),
    "udp1": Figure("UDP 64 B, 1 flow", "kpps", "kpps"),
    "udp1000": Figure("UDP 64 B, 1,000 flows", "kpps", "kpps"),
    "connections": Figure("new TCP connections, one process each", "conn/s", "per_s"),
}
LATENCY = "latency"
KINDS = {"long_lived_ms": "long-lived process", "fresh_ms": "process started just before"}


def median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the value below which a fraction `p` of `values` lies."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def figure(runs: dict, workload: str, config: str) -> float | None:
    """The median of one workload's figure over a configuration's runs."""
    return median(r[FIGURES[workload].key] for r in runs.get(workload, {}).get(config, []))


def latencies(runs: dict, config: str, kind: str) -> list[float]:
    """Every connection's connect-to-first-byte time of a configuration, its runs pooled."""
    return [ms for r in runs.get(LATENCY, {}).get(config, []) for ms in r[kind]]


def exactness(runs: list[dict]) -> str:
    """'exact' if nfacct's counts equaled the kernel's in every run, else the largest gap in
    packets (in bytes if only bytes differ) and in how many runs there was one."""
    diffs = [r["check"]["diff"] for r in runs if "check" in r]
    if not diffs:
        return "-"
    if not any(diffs):
        return "exact"
    gaps = [(abs(v), k, v) for d in diffs for k, v in d.items()]
    packets = [g for g in gaps if g[1].endswith("packs")]
    _, name, value = max(packets or gaps)
    unit = "packets" if packets else "bytes"
    return f"{value:+,} {unit} {name[:6]} ({sum(1 for d in diffs if d)}/{len(diffs)} runs)"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _spread(values: list[float]) -> str:
    """The median, and the range when there is more than one run."""
    if not values:
        return "-"
    mid = f"{median(values):,.2f}"
    return mid if len(values) == 1 else f"{mid} ({min(values):,.1f}-{max(values):,.1f})"


def throughput_table(res: dict) -> list[str]:
    runs = res["runs"]
    lines = [
        _row(("workload", *(HEADS[c] for c in CONFIGS), "offload / kernel", "queue / C consumer")),
        _row(("---",) * (len(CONFIGS) + 3)),
    ]
    for name, fig in FIGURES.items():
        if name not in runs:
            continue
        values = {c: [r[fig.key] for r in runs[name].get(c, [])] for c in CONFIGS}
        lines.append(
            _row(
                (
                    f"{fig.title}, {fig.unit}",
                    *(_spread(values[c]) for c in CONFIGS),
                    _num(ratio(figure(runs, name, "offload"), figure(runs, name, "kernel")), 3),
                    _num(ratio(figure(runs, name, "queue"), figure(runs, name, "consumer")), 3),
                )
            )
        )
    return lines


def latency_table(res: dict) -> list[str]:
    runs = res["runs"]
    if LATENCY not in runs:
        return []
    lines = [
        _row(("connect to first byte, ms", *(HEADS[c] for c in CONFIGS), "offload +p50")),
        _row(("---",) * (len(CONFIGS) + 2)),
    ]
    for kind, title in KINDS.items():
        pooled = {c: latencies(runs, c, kind) for c in CONFIGS}
        cells = [
            "-" if not pooled[c] else f"{median(pooled[c]):.2f} / {percentile(pooled[c], 0.99):.2f}"
            for c in CONFIGS
        ]
        extra = _p50_extra(runs, kind)
        lines.append(_row((f"{title}, p50 / p99", *cells, _num(extra))))
    return lines


def _p50_extra(runs: dict, kind: str, config: str = "offload") -> float | None:
    ours, base = latencies(runs, config, kind), latencies(runs, "kernel", kind)
    return None if not ours or not base else median(ours) - median(base)


def daemon_table(res: dict) -> list[str]:
    """What each consumer did per workload: its CPU seconds, its counts against the kernel's, and
    where the packets it did not count for the process went (medians over the runs)."""
    runs = res["runs"]
    lines = [
        _row(
            (
                "workload",
                "consumer",
                "CPU s",
                "counts vs kernel",
                "unidentified packets",
                "passed unseen",
                "lost to socket buffer",
            )
        ),
        _row(("---",) * 7),
    ]
    for name in (*FIGURES, LATENCY):
        if name not in runs:
            continue
        title = FIGURES[name].title if name in FIGURES else "connect to first byte"
        for config in ("consumer", *DAEMONS):
            done = runs[name].get(config, [])
            if not done:
                continue
            checks = [r["check"] for r in done if "check" in r]

            def mid(key: str, checks: list[dict] = checks) -> str:
                return "-" if not checks else f"{median(c[key] for c in checks):,.0f}"

            unseen = mid("unseen") if checks else f"{median(r['unseen'] for r in done):,.0f}"
            cpu = _num(median(r["cpu_s"] for r in done))
            lines.append(
                _row(
                    (
                        title,
                        HEADS[config],
                        cpu,
                        exactness(done),
                        mid("unidentified_packets"),
                        unseen,
                        mid("missed"),
                    )
                )
            )
    return lines


def run_peak_mib(flows: dict) -> float:
    """The daemon's peak RSS over the whole 100,000-flow run: VmHWM once every flow had closed
    (the closing costs memory too), or with every flow open in results from before it was kept."""
    return flows.get("after_close", {}).get("hwm_mib", flows["peak"]["hwm_mib"])


def flows_table(res: dict) -> list[str]:
    flows = res.get("flows")
    if not flows:
        return []
    lines = [
        _row(
            (
                "100,000 UDP flows",
                "sockinfo",
                "offloaded",
                "set elements",
                "RSS with every flow / peak of the run, MiB",
                "set memory MiB",
                "counts",
                "missed",
                "gone after close, s",
            )
        ),
        _row(("---",) * 9),
    ]
    per_element = res.get("element_bytes")
    for mode, f in flows.items():
        peak = f["peak"]
        mem = None if per_element is None else peak["elements"] * per_element / 2**20
        gone = "-" if f["gone_after_s"] is None else f"{f['gone_after_s']:.1f}"
        lines.append(
            _row(
                (
                    HEADS[mode],
                    f"{peak['sockinfo']:,}",
                    f"{peak['offloaded']:,}",
                    f"{peak['elements']:,}",
                    f"{peak['rss_mib']:.1f} / {run_peak_mib(f):.1f}",
                    _num(mem, 1),
                    exactness([f]),
                    f"{f['check']['missed']:,}",
                    gone,
                )
            )
        )
    return lines


class Target(NamedTuple):
    text: str
    measure: Callable[[dict], tuple[str, bool | None]]  # (the figure as shown, met or not)


def _at_least(workload: str, num: str, den: str, bound: float) -> Callable[[dict], tuple]:
    def measure(res: dict) -> tuple[str, bool | None]:
        r = ratio(figure(res["runs"], workload, num), figure(res["runs"], workload, den))
        return _num(r, 3), None if r is None else r >= bound

    return measure


def _exact(workload: str) -> Callable[[dict], tuple]:
    def measure(res: dict) -> tuple[str, bool | None]:
        shown = exactness(res["runs"].get(workload, {}).get("offload", []))
        return shown, None if shown == "-" else shown == "exact"

    return measure


def _connections_attributed(res: dict) -> tuple[str, bool | None]:
    """Every child a row of its own, every flow offloaded, nothing unidentified, in every run."""
    runs = res["runs"].get("connections", {}).get("offload", [])
    if not runs:
        return "-", None
    checks = [r["check"] for r in runs]
    missing = sum(c["processes"] - c["attributed"] for c in checks)
    unidentified = sum(c["unidentified_packets"] for c in checks)
    short = sum(max(0, r["connections"] - r["check"]["offload_added"]) for r in runs)
    shown = f"{missing:,} processes missing, {unidentified:,} unidentified, {short:,} not offloaded"
    return shown, missing == unidentified == short == 0


def _latency(kind: str, bound: float) -> Callable[[dict], tuple]:
    def measure(res: dict) -> tuple[str, bool | None]:
        extra = _p50_extra(res["runs"], kind)
        return ("-" if extra is None else f"+{extra:.2f} ms"), None if extra is None else extra <= bound

    return measure


def _rss(mode: str, bound: float) -> Callable[[dict], tuple]:
    """Peak RSS in MB, met only if every flow made it into the tables."""

    def measure(res: dict) -> tuple[str, bool | None]:
        f = res.get("flows", {}).get(mode)
        if f is None:
            return "-", None
        mb, held = run_peak_mib(f) * 2**20 / 1e6, f["peak"]["sockinfo"]
        return f"{mb:.0f} MB with {held:,} flows", mb <= bound and held >= f["sockets"]

    return measure


TARGETS = (
    Target("offload >= 0.95x kernel, TCP bulk", _at_least("tcp", "offload", "kernel", 0.95)),
    Target("offload >= 0.95x kernel, UDP 64 B 1 flow", _at_least("udp1", "offload", "kernel", 0.95)),
    Target("offload >= 0.90x kernel, UDP 64 B 1,000 flows", _at_least("udp1000", "offload", "kernel", 0.90)),
    Target("offload counts exact, TCP bulk", _exact("tcp")),
    Target("offload counts exact, UDP 1 flow", _exact("udp1")),
    Target("offload counts exact, UDP 1,000 flows", _exact("udp1000")),
    Target("connections/s offload >= 0.8x kernel", _at_least("connections", "offload", "kernel", 0.8)),
    Target("every connection's process attributed, offloaded, 0 unidentified", _connections_attributed),
    Target("setup p50 <= kernel + 0.5 ms, long-lived process", _latency("long_lived_ms", 0.5)),
    Target("setup p50 <= kernel + 2 ms, process started just before", _latency("fresh_ms", 2.0)),
    Target("queue >= 0.95x C consumer, TCP bulk", _at_least("tcp", "queue", "consumer", 0.95)),
    Target("queue >= 0.90x C consumer, UDP 1 flow", _at_least("udp1", "queue", "consumer", 0.90)),
    Target("queue >= 0.90x C consumer, UDP 1,000 flows", _at_least("udp1000", "queue", "consumer", 0.90)),
    Target("100,000 flows in <= 150 MB peak RSS, offload", _rss("offload", 150)),
    Target("100,000 flows in <= 150 MB peak RSS, queue", _rss("queue", 150)),
)


def targets_table(res: dict) -> list[str]:
    lines = [_row(("target (issue 9)", "measured", "met")), _row(("---",) * 3)]
    for t in TARGETS:
        shown, ok = t.measure(res)
        lines.append(_row((t.text, shown, {True: "yes", False: "**no**", None: "-"}[ok])))
    return lines


def report(res: dict[str, Any]) -> str:
    """Every table, markdown, with the figures docs/performance.md quotes."""
    parts = [
        throughput_table(res),
        latency_table(res),
        daemon_table(res),
        flows_table(res),
        targets_table(res),
    ]
    text = "\n\n".join("\n".join(p) for p in parts if p)
    notes = []
    h = res.get("harness")
    if h:
        notes.append(
            f"harness: the connection client's own ceiling (children that exit without connecting) "
            f"{h['per_s']:,.0f} processes/s; the echo server is C (epoll)"
        )
    if res.get("element_bytes") is not None:
        notes.append(f"one flow set element: {res['element_bytes']:,.0f} bytes of kernel memory (measured)")
    return text + ("\n\n" + "\n".join(notes) if notes else "")
