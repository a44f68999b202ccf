"""What `nfacct top` shows, computed from two polls of the daemon: pure, no terminal, no socket.

A poll is a `Snapshot` (the daemon's `top` and `status` answers). `rows` compares two of them:
each process's bytes since the previous poll, divided by the time between the daemon's two
answers, is its rate; processes are grouped by process, command, user, cgroup, unit (the
container or systemd unit of the cgroup: `units`) or network namespace, and sorted by current
rate. `display.top_screen` lays them out for a terminal.

A process appears in the daemon's table at its first packet and leaves it after its exit, once
written to the database and its flows are collected (the GC cycle, 15 s by default). One that
left between two polls, having been running at the first, is shown once more, marked exited,
with its last known totals and no rate: the bytes of its last moments were counted by the
daemon and written to the database (`nfacct history`), but not seen here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import units
from .tables import COUNTER_NAMES

GROUPINGS = ("process", "command", "user", "cgroup", "unit", "netns")
# s: the cgroup (systemd service or slice); t: its unit or container (nfacct.units); n: the network namespace
KEYS = {"p": "process", "c": "command", "u": "user", "s": "cgroup", "t": "unit", "n": "netns"}
OWN_NETNS = "(own)"  # how the daemon's own namespace is shown
EXITED_NOW = "X"  # exited since the previous poll
EXITED_BEFORE = "x"  # exited earlier, still in the daemon's table
SEND = ("tcpsndbytes", "udpsndbytes")
RECV = ("tcprcvbytes", "udprcvbytes")


@dataclass(frozen=True)
class Snapshot:
    """One poll: the daemon's clock at its `top` answer, its tasks, and its `status` answer."""

    time: float
    tasks: list[dict]
    status: dict

    @classmethod
    def from_answers(cls, top: dict, status: dict) -> Snapshot:
        return cls(top["time"], top["tasks"], status)


@dataclass
class Row:
    """One line of the table: a process, or a group of processes."""

    label: str  # command, user name, cgroup path or unit, as the daemon gave it (escaped when shown)
    pid: int | None = None  # the process grouping only
    unit: str = ""  # the process grouping only: units.shown
    user: str = ""  # the process grouping only
    cmdline: str = ""  # the process grouping only
    processes: int = 0
    state: str = ""  # EXITED_NOW if one of them exited since the previous poll; EXITED_BEFORE if all had
    send_rate: float | None = None  # bytes per second since the previous poll; None if unknown
    recv_rate: float | None = None
    sent: int = 0  # bytes, as far as the daemon counted them
    received: int = 0

    @property
    def rate(self) -> float:
        return (self.send_rate or 0.0) + (self.recv_rate or 0.0)


def _bytes(task: dict, names: Iterable[str]) -> int:
    return sum(task[n] for n in names)


def _key(task: dict) -> tuple[int, float]:
    return task["pid"], task["btime"]


def _label(task: dict, by: str, user_name: Callable[[int], str]) -> str:
    if by == "user":
        return user_name(task["uid"])
    if by == "cgroup":
        return task["cgroup"] or "(unknown cgroup)"
    if by == "unit":
        return units.shown(task["cgroup"])
    if by == "netns":
        return task.get("netns") or OWN_NETNS
    return task["comm"]


def rows(prev: Snapshot | None, cur: Snapshot, by: str, user_name: Callable[[int], str] = str) -> list[Row]:
    """The rows for grouping `by`, fastest first (then biggest totals, then label)."""
    if by not in GROUPINGS:
        raise ValueError(f"cannot group by {by!r}: use one of {', '.join(GROUPINGS)}")
    elapsed = None if prev is None else cur.time - prev.time
    before = {} if prev is None else {_key(t): t for t in prev.tasks}
    seen = {_key(t) for t in cur.tasks}
    # Running at the previous poll and gone now: exited in between (see the module's doc).
    gone = [t for k, t in before.items() if k not in seen and t.get("exit_time") is None]
    groups: dict[object, Row] = {}
    states: dict[object, list[str]] = {}
    for task, present in [*((t, True) for t in cur.tasks), *((t, False) for t in gone)]:
        label = _label(task, by, user_name)
        gkey = _key(task) if by == "process" else label
        row = groups.get(gkey)
        if row is None:
            row = groups[gkey] = Row(label)
            states[gkey] = []
            if by == "process":
                row.pid, row.user, row.cmdline = task["pid"], user_name(task["uid"]), task["cmdline"]
                row.unit = units.shown(task["cgroup"])
        row.processes += 1
        row.sent += _bytes(task, SEND)
        row.received += _bytes(task, RECV)
        exit_time = task.get("exit_time")
        if not present or (exit_time is not None and (prev is None or exit_time > prev.time)):
            states[gkey].append(EXITED_NOW)
        else:
            states[gkey].append(EXITED_BEFORE if exit_time is not None else "")
        if present and elapsed is not None and elapsed > 0:
            old = before.get(_key(task), dict.fromkeys(COUNTER_NAMES, 0))
            send, recv = _bytes(task, SEND) - _bytes(old, SEND), _bytes(task, RECV) - _bytes(old, RECV)
            if send >= 0 and recv >= 0:  # lower than before: a restarted daemon lost some; unknown
                row.send_rate = (row.send_rate or 0.0) + send / elapsed
                row.recv_rate = (row.recv_rate or 0.0) + recv / elapsed
    for gkey, row in groups.items():
        if EXITED_NOW in states[gkey]:
            row.state = EXITED_NOW
        elif all(s == EXITED_BEFORE for s in states[gkey]):
            row.state = EXITED_BEFORE
    return sorted(groups.values(), key=lambda r: (-r.rate, -(r.sent + r.received), r.label, r.pid or 0))


@dataclass(frozen=True)
class Health:
    """The engine's figures for the header; None where the daemon cannot know."""

    packets: int
    unaccounted: int | None
    unidentified: int
    malformed: int
    queue_drops: int | None


def health(status: dict) -> Health:
    eng = status["engine"]
    drops = None
    # Every namespace's queue (a daemon older than several namespaces: its one queue).
    queues = [ns["queue"] for ns in status.get("namespaces", [])] or [status["queue"]]
    found = [q for q in queues if "queue_dropped" in q]  # the kernel's line for the queue was found
    if found:
        drops = sum(q["queue_dropped"] + q["user_dropped"] for q in found)
    return Health(
        packets=eng["packets"],
        unaccounted=status.get("unaccounted", status.get("coverage", {}).get("unaccounted")),
        unidentified=sum(v for k, v in eng["unidentified"].items() if k.endswith("packs")),
        malformed=eng["malformed_total"],
        queue_drops=drops,
    )
