"""netatop's two tables: sockinfo (one per flow) and taskinfo (one per process), with their
garbage collection and memory limits.

Every sockinfo points at a counter array: its own temporary one while the owner is unknown
(netatop's "temporary counters"), the owning task's once it is known, or the engine's
unidentified totals if the owner could not be found. A packet is therefore counted with one
index operation, and nothing is lost while attribution is in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .packet import TCP

COUNTER_NAMES = (
    "tcpsndpacks", "tcpsndbytes", "tcprcvpacks", "tcprcvbytes",
    "udpsndpacks", "udpsndbytes", "udprcvpacks", "udprcvbytes",
)  # fmt: skip
NCOUNTERS = len(COUNTER_NAMES)

# Flow key: (proto, local address, local port, remote address, remote port, netns). `netns` names
# the namespace the flow lives in (None: the daemon's own): two namespaces may both have a flow
# 127.0.0.1:5000 → 127.0.0.1:80, and they are two flows. It comes last so that the fields before
# it keep their places. The kernel's view of a flow (nfacct.flowsets) is the first five.
FlowKey = tuple[int, bytes, int, bytes, int, str | None]
Flow = tuple[int, bytes, int, bytes, int]  # a flow as the kernel's flow sets know it: no namespace


def counter_base(proto: int) -> int:
    """Index of the first counter of a protocol: tcp 0..3, udp 4..7."""
    return 0 if proto == TCP else 4


def new_counters() -> list[int]:
    return [0] * NCOUNTERS


def add_counters(into: list[int], source: list[int]) -> None:
    for i in range(NCOUNTERS):
        into[i] += source[i]


SHARED_ADDRESSES = 65_536
GC_PAUSE_EVERY = 8192  # sockinfos a GC sweep looks at between pauses: 10-25 ms
PENDING_HORIZON = 10.0  # seconds: longer than the resolver's retries, so GC never races a lookup


@dataclass
class GcConfig:
    """netatop's defaults; all seconds."""

    cycle: float = 15.0
    tcp_idle: float = 30 * 60.0
    udp_idle: float = 16.0  # UDP sockinfo whose local port is above 1024
    unreferenced_idle: float = 60.0  # owner unknown or exited
    closed_idle: float = 2.0  # the kernel reported the socket destroyed
    max_sockinfo: int = 200_000
    max_taskinfo: int = 50_000


@dataclass(eq=False)
class TaskInfo:
    pid: int
    btime: float
    comm: str
    cmdline: str
    uid: int
    cgroup: str = ""
    counters: list[int] = field(default_factory=new_counters)
    netns: str | None = None  # the namespace of its first attributed flow (None: the daemon's own)
    exit_time: float | None = None
    saved: list[int] | None = None  # counters as last written to exited_tasks
    checkpointed: list[int] | None = None  # counters as last written to live_tasks
    socks: set = field(default_factory=set)  # keys of the sockinfos counting for us

    def as_dict(self) -> dict:
        d = {
            "pid": self.pid,
            "btime": self.btime,
            "comm": self.comm,
            "cmdline": self.cmdline,
            "uid": self.uid,
            "cgroup": self.cgroup,
            "netns": self.netns,
        }
        d.update(zip(COUNTER_NAMES, self.counters, strict=True))
        return d

    def row(self) -> dict:
        """The task as a row of exited_tasks / live_tasks (comm is stored as `command`)."""
        d = self.as_dict()
        d["command"] = d.pop("comm")
        if self.exit_time is not None:
            d["exit_time"] = self.exit_time
        return d

    @property
    def total(self) -> int:
        return sum(self.counters[1::2])


NO_UID = -1  # the queue did not say whose socket sent or received the packet


