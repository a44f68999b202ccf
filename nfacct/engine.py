"""The engine: packet → flow → sockinfo → taskinfo, and the counters `status` reports.

`account()` is the whole per-packet path and does no I/O: it parses, finds or creates the
flow's sockinfo and adds to whatever counter array that sockinfo points at. New flows are
handed to the resolver; its answers are applied by `apply_answers()` in the same thread.

The engine owns its tables: the daemon tells it what happened (a process exited or exec'd, a
socket was destroyed, time passed) and asks what to write, and the tables change only here.

Offload: a flow whose owner is settled is handed to the kernel (`take_offloadable`), whose set
elements count it from then on; their readings come back through `credit`, which adds what
they counted since the last reading wherever the flow's packets go. Which flows are in the
kernel, and how much of their elements' counts is credited, lives here; the netlink side is
nfacct.offload.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from .faults import Faults
from .packet import ICMP, ICMPV6, TCP, UDP, Malformed, parse
from .procs import ProcessFacts
from .resolver import Answer
from .tables import NO_UID, SETTLED, FlowKey, GcConfig, SockInfo, Tables, TaskInfo, counter_base

PROTO_NAMES = {TCP: "tcp", UDP: "udp", ICMP: "icmp", ICMPV6: "icmp"}
FRAGMENT_MEMORY = 4096  # first fragments remembered, to attribute the fragments that follow


class Engine:
    def __init__(self, submit=None, config: GcConfig | None = None, faults: Faults | None = None):
        """`submit(key, ifindex)` receives each flow whose owner must be looked up."""
        self.tables = Tables(config)
        self.faults = faults or Faults()
        self.submit = submit or (lambda key, ifindex: None)
        self.packets = 0
        self.errors = 0
        # [direction][protocol name] = [packets, bytes]
        self.by_proto: dict[str, dict[str, list[int]]] = {
            d: {p: [0, 0] for p in ("tcp", "udp", "icmp", "other")} for d in ("in", "out")
        }
        self.malformed: dict[str, int] = {}
        self.unattributed_fragments = 0
        self._fragments: OrderedDict[tuple, tuple[int, int]] = OrderedDict()
        self._offloadable: list[FlowKey] = []  # settled since the last take_offloadable
        # [direction][protocol name] = [packets, bytes] the flow sets counted (credited so far)
        self.offloaded = {d: {p: [0, 0] for p in ("tcp", "udp")} for d in ("in", "out")}
        self.credited: set[FlowKey] = set()  # offload readings changed since the last checkpoint
        self.forgotten: set[FlowKey] = set()  # flows out of the kernel since the last checkpoint

    def account(
        self,
        data: bytes,
        outgoing: bool,
        ifindex: int = 0,
        now: float | None = None,
        length: int | None = None,
        uid: int = NO_UID,
        netns: str | None = None,
    ) -> bool:
        """Count one packet of namespace `netns` (`length`: its real length, if known; see
        `packet.parse`); True when it made its flow's owner be looked up (a new flow, or a flow
        whose socket may have changed hands)."""
        self.packets += 1
        p = parse(data, length)
        if type(p) is Malformed:
            self.malformed[p.reason] = self.malformed.get(p.reason, 0) + 1
            return False
        proto = p.proto
        stats = self.by_proto["out" if outgoing else "in"][PROTO_NAMES.get(proto, "other")]
        stats[0] += 1
        stats[1] += p.length
        if proto != TCP and proto != UDP:
            return False
        sport, dport = p.sport, p.dport
        if p.frag_id >= 0:
            frag_key = (p.src, p.dst, p.frag_id, proto)
            if p.first_fragment:
                self._fragments[frag_key] = (sport, dport)
                if len(self._fragments) > FRAGMENT_MEMORY:
                    self._fragments.popitem(last=False)
            else:
                ports = self._fragments.get(frag_key)
                if ports is None:
                    self.unattributed_fragments += 1
                    return False
                sport, dport = ports
        if outgoing:
            key = (proto, p.src, sport, p.dst, dport, netns)
        else:
            key = (proto, p.dst, dport, p.src, sport, netns)
        tables = self.tables
        si = tables.socks.get(key)
        if now is None:
            now = time.monotonic()
        way = 0 if outgoing else 2  # the direction's place in a flow's count and a protocol's counters
        slot = counter_base(proto) + way
        if si is None:
            if len(tables.socks) >= tables.config.max_sockinfo:
                tables.sock_overflow += 1
                c = tables.unidentified_for(uid)
                c[slot] += 1
                c[slot + 1] += p.length
                return False
            si = tables.add_sock(key, now, uid)
            self.submit(key, ifindex)
            asked = True
        else:
            si.last_seen = now
            if si.uid == NO_UID:  # the first packets may come before the kernel knows the socket
                si.uid = uid
            asked = si.state == SockInfo.ORPHANED or (si.closed and si.state in SETTLED)
            if asked:
                # The owner exited, or the kernel freed the socket, yet the flow goes on: its
                # socket lives on elsewhere, or a new socket took the port. Ask again; until the
                # answer, count apart (late packets of the old socket go back to its owner).
                si.recheck()
                self.submit(key, ifindex)
        c = si.counters
        c[slot] += 1
        c[slot + 1] += p.length
        f = si.flow
        f[way] += 1
        f[way + 1] += p.length
        return asked

    def failed(self, exc: Exception) -> None:
        """`account` raised (a bug): the packet had its verdict; count it, log the kind once."""
        self.errors += 1
        self.faults.record("engine", exc)

    def apply_answers(self, answers: list[Answer]) -> None:
        tables = self.tables
        for answer in answers:
            si = tables.socks.get(answer.key)
            if si is None:
                continue
            f = answer.facts
            if answer.via_listener and si.state != SockInfo.PENDING:
                f = None  # a re-check: late packets of a closed socket stay with its exited owner
            task = (
                None
                if f is None
                else tables.task(f.pid, f.btime, f.comm, f.cmdline, f.uid, f.cgroup, answer.key[5])
            )
            if task is None:
                si.give_up(tables.unidentified_for(si.uid))
            else:
                si.resolve(task)
                si.closed = False  # a live socket holds the flow (again)
            if si.offload is None:
                self._offloadable.append(answer.key)

    # ---- offload: the kernel counts settled flows ----------------------------------------------

    def take_offloadable(self) -> list[FlowKey]:
        """Flows settled since the last call that the kernel may count from now on: their owner
        is known (or known to be nobody), their socket open, their owner running."""
        keys, self._offloadable = self._offloadable + self.tables.offload_again, []
        self.tables.offload_again = []
        socks = self.tables.socks
        out = []
        for key in dict.fromkeys(keys):
            si = socks.get(key)
            if (
                si is not None
                and si.offload is None
                and not si.closed
                and si.state in SETTLED
                and (si.task is None or si.task.exit_time is None)
            ):
                out.append(key)
        return out

    def offloaded_now(self, keys: list[FlowKey]) -> None:
        """These flows' elements are in the kernel, counting from zero."""
        for key in keys:
            si = self.tables.socks.get(key)
            if si is not None:
                si.offload = [0, 0, 0, 0]
                self.credited.add(key)

    def credit(self, key: FlowKey, reading: list[int], now: float) -> None:
        """A reading of a flow's elements, (out packets, out bytes, in packets, in bytes) since they
        were added: what it adds to the last one counts for the flow, wherever its packets go
        (its task, its unidentified bucket, or temporary counters while a lookup is out)."""
        si = self.tables.socks.get(key)
        base = None if si is None else si.offload
        if base is None or reading == base:
            return
        if reading[0] < base[0] or reading[2] < base[2]:  # not the elements we read before
            base = [0, 0, 0, 0]
        proto = key[0]
        slot = counter_base(proto)
        c = si.counters
        name = PROTO_NAMES[proto]
        for direction, i in (("out", 0), ("in", 2)):
            packets, nbytes = reading[i] - base[i], reading[i + 1] - base[i + 1]
            if packets:
                c[slot + i] += packets
                c[slot + i + 1] += nbytes
                si.flow[i] += packets
                si.flow[i + 1] += nbytes
                stats = self.offloaded[direction][name]
                stats[0] += packets
                stats[1] += nbytes
                si.last_seen = now
        si.offload = list(reading)
        self.credited.add(key)

    def credit_element(self, key: FlowKey, i: int, packets: int, nbytes: int, now: float) -> None:
        """A reading of one of the flow's elements (i: 0 the outgoing one, 2 the incoming one)."""
        si = self.tables.socks.get(key)
        if si is not None and si.offload is not None:
            reading = list(si.offload)
            reading[i], reading[i + 1] = packets, nbytes
            self.credit(key, reading, now)

    def adopt(self, key: FlowKey, credited: list[int], now: float) -> None:
        """An element found in the kernel at start whose flow we do not hold: `credited` of its
        reading is already in the totals we continue (the predecessor's checkpoint)."""
        if key not in self.tables.socks:
            si = self.tables.add_sock(key, now)
            si.offload = list(credited)
            self.submit(key, 0)

    def withdrawn(self, key: FlowKey) -> None:
        """The flow's elements are gone (after their last `credit`): its packets come to us again."""
        si = self.tables.socks.get(key)
        if si is not None and si.offload is not None:
            self.tables.withdrawn(si)
            self.forgotten.add(key)

    def take_withdrawals(self, most: int) -> list[FlowKey]:
        """Offloaded flows whose elements must go (socket closed, owner exited, or idle for
        GC), at most `most`; the others wait for the next call."""
        pending, socks, out = self.tables.withdraw, self.tables.socks, []
        while pending and len(out) < most:
            key = pending.pop()
            si = socks.get(key)
            if si is not None and si.offload is not None:
                out.append(key)
        return out

    def offloaded_flows_of(self, tgids: list[int]) -> list[FlowKey]:
        socks, running = self.tables.socks, self.tables.running
        return [
            key
            for tgid in tgids
            if tgid in running
            for key in running[tgid].socks
            if key in socks and socks[key].offload is not None
        ]

    def offloaded_flows(self) -> dict[FlowKey, list[int]]:
        return {key: si.offload for key, si in self.tables.socks.items() if si.offload is not None}

    def flow_counts(self) -> dict[FlowKey, list[int]]:
        """Every flow's own count: (out packets, out bytes, in packets, in bytes)."""
        return {key: si.flow for key, si in self.tables.socks.items()}

    def take_offload_changes(self) -> tuple[dict[FlowKey, list[int]], list[FlowKey]]:
        """Readings credited and flows withdrawn since the last call (for the checkpoint)."""
        socks = self.tables.socks
        credited = {k: socks[k].offload for k in self.credited if k in socks and socks[k].offload is not None}
        forgotten = [k for k in self.forgotten if k not in credited]
        self.credited, self.forgotten = set(), set()
        return credited, forgotten

    def status(self) -> dict:
        return {
            "packets": self.packets,
            "by_protocol": self.by_proto,
            "malformed": dict(self.malformed),
            "malformed_total": sum(self.malformed.values()),
            "unattributed_fragments": self.unattributed_fragments,
            "offloaded_by_protocol": self.offloaded,
            **self.tables.status(),
            "errors": self.errors,
        }

    # ---- what happens to processes and sockets (the daemon's events) -------------------------

    def process_exited(self, tgid: int, now: float) -> None:
        task = self.tables.running.get(tgid)
        if task is not None:
            self.tables.exited(task, now)

    def is_running(self, tgid: int) -> bool:
        return tgid in self.tables.running

    def process_execed(self, facts: ProcessFacts) -> None:
        """A running process exec'd: it keeps its counts under its new name."""
        task = self.tables.running.get(facts.pid)
        if task is not None and abs(facts.btime - task.btime) < 0.01:
            task.comm, task.cmdline = facts.comm, facts.cmdline

    def running_tasks(self) -> list[TaskInfo]:
        return list(self.tables.running.values())

    def socket_closed(
        self, netns: str | None, proto: int, local: bytes, lport: int, remote: bytes, rport: int
    ) -> None:
        self.tables.closed(netns, proto, local, lport, remote, rport)

    def close_all_but(self, netns: str | None, live: set[tuple[int, int]]) -> None:
        self.tables.close_all_but(netns, live)

    def forget_netns(self, netns: str | None) -> int:
        """The namespace is no longer accounted (gone): its flows leave the tables, their counts
        stay with their processes (temporary ones go where `Tables.remove_sock` sends them).
        Their offloaded readings must have been credited and withdrawn first. Returns how many."""
        tables = self.tables
        doomed = [si for key, si in tables.socks.items() if key[5] == netns]
        for si in doomed:
            tables.remove_sock(si)
        tables.withdraw = {k for k in tables.withdraw if k[5] != netns}
        tables.offload_again = [k for k in tables.offload_again if k[5] != netns]
        self._offloadable = [k for k in self._offloadable if k[5] != netns]
        return len(doomed)

    def gc(self, now: float | None = None, pause: Callable[[], None] = lambda: None) -> None:
        self.tables.gc(now, pause)

    # ---- what to show and to write -------------------------------------------------------------

    def top(self) -> list[dict]:
        """Every task, running ones first, biggest talkers first."""
        tasks = sorted(self.tables.tasks.values(), key=lambda t: (t.exit_time is not None, -t.total))
        return [{**t.as_dict(), "exit_time": t.exit_time} for t in tasks]

    def exited_unwritten(self, now: float, grace: float) -> list[TaskInfo]:
        """Exited tasks past their grace whose counters changed since they were last written."""
        return [
            t
            for t in self.tables.tasks.values()
            if t.exit_time is not None and now - t.exit_time >= grace and t.saved != t.counters
        ]

    def running_unwritten(self) -> list[TaskInfo]:
        """Running tasks whose counters changed since the last checkpoint."""
        return [t for t in self.tables.running.values() if t.checkpointed != t.counters]

    def restore(self, task: TaskInfo) -> None:
        """Take back a running task from a checkpoint: its counters continue."""
        self.tables.restore(task)

    def export(self) -> dict:
        return self.tables.export()

    def load(self, state: dict) -> list[FlowKey]:
        return self.tables.load(state)
