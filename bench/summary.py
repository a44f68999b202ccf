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
    """'exact' if nfacct's counts equaled the kernel's in every run, else the largest gap."""
    diffs = [r["check"]["diff"] for r in runs if "check" in r]
    if not diffs:
        return "-"
    worst = max((abs(v), k, v) for d in diffs for k, v in d.items()) if any(diffs) else None
    if worst is None:
        return "exact"
    _, name, value = worst
    return f"{value:+,} {name} ({sum(1 for d in diffs if d)}/{len(diffs)} runs)"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def throughput_table(res: dict) -> list[str]:
    runs = res["runs"]
    lines = [
        _row(("workload", *(HEADS[c] for c in CONFIGS), "offload / kernel", "queue / C consumer")),
        _row(("---",) * (len(CONFIGS) + 3)),
    ]
    for name, fig in FIGURES.items():
        if name not in runs:
            continue
        values = {c: figure(runs, name, c) for c in CONFIGS}
        lines.append(
            _row(
                (
                    f"{fig.title}, {fig.unit}",
                    *(_num(values[c]) for c in CONFIGS),
                    _num(ratio(values["offload"], values["kernel"]), 3),
                    _num(ratio(values["queue"], values["consumer"]), 3),
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
    """What the consumers did per workload: CPU seconds, exactness, what passed them unseen."""
    runs = res["runs"]
    lines = [
        _row(
            ("workload", "C consumer CPU s", "queue CPU s", "offload CPU s", "queue counts", "offload counts")
        ),
        _row(("---",) * 6),
    ]
    for name in (*FIGURES, LATENCY):
        if name not in runs:
            continue
        title = FIGURES[name].title if name in FIGURES else "connect to first byte"
        cpu = [_num(median(r["cpu_s"] for r in runs[name].get(c, []))) for c in ("consumer", *DAEMONS)]
        lines.append(_row((title, *cpu, *(exactness(runs[name].get(c, [])) for c in DAEMONS))))
    return lines


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
                "RSS / peak MiB",
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
                    f"{peak['rss_mib']:.1f} / {peak['hwm_mib']:.1f}",
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
    measure: Callable[[dict], tuple[float | None, bool | None]]  # (the figure, met or not)


def _at_least(workload: str, num: str, den: str, bound: float) -> Callable[[dict], tuple]:
    def measure(res: dict) -> tuple[float | None, bool | None]:
        r = ratio(figure(res["runs"], workload, num), figure(res["runs"], workload, den))
        return r, None if r is None else r >= bound

    return measure


def _exact(workload: str) -> Callable[[dict], tuple]:
    def measure(res: dict) -> tuple[float | None, bool | None]:
        runs = res["runs"].get(workload, {}).get("offload", [])
        return None, None if not runs else exactness(runs) == "exact"

    return measure


def _connections_attributed(res: dict) -> tuple[float | None, bool | None]:
    """Every child a row of its own, every flow offloaded, nothing unidentified, in every run."""
    runs = res["runs"].get("connections", {}).get("offload", [])
    if not runs:
        return None, None
    missing = sum(r["check"]["processes"] - r["check"]["attributed"] for r in runs)
    ok = missing == 0 and all(
        r["check"]["unidentified_packets"] == 0 and r["check"]["offload_added"] >= r["connections"]
        for r in runs
    )
    return missing, ok


def _latency(kind: str, bound: float) -> Callable[[dict], tuple]:
    def measure(res: dict) -> tuple[float | None, bool | None]:
        extra = _p50_extra(res["runs"], kind)
        return extra, None if extra is None else extra <= bound

    return measure


def _rss(mode: str, bound: float) -> Callable[[dict], tuple]:
    def measure(res: dict) -> tuple[float | None, bool | None]:
        f = res.get("flows", {}).get(mode)
        if f is None:
            return None, None
        mb = f["peak"]["hwm_mib"] * 2**20 / 1e6
        return mb, mb <= bound and f["peak"]["sockinfo"] >= f["sockets"]

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
        value, ok = t.measure(res)
        shown = "-" if value is None else (f"{value:,.3f}" if isinstance(value, float) else f"{value:,}")
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