class SockInfo:
    __slots__ = ("closed", "counters", "flow", "key", "last_seen", "offload", "state", "task", "uid")

    # PENDING: owner being looked up, counting on temporary counters. RESOLVED: counting for
    # `task`. ORPHANED: `task` exited while the socket may live on in another process; the next
    # packet asks again. RECHECK: that question is in flight. UNIDENTIFIED: nobody found.
    # ORPHANED and RECHECK count on temporary counters too: they go to whoever the re-check
    # finds, or back to `task` if nobody holds the socket any more.
    PENDING, RESOLVED, ORPHANED, RECHECK, UNIDENTIFIED = (
        "pending",
        "resolved",
        "orphaned",
        "recheck",
        "unidentified",
    )

    def __init__(self, key: FlowKey, now: float, uid: int = NO_UID):
        self.key = key
        self.counters = new_counters()
        # The flow's own count, whoever it counts for: (out packets, out bytes, in packets, in
        # bytes), queued packets and offload readings alike. For `nfacct sockets`; it cost 103
        # bytes a flow (bench/modes.py's 100,000 flows: 132.6 → 142.1 MiB for 96,622).
        self.flow = [0, 0, 0, 0]
        self.task: TaskInfo | None = None
        self.state = SockInfo.PENDING
        self.last_seen = now
        self.closed = False
        self.uid = uid  # the socket's owner uid, as the queue reported it: the unidentified bucket
        # Offloaded: the flow's set elements count it in the kernel. Their readings credited so far
        # (out packets, out bytes, in packets, in bytes); None while the queue brings its packets.
        self.offload: list[int] | None = None

    def resolve(self, task: TaskInfo) -> None:
        """Count for `task` from now on: temporary counters move to it; a previous owner keeps its own."""
        if self.state in (SockInfo.PENDING, SockInfo.ORPHANED, SockInfo.RECHECK):
            add_counters(task.counters, self.counters)
        if self.task is not None:
            self.task.socks.discard(self.key)
        task.socks.add(self.key)
        self.task, self.counters, self.state = task, task.counters, SockInfo.RESOLVED

    def give_up(self, unidentified: list[int]) -> None:
        if self.state == SockInfo.PENDING:
            add_counters(unidentified, self.counters)
            self.counters, self.state = unidentified, SockInfo.UNIDENTIFIED
        elif self.state in (SockInfo.ORPHANED, SockInfo.RECHECK):
            # A re-check found nobody new: late packets (FIN, ACK) count for the old owner.
            add_counters(self.task.counters, self.counters)
            self.counters, self.state = self.task.counters, SockInfo.RESOLVED

    def orphan(self) -> None:
        """The owner exited: count on temporary counters until a re-check says for whom."""
        self.counters, self.state = new_counters(), SockInfo.ORPHANED

    def recheck(self) -> None:
        """A lookup is asked again: count on temporary counters until it answers. If it finds
        nobody, they go back where they went before (`give_up`): the old owner, or unidentified."""
        if self.state != SockInfo.ORPHANED:
            self.counters = new_counters()
        self.state = SockInfo.RECHECK if self.task is not None else SockInfo.PENDING


SETTLED = (SockInfo.RESOLVED, SockInfo.UNIDENTIFIED)  # no lookup in flight


