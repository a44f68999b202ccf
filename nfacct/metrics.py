"""Prometheus metrics: traffic by command, user, cgroup and unit (the fleet view), and the engine's
health.

Per-process counters are not exported as they are: every process would be a series of its own
(cardinality growing with every pid) and its counts would vanish when the daemon forgets it.
Instead each snapshot of the tasks (`Service.snapshot`, what `top` shows) is folded into
aggregates keyed by (command, user, cgroup, unit): every task adds what it counted since the previous
snapshot, under the labels it has now (a process that exec'd counts under its new name from then
on). An aggregate therefore only grows, and what an exited process counted stays in it after the
GC has dropped its taskinfo: the daemon folds a snapshot on each scrape and right before each GC.
The fold and a copy of what a scrape shows are made in the loop (the tables are not thread-safe);
the text is made from that copy in the endpoint's worker thread (`scrape`).

The aggregates start at zero with the daemon: tasks already there when it starts (restored from a
checkpoint or handed over) count from their counts at that moment (`baseline`), since what they
counted before was the predecessor's to export. Prometheus sees a restart as a counter reset,
which rate() and increase() handle.

The unit (`units`: the container or systemd unit) is a function of the cgroup, so it adds no label
set: `sum by (unit)` needs no relabelling of cgroup paths, at no cost in series. Label values are
valid UTF-8 whatever a process calls itself: command, cgroup and unit pass through
`text.escape`, as on a terminal (a byte that is not UTF-8 becomes the four characters `\\xff`,
control characters `\\n`, `\\x1b`...); the exposition then escapes backslash, quote and newline
as its format asks. The user label is the numeric uid: resolving names would block the loop on
NSS (LDAP and friends). A local user can make up any number of process names, so at most
MAX_LABEL_SETS label sets are kept; traffic of any further one counts under OVER_LIMIT.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import scrape, text, units
from .queue import KernelQueueStats
from .tables import COUNTER_NAMES, NCOUNTERS

if TYPE_CHECKING:
    import selectors
    from collections.abc import Callable

    from .faults import Faults

log = logging.getLogger("nfacct")

MAX_LABEL_SETS = 10_000
# Longer than a command name can be (comm is at most 15 bytes), so no process can take it.
OVER_LIMIT = "(label sets over limit)"
# (proto, direction, index of the packets counter in COUNTER_NAMES; bytes follow it)
SERIES = (("tcp", "snd", 0), ("tcp", "rcv", 2), ("udp", "snd", 4), ("udp", "rcv", 6))
TRAFFIC_LABELS = ("proto", "direction", "command", "user", "cgroup", "unit")

LabelSet = tuple[str, str, str, str]  # command, user, cgroup, unit: escaped, ready to export
TaskKey = tuple[int, float]  # pid, btime


def label_set(task: dict) -> LabelSet:
    cgroup = task["cgroup"]
    return text.escape(task["comm"]), str(task["uid"]), text.escape(cgroup), text.escape(units.unit(cgroup))


def counters(task: dict) -> list[int]:
    return [task[name] for name in COUNTER_NAMES]


class Aggregates:
    """Traffic per label set, grown by the deltas of every task between snapshots."""

    def __init__(self, limit: int = MAX_LABEL_SETS):
        self.limit = limit
        self.totals: dict[LabelSet, list[int]] = {}
        self._seen: dict[TaskKey, list[int]] = {}  # each task's counters as last folded

    def baseline(self, tasks: list[dict]) -> None:
        """Tasks counted before us: only what they count from now on is ours."""
        self._seen = {(t["pid"], t["btime"]): counters(t) for t in tasks}

    def fold(self, tasks: list[dict]) -> None:
        """Add what every task counted since the last fold; forget the tasks no longer listed
        (the GC dropped them: their counts are in their aggregate already)."""
        seen = {}
        for t in tasks:
            key = (t["pid"], t["btime"])
            now = counters(t)
            seen[key] = now
            before = self._seen.get(key)
            if before == now:
                continue
            labels = label_set(t)
            total = self.totals.get(labels)
            if total is None:
                if len(self.totals) >= self.limit:
                    labels = (OVER_LIMIT,) * len(labels)
                total = self.totals.setdefault(labels, [0] * NCOUNTERS)
            for i in range(NCOUNTERS):
                total[i] += now[i] - (before[i] if before else 0)
        self._seen = seen


@dataclass(frozen=True)
class Health:
    """The daemon's own figures, copied in the loop for a rendering in the worker thread."""

    packets: int
    malformed: dict[str, int]
    unidentified_by_uid: dict[str, dict[str, int]]
    unaccounted: int | None  # None without a counting rule: nobody knows
    kernel: KernelQueueStats | None
    guard_accepted: int
    sockinfo: int
    sockinfo_overflow: int
    taskinfo: int
    taskinfo_overflow: int
    faults: int


