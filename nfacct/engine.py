"""The engine: packet → flow → sockinfo → taskinfo, and the counters `status` reports.

`account()` is the whole per-packet path and does no I/O: it parses, finds or creates the
flow's sockinfo and adds to whatever counter array that sockinfo points at. New flows are
handed to the resolver; its answers are applied by `apply_answers()` in the same thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from .packet import ICMP, ICMPV6, TCP, UDP, Malformed, parse
from .resolver import Answer
from .tables import GcConfig, SockInfo, Tables, counter_base

PROTO_NAMES = {TCP: "tcp", UDP: "udp", ICMP: "icmp", ICMPV6: "icmp"}
FRAGMENT_MEMORY = 4096  # first fragments remembered, to attribute the fragments that follow


class Engine:
    def __init__(self, submit=None, config: GcConfig | None = None):
        """`submit(key, ifindex)` receives each flow whose owner must be looked up."""
        self.tables = Tables(config)
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

    def account(self, data: bytes, outgoing: bool, ifindex: int = 0, now: float | None = None) -> None:
        self.packets += 1
        p = parse(data)
        if type(p) is Malformed:
            self.malformed[p.reason] = self.malformed.get(p.reason, 0) + 1
            return
        proto = p.proto
        stats = self.by_proto["out" if outgoing else "in"][PROTO_NAMES.get(proto, "other")]
        stats[0] += 1
        stats[1] += p.length
        if proto != TCP and proto != UDP:
            return
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
                    return
                sport, dport = ports
        if outgoing:
            key = (proto, p.src, sport, p.dst, dport)
        else:
            key = (proto, p.dst, dport, p.src, sport)
        tables = self.tables
        si = tables.socks.get(key)
        if now is None:
            now = time.monotonic()
        slot = counter_base(proto) + (0 if outgoing else 2)
        if si is None:
            if len(tables.socks) >= tables.config.max_sockinfo:
                tables.sock_overflow += 1
                c = tables.unidentified
                c[slot] += 1
                c[slot + 1] += p.length
                return
            si = tables.add_sock(key, now)
            self.submit(key, ifindex)
        else:
            si.last_seen = now
            if si.state == SockInfo.ORPHANED:
                si.state = SockInfo.RECHECK
                self.submit(key, ifindex)
        c = si.counters
        c[slot] += 1
        c[slot + 1] += p.length

    def apply_answers(self, answers: list[Answer]) -> None:
        tables = self.tables
        for answer in answers:
            si = tables.socks.get(answer.key)
            if si is None:
                continue
            f = answer.facts
            if answer.via_listener and si.state != SockInfo.PENDING:
                f = None  # a re-check: late packets of a closed socket stay with its exited owner
            task = None if f is None else tables.task(f.pid, f.btime, f.comm, f.cmdline, f.uid, f.cgroup)
            if task is None:
                si.give_up(tables.unidentified)
            else:
                si.resolve(task)

    def status(self) -> dict:
        return {
            "packets": self.packets,
            "by_protocol": self.by_proto,
            "malformed": dict(self.malformed),
            "malformed_total": sum(self.malformed.values()),
            "unattributed_fragments": self.unattributed_fragments,
            **self.tables.status(),
            "errors": self.errors,
        }