class Tables:
    def __init__(self, config: GcConfig | None = None) -> None:
        self.config = config or GcConfig()
        self.socks: dict[FlowKey, SockInfo] = {}
        self._addresses: dict[bytes, bytes] = {}  # one object per address (_shared)
        # (proto, local port, netns) → flows
        self._by_port: dict[tuple[int, int, str | None], set[FlowKey]] = {}
        self.tasks: dict[tuple[int, float], TaskInfo] = {}
        self.running: dict[int, TaskInfo] = {}  # pid → task not yet seen exiting
        # Flows nobody could be found for, by the uid of their socket (the queue says it even when
        # no process holds the socket any more): "unidentified, but user 1000's".
        self.unidentified_by_uid: dict[int, list[int]] = {}
        self.sock_overflow = 0
        self.task_overflow = 0
        self.gc_runs = 0
        self.gc_removed_socks = 0
        self.gc_removed_tasks = 0
        # Offloaded flows whose elements must go (their socket closed, or GC would drop them):
        # the daemon reads their last counts as it removes them (nfacct.offload).
        self.withdraw: set[FlowKey] = set()
        # Offloaded flows GC would drop, with their last_seen then: dropped as their elements go,
        # unless a packet came meanwhile (withdrawals take several loop turns: see nfacct.service).
        self.drop_withdrawn: dict[FlowKey, float] = {}
        self.offload_again: list[FlowKey] = []  # settled flows on the queue path, seen by GC

    def task(
        self,
        pid: int,
        btime: float,
        comm: str,
        cmdline: str,
        uid: int,
        cgroup: str = "",
        netns: str | None = None,
    ) -> TaskInfo | None:
        """The task (pid, btime), created if new; None when the table is full (counted as overflow)."""
        key = (pid, btime)
        task = self.tasks.get(key)
        if task is None:
            if len(self.tasks) >= self.config.max_taskinfo:
                self.task_overflow += 1
                return None
            task = self.tasks[key] = TaskInfo(pid, btime, comm, cmdline, uid, cgroup, netns=netns)
            self.running[pid] = task
        return task

    def restore(self, task: TaskInfo) -> None:
        """Take back a task from a checkpoint (its counters continue)."""
        self.tasks[(task.pid, task.btime)] = task
        if task.exit_time is None:
            self.running[task.pid] = task

    def exited(self, task: TaskInfo, when: float) -> None:
        """The process ended; sockets it held may live on in a child or a receiver of its fds."""
        if task.exit_time is not None:
            return
        task.exit_time = when
        if self.running.get(task.pid) is task:
            del self.running[task.pid]
        for key in task.socks:
            si = self.socks.get(key)
            if si is not None and not si.closed:
                si.orphan()
                if si.offload is not None:  # the next packet must reach us, to ask who holds it now
                    self.withdraw.add(key)

    def unidentified_for(self, uid: int) -> list[int]:
        """The counters of unidentified traffic of `uid` (NO_UID: unknown)."""
        bucket = self.unidentified_by_uid.get(uid)
        if bucket is None:
            bucket = self.unidentified_by_uid[uid] = new_counters()
        return bucket

    @property
    def unidentified(self) -> list[int]:
        """Unidentified traffic of every uid together (a sum: to read, not to count into)."""
        total = new_counters()
        for bucket in self.unidentified_by_uid.values():
            add_counters(total, bucket)
        return total

    def add_sock(self, key: FlowKey, now: float, uid: int = NO_UID) -> SockInfo:
        key = self._shared(key)
        si = self.socks[key] = SockInfo(key, now, uid)
        self._by_port.setdefault((key[0], key[2], key[5]), set()).add(key)
        return si

    def _shared(self, key: FlowKey) -> FlowKey:
        """`key` with the address objects of the flows before it: a host's flows repeat a few
        addresses; a flow's own two took 74 of its 786 bytes (tracemalloc, 100,000 flows)."""
        shared = self._addresses
        if len(shared) >= SHARED_ADDRESSES:  # many peers: start again rather than grow
            shared.clear()
        local, remote = shared.setdefault(key[1], key[1]), shared.setdefault(key[3], key[3])
        return (key[0], local, key[2], remote, *key[4:])

    def withdrawn(self, si: SockInfo) -> None:
        """The flow's elements are gone, its last counts credited: its packets come to us again,
        and GC drops it now if it wanted to and no packet came since."""
        si.offload = None
        marked = self.drop_withdrawn.pop(si.key, None)
        if marked is not None and marked == si.last_seen:
            self.remove_sock(si)
            self.gc_removed_socks += 1

    def remove_sock(self, si: SockInfo) -> None:
        # Temporary counters are never dropped: a re-check still out gives them to the old
        # owner, a first lookup still out to the unidentified totals.
        self.drop_withdrawn.pop(si.key, None)
        if si.state in (SockInfo.PENDING, SockInfo.ORPHANED, SockInfo.RECHECK):
            si.give_up(self.unidentified_for(si.uid))
        del self.socks[si.key]
        port = (si.key[0], si.key[2], si.key[5])
        keys = self._by_port[port]
        keys.discard(si.key)
        if not keys:
            del self._by_port[port]
        if si.task is not None:
            si.task.socks.discard(si.key)

    def closed(
        self, netns: str | None, proto: int, local: bytes, lport: int, remote: bytes, rport: int
    ) -> int:
        """The kernel freed this socket of namespace `netns`: mark the flows it served (GC
        removes them soon)."""
        marked = 0
        for key in self._by_port.get((proto, lport, netns), ()):
            _p, k_local, _lp, k_remote, k_rport, _ns = key
            if (local == k_local or not any(local)) and (
                rport == 0 or (remote == k_remote and rport == k_rport)
            ):
                self._close(self.socks[key])
                marked += 1
        return marked

    def close_all_but(self, netns: str | None, live: set[tuple[int, int]]) -> None:
        """Dump fallback: flows of namespace `netns` whose (proto, local port) no socket holds
        any more are closed."""
        for (proto, lport, ns), keys in self._by_port.items():
            if ns == netns and (proto, lport) not in live:
                for key in keys:
                    self._close(self.socks[key])

    def _close(self, si: SockInfo) -> None:
        si.closed = True
        if si.offload is not None:  # late packets (and a new socket on the port) come to us again
            self.withdraw.add(si.key)

    def gc(self, now: float | None = None, pause: Callable[[], None] = lambda: None) -> None:
        """Drop idle sockinfos (netatop's rules) and exited tasks that are saved and unreferenced.
        `pause` is called every GC_PAUSE_EVERY sockinfos looked at (the daemon serves its queues
        there: looking at 100,000 took most of a 270-290 ms GC cycle)."""
        now = time.monotonic() if now is None else now
        cfg = self.config
        self.gc_runs += 1
        for n, si in enumerate(list(self.socks.values()), 1):
            if n % GC_PAUSE_EVERY == 0:
                pause()  # packets may add flows and touch these: none goes away meanwhile
            idle = now - si.last_seen
            proto, _local, lport = si.key[:3]
            if si.state in (SockInfo.PENDING, SockInfo.RECHECK) and idle < PENDING_HORIZON:
                continue  # its lookup is still retrying; the answer would find nothing to apply to
            if (
                (si.closed and idle >= cfg.closed_idle)
                or ((si.task is None or si.task.exit_time is not None) and idle >= cfg.unreferenced_idle)
                or (proto == TCP and idle >= cfg.tcp_idle)
                or (proto != TCP and lport > 1024 and idle >= cfg.udp_idle)
            ):
                if si.offload is not None:
                    self.withdraw.add(si.key)  # its last counts first; dropped then (`withdrawn`)
                    self.drop_withdrawn[si.key] = si.last_seen
                    continue
                self.remove_sock(si)
                self.gc_removed_socks += 1
            elif si.offload is None and idle < cfg.cycle and si.state in SETTLED:
                # Settled, and its packets still come to the queue: the sets were full when it
                # settled, or it lost its elements to an idle spell it has ended. Offer it again.
                self.offload_again.append(si.key)
        for key, task in list(self.tasks.items()):
            if task.exit_time is not None and not task.socks and task.saved == task.counters:
                del self.tasks[key]
                self.gc_removed_tasks += 1

    def status(self) -> dict:
        states = dict.fromkeys(
            (SockInfo.PENDING, SockInfo.RESOLVED, SockInfo.ORPHANED, SockInfo.RECHECK, SockInfo.UNIDENTIFIED),
            0,
        )
        for si in self.socks.values():
            states[si.state] += 1
        return {
            "sockinfo": len(self.socks),
            "sockinfo_by_state": states,
            "sockinfo_closed": sum(si.closed for si in self.socks.values()),
            "sockinfo_offloaded": sum(si.offload is not None for si in self.socks.values()),
            "taskinfo": len(self.tasks),
            "taskinfo_exited": sum(t.exit_time is not None for t in self.tasks.values()),
            "sockinfo_overflow": self.sock_overflow,
            "taskinfo_overflow": self.task_overflow,
            "gc_runs": self.gc_runs,
            "gc_removed_sockinfo": self.gc_removed_socks,
            "gc_removed_taskinfo": self.gc_removed_tasks,
            "unidentified": dict(zip(COUNTER_NAMES, self.unidentified, strict=True)),
            "unidentified_by_uid": {
                str(uid): dict(zip(COUNTER_NAMES, bucket, strict=True))
                for uid, bucket in sorted(self.unidentified_by_uid.items())
                if any(bucket)
            },
        }

    # ---- handover: the whole table state, for a successor daemon (see nfacct.takeover) ---------

    def export(self) -> dict:
        """Tasks and sockinfos as JSON-ready data, in HANDOVER_FORMAT; counters a sockinfo shares
        with its task are not repeated."""
        tasks = list(self.tasks.values())
        index = {id(t): i for i, t in enumerate(tasks)}
        socks = []
        for si in self.socks.values():
            proto, local, lport, remote, rport, netns = si.key
            own = si.state in (SockInfo.PENDING, SockInfo.ORPHANED, SockInfo.RECHECK)
            socks.append(
                {
                    "key": [proto, local.hex(), lport, remote.hex(), rport, netns],
                    "state": si.state,
                    "counters": si.counters if own else None,
                    "task": index[id(si.task)] if si.task is not None else None,
                    "last_seen": si.last_seen,
                    "closed": si.closed,
                    "uid": si.uid,
                    "offload": si.offload,
                    "flow": si.flow,
                }
            )
        return {
            "format": HANDOVER_FORMAT,
            "tasks": [{**vars(t), "socks": None} for t in tasks],
            "socks": socks,
            "unidentified_by_uid": {str(uid): bucket for uid, bucket in self.unidentified_by_uid.items()},
        }

    def load(self, state: dict) -> list[FlowKey]:
        """Take over an exported state; returns the flows whose owner must (again) be looked up."""
        check_handover_format(state.get("format", 1))
        tasks = []
        for d in state["tasks"]:
            task = TaskInfo(**{**d, "socks": set()})
            self.restore(task)
            tasks.append(task)
        for uid, bucket in state["unidentified_by_uid"].items():
            add_counters(self.unidentified_for(int(uid)), bucket)
        lookups = []
        for d in state["socks"]:
            proto, local, lport, remote, rport, netns = d["key"]
            key = (proto, bytes.fromhex(local), lport, bytes.fromhex(remote), rport, netns)
            si = self.add_sock(key, d["last_seen"], d["uid"])
            si.closed = d["closed"]
            si.offload = d["offload"]
            si.flow = d["flow"]
            si.task = tasks[d["task"]] if d["task"] is not None else None
            if si.task is not None:
                si.task.socks.add(key)
            st = d["state"]
            if st == SockInfo.RESOLVED:
                si.state, si.counters = st, si.task.counters
            elif st == SockInfo.UNIDENTIFIED:
                si.state, si.counters = st, self.unidentified_for(si.uid)
            else:  # its lookup was the predecessor's: ask again
                si.state = SockInfo.ORPHANED if st == SockInfo.RECHECK else st
                si.counters = d["counters"]
                if st == SockInfo.PENDING:
                    lookups.append(key)
        return lookups


# The layout of `export()`. A daemon refuses to take over tables of another format (an upgrade
# that changes them restarts instead, and the gap is recorded); format 1 was positional lists.
# 3: unidentified traffic by uid; 4: offloaded flows' credited readings; 5: each flow's own count;
# 6: flows and tasks say their netns
HANDOVER_FORMAT = 6


class HandoverError(Exception):
    """Tables handed over in a format this nfacct cannot read; one line for the user."""


def check_handover_format(found: object) -> None:
    if found != HANDOVER_FORMAT:
        raise HandoverError(
            f"the running daemon hands its tables over in format {found}, this nfacct reads format"
            f" {HANDOVER_FORMAT}: restart it instead of --takeover (the packets passing meanwhile are"
            " recorded as unaccounted)"
        )