@dataclass(frozen=True)
class Frozen:
    """Everything a scrape shows, as of one loop turn: the worker thread reads only this."""

    traffic: list[tuple[LabelSet, list[int]]]
    health: Health
    label_set_limit: int
    answered: int
    dropped: int
    loop_seconds: float  # the previous scrape's, in the loop and in the worker
    render_seconds: float


class Collector:
    def __init__(self, frozen: Frozen):
        self.frozen = frozen

    def collect(self) -> Iterator[Metric]:
        f = self.frozen
        yield from traffic(f.traffic)
        yield from health(f.health)
        yield GaugeMetricFamily(
            "nfacct_metrics_label_sets",
            f"(command, user, cgroup, unit) label sets kept, at most {f.label_set_limit}",
            value=len(f.traffic),
        )
        yield CounterMetricFamily("nfacct_metrics_answers", "scrapes answered in full", value=f.answered)
        yield CounterMetricFamily(
            "nfacct_metrics_clients_dropped", "scrapers cut off at their deadline", value=f.dropped
        )
        yield GaugeMetricFamily(
            "nfacct_metrics_loop_seconds",
            "time the previous scrape took from the daemon's loop (snapshot, fold, copy)",
            value=f.loop_seconds,
        )
        yield GaugeMetricFamily(
            "nfacct_metrics_render_seconds",
            "time the previous scrape took in the rendering thread",
            value=f.render_seconds,
        )


def traffic(totals: list[tuple[LabelSet, list[int]]]) -> Iterator[Metric]:
    packets = CounterMetricFamily(
        "nfacct_packets", "IP packets of processes, by command, user, cgroup and unit", labels=TRAFFIC_LABELS
    )
    octets = CounterMetricFamily(
        "nfacct_bytes", "IP bytes of processes (as nft counts them)", labels=TRAFFIC_LABELS
    )
    # Every (proto, direction) of a label set, zeros included: a series that appears with its
    # first value already above zero loses that value to increase() and rate().
    for labels, total in totals:
        for proto, direction, i in SERIES:
            packets.add_metric((proto, direction, *labels), total[i])
            octets.add_metric((proto, direction, *labels), total[i + 1])
    return packets, octets


