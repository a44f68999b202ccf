"""netatop's two tables: sockinfo (one per flow) and taskinfo (one per process).

Every sockinfo points at a counter array: its own temporary one while the owner is unknown
(netatop's "temporary counters"), the owning task's once it is known, or the engine's
unidentified totals if the owner could not be found. A packet is therefore counted with one
index operation, and nothing is lost while attribution is in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .packet import TCP

COUNTER_NAMES = (
    "tcpsndpacks", "tcpsndbytes", "tcprcvpacks", "tcprcvbytes",
    "udpsndpacks", "udpsndbytes", "udprcvpacks", "udprcvbytes",
)  # fmt: skip
NCOUNTERS = len(COUNTER_NAMES)

# Flow key: (proto, local address, local port, remote address, remote port).
FlowKey = tuple[int, bytes, int, bytes, int]


def counter_base(proto: int) -> int:
    """Index of the first counter of a protocol: tcp 0..3, udp 4..7."""
    return 0 if proto == TCP else 4


def new_counters() -> list[int]:
    return [0] * NCOUNTERS


def add_counters(into: list[int], source: list[int]) -> None:
    for i in range(NCOUNTERS):
        into[i] += source[i]


@dataclass
class TaskInfo:
    pid: int
    btime: float
    comm: str
    cmdline: str
    uid: int
    counters: list[int] = field(default_factory=new_counters)
    first_seen: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        d = {
            "pid": self.pid,
            "btime": self.btime,
            "comm": self.comm,
            "cmdline": self.cmdline,
            "uid": self.uid,
        }
        d.update(zip(COUNTER_NAMES, self.counters, strict=True))
        return d


class SockInfo:
    __slots__ = ("counters", "key", "last_seen", "state", "task")

    PENDING, RESOLVED, UNIDENTIFIED = "pending", "resolved", "unidentified"

    def __init__(self, key: FlowKey, now: float):
        self.key = key
        self.counters = new_counters()
        self.task: TaskInfo | None = None
        self.state = SockInfo.PENDING
        self.last_seen = now

    def resolve(self, task: TaskInfo) -> None:
        """Hand the temporary counters to the task; later packets count for it directly."""
        if self.state == SockInfo.PENDING:
            add_counters(task.counters, self.counters)
        self.task, self.counters, self.state = task, task.counters, SockInfo.RESOLVED

    def give_up(self, unidentified: list[int]) -> None:
        add_counters(unidentified, self.counters)
        self.counters, self.state = unidentified, SockInfo.UNIDENTIFIED


class Tables:
    def __init__(self) -> None:
        self.socks: dict[FlowKey, SockInfo] = {}
        self.tasks: dict[tuple[int, float], TaskInfo] = {}
        self.unidentified = new_counters()

    def task(self, pid: int, btime: float, comm: str, cmdline: str, uid: int) -> TaskInfo:
        key = (pid, btime)
        task = self.tasks.get(key)
        if task is None:
            task = self.tasks[key] = TaskInfo(pid, btime, comm, cmdline, uid)
        return task