def health(h: Health) -> Iterator[Metric]:
    yield CounterMetricFamily(
        "nfacct_engine_packets", "packets the daemon read from its queue", value=h.packets
    )
    malformed = CounterMetricFamily(
        "nfacct_malformed_packets", "packets that could not be parsed, by reason", labels=("reason",)
    )
    for reason, n in sorted(h.malformed.items()):
        malformed.add_metric((reason,), n)
    yield malformed
    unidentified = [
        CounterMetricFamily(
            f"nfacct_unidentified_{what}",
            f"{what} of flows whose process was never found, by the uid of their socket (-1: unknown)",
            labels=("proto", "direction", "user"),
        )
        for what in ("packets", "bytes")
    ]
    for uid, bucket in h.unidentified_by_uid.items():
        values = [bucket[name] for name in COUNTER_NAMES]
        for proto, direction, i in SERIES:
            unidentified[0].add_metric((proto, direction, uid), values[i])
            unidentified[1].add_metric((proto, direction, uid), values[i + 1])
    yield from unidentified
    if h.unaccounted is not None:
        yield CounterMetricFamily(
            "nfacct_unaccounted_packets",
            "packets sent to the queue that no process's totals include (queue full, daemon stalled"
            " or down), as settled at each checkpoint",
            value=h.unaccounted,
        )
    if h.kernel is not None:
        yield CounterMetricFamily(
            "nfacct_queue_dropped_packets",
            "packets the kernel could not queue (queue full)",
            value=h.kernel.queue_dropped,
        )
        yield CounterMetricFamily(
            "nfacct_queue_user_dropped_packets",
            "packets the kernel could not deliver to the daemon (socket buffer full)",
            value=h.kernel.user_dropped,
        )
        yield GaugeMetricFamily(
            "nfacct_queue_waiting_packets", "packets queued and not yet read", value=h.kernel.waiting
        )
    yield CounterMetricFamily(
        "nfacct_guard_accepted_packets",
        "packets the guard let pass unseen while the daemon was stalled",
        value=h.guard_accepted,
    )
    for table, size, overflow in (
        ("sockinfo", h.sockinfo, h.sockinfo_overflow),
        ("taskinfo", h.taskinfo, h.taskinfo_overflow),
    ):
        yield GaugeMetricFamily(f"nfacct_{table}", f"entries in the {table} table", value=size)
        yield CounterMetricFamily(
            f"nfacct_{table}_overflow", f"entries refused because the {table} table was full", value=overflow
        )
    yield CounterMetricFamily(
        "nfacct_faults", "faults the daemon survived (`nfacct status` names each kind)", value=h.faults
    )


class Metrics:
    """The daemon's metrics: the aggregates, and the endpoint serving them."""

    def __init__(
        self,
        address: tuple[str, int],
        snapshot: Callable[[], list[dict]],
        health: Callable[[], Health],
        faults: Faults,
        selector: selectors.BaseSelector,
        share: bool = False,
    ):
        """`snapshot` gives every task with its counters (what `top` shows), `health` the
        daemon's own figures, both as of now; `share`: a takeover's successor listens beside
        its predecessor until that one exits."""
        self.snapshot, self.health, self.faults = snapshot, health, faults
        self.aggregates = Aggregates()
        self._loop_seconds = self._render_seconds = 0.0
        self.endpoint = scrape.Endpoint(address, self.prepare, selector, faults, share)
        log.info("Prometheus metrics at http://%s:%d%s", *self.endpoint.address, scrape.PATH)

    def baseline(self) -> None:
        """Take the tasks the daemon starts with (restored or handed over) as counted."""
        self.aggregates.baseline(self.snapshot())

    def refresh(self) -> None:
        """Fold the tasks' counts in now; before a GC, so that nothing it drops goes unfolded."""
        try:
            self.aggregates.fold(self.snapshot())
        except Exception as e:  # a bug must not stop the GC that follows
            self.faults.record("metrics fold", e)

    def prepare(self) -> scrape.Render:
        """In the loop: fold, and copy what the worker thread will render."""
        start = time.perf_counter()
        self.aggregates.fold(self.snapshot())
        frozen = Frozen(
            traffic=[(labels, list(total)) for labels, total in self.aggregates.totals.items()],
            health=self.health(),
            label_set_limit=self.aggregates.limit,
            answered=self.endpoint.answered,
            dropped=self.endpoint.dropped,
            loop_seconds=self._loop_seconds,
            render_seconds=self._render_seconds,
        )
        self._loop_seconds = time.perf_counter() - start
        return lambda: self._render(frozen)

    def _render(self, frozen: Frozen) -> tuple[bytes, str]:
        """In the worker thread: text from the copy, and the daemon's CPU and memory."""
        start = time.perf_counter()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(frozen))
        ProcessCollector(registry=registry)
        body = generate_latest(registry)
        self._render_seconds = time.perf_counter() - start
        return body, CONTENT_TYPE_LATEST

    def work(self) -> None:
        self.endpoint.work()

    def close(self) -> None:
        self.endpoint.close()
