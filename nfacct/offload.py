"""Flow offload, the daemon's side: which flows go to the kernel's flow sets, and their
counts back to the engine.

Once a flow's owner is settled, its two elements (nfacct.flowsets) count it in the kernel and
its packets are never queued again. Their readings are credited to the engine (a reading adds
what it counted since the last one), on demand, at checkpoints and as the elements go; a daemon
that starts continues from the elements a predecessor left. docs/offload.md tells the whole story.
"""

from __future__ import annotations

import errno
import os
import time

from .engine import Engine
from .faults import Faults
from .flowsets import Element, FlowSets, OffloadError, elements, flow_of
from .tables import Flow, FlowKey

# A full reading costs about 13 µs per element, 11 of them in the kernel's dump (measured on 6.18:
# 2.7 s for 100,000 flows, two elements each, under load 4.7 on 2 cores). Readings asked for
# by `top` and `status` come at most this often, as a share of the daemon's time, however often
# they are asked: ≤ 1 s stale up to some 7,000 flows, ten times the reading's cost beyond.
READ_SHARE = 0.1
# A reading is taken in steps of this many datagrams (some 430 elements each) per loop turn, so
# that it never holds the queue: taken at once, 150,000 elements stalled the loop 1.5-1.7 s and
# the queue's socket buffer overflowed meanwhile (bench/modes.py, docs/performance.md).
STEP = 4


def _reading(counts: dict[Element, tuple[int, int]], flow: Flow) -> list[int] | None:
    out, inn = elements(flow)
    o, i = counts.get(out), counts.get(inn)
    if o is None and i is None:
        return None
    return [*(o or (0, 0)), *(i or (0, 0))]


def _flows(counts: dict[Element, tuple[int, int]]) -> dict[Flow, list[int]]:
    flows: dict[Flow, list[int]] = {}
    for el, (packets, nbytes) in counts.items():
        flow = flow_of(el)
        if flow is None:
            continue
        reading = flows.setdefault(flow, [0, 0, 0, 0])
        i = 0 if el.set.startswith("out") else 2
        reading[i], reading[i + 1] = packets, nbytes
    return flows


class Offloader:
    """Moves settled flows of one namespace (`netns`, whose flow sets `sets` are) into the
    kernel's sets and brings their counts back to the engine. The engine's flow keys say their
    namespace, the kernel's do not (`key` and `_kernel` translate).

    `mode` "queue" adds nothing: it only takes back, with their counts, the elements a previous
    daemon left, so that every packet comes to the queue again.
    """

    def __init__(
        self,
        sets: FlowSets,
        engine: Engine,
        faults: Faults,
        limit: int,
        mode: str = "offload",
        netns: str | None = None,
    ):
        self.netns = netns
        self.sets = sets
        self.engine = engine
        self.faults = faults
        self.limit = limit if mode == "offload" else 0
        self.mode = mode
        self.flows = 0  # flows whose elements are in the kernel
        self.added = 0
        self.removed = 0
        self.overflow = 0  # flows left on the queue path: the sets were full
        self.refused: dict[str, int] = {}  # flows the kernel refused, by errno name
        self.reads = 0
        self.read_at: float | None = None  # time.monotonic() when the last whole reading began
        self.read_seconds = 0.0  # what the last whole reading cost the loop, its steps summed
        self._began: float | None = None  # the reading in steps now, when it began
        self._cost = 0.0  # what its steps have cost so far
        # Flows whose elements were added or removed while a reading is under way: what it says
        # of them may be an element that is gone (crediting it again would count twice).
        self._touched: set[FlowKey] = set()

    def key(self, flow: Flow) -> FlowKey:
        return (*flow, self.netns)

    def start(self, saved: dict[FlowKey, list[int]], first: bool) -> None:
        """Continue from the elements in the kernel: flows we hold (handed over) go on from their
        readings, others are adopted with what the checkpoint `saved` of them (an element
        added after that checkpoint: nothing of it is in the totals we continue). `first`: no
        daemon has written this database for the namespace, so nothing the elements counted
        so far is ours (another database holds it, or nobody does)."""
        now = time.monotonic()
        flows = {self.key(flow): reading for flow, reading in _flows(self._read_all()).items()}
        held = {k: r for k, r in self.engine.offloaded_flows().items() if k[5] == self.netns}
        for flow, reading in flows.items():
            if flow not in held:
                self.engine.adopt(flow, saved.get(flow, reading if first else [0, 0, 0, 0]), now)
            self.engine.credit(flow, reading, now)
        for flow in held.keys() - flows.keys():  # handed over, but its elements are gone
            self.engine.withdrawn(flow)
        self.engine.forgotten.update(saved.keys() - flows.keys())
        self.engine.credited.update(flows)
        self.flows = len(flows)
        if self.mode != "offload":
            self.withdraw(list(flows))

    def _read_all(self) -> dict[Element, tuple[int, int]]:
        started = time.monotonic()
        counts = self.sets.read()
        self.read_at = started
        self.read_seconds = time.monotonic() - started
        self.reads += 1
        return counts

    @property
    def reading(self) -> bool:
        """A reading is under way: the loop should turn again at once to take its next step."""
        return self._began is not None

    def refresh(self, max_age: float = 0.0, at_once: int = 4 * STEP) -> None:
        """Begin a reading of every offloaded flow's elements, unless one is under way or the last
        began less than `max_age` seconds ago (or, when asked often, than READ_SHARE allows).
        Its first `at_once` datagrams are read now (a few thousand flows: all of them, as fresh
        as can be), the rest in steps of the loop (`step`); each element credits its flow."""
        if max_age:
            max_age = max(max_age, self.read_seconds / READ_SHARE)
        if self.flows == 0 or self._began is not None:
            return
        if self.read_at is not None and time.monotonic() - self.read_at < max_age:
            return
        self._began, self._cost = time.monotonic(), 0.0
        self._touched.clear()
        self.sets.begin_read()
        if at_once:
            self.step(at_once)

    def step(self, most: int = STEP) -> None:
        """The next step of the reading under way, if one is: at most `most` datagrams."""
        if self._began is None:
            return
        started = time.monotonic()
        try:
            got, done = self.sets.read_some(most)
        except BaseException:
            self._began = None  # the next refresh begins anew
            raise
        for el, (packets, nbytes) in got:
            flow = flow_of(el)
            key = None if flow is None else self.key(flow)
            if key is not None and key not in self._touched:
                i = 0 if el.set.startswith("out") else 2
                self.engine.credit_element(key, i, packets, nbytes, started)
        self._cost += time.monotonic() - started
        if done:
            self.read_at, self.read_seconds, self._began = self._began, self._cost, None
            self.reads += 1

    def withdraw(self, flows: list[FlowKey]) -> None:
        """Remove the flows' elements, crediting each with its last count as it goes."""
        if flows:
            self._withdrawn(flows, *self.sets.remove(self._changing(flows)))

    def flush(self, gone: list[FlowKey], ready: list[FlowKey]) -> None:
        """In one transaction: withdraw the flows that must go, and offload the flows settled
        since the last flush (this namespace's part of the engine's `take_withdrawals` and
        `take_offloadable`: the service hands each namespace its own)."""
        gone = list(dict.fromkeys(gone))
        room = 0
        if self.mode == "offload":  # the flows going free their room in the same transaction
            room = max(0, self.limit - (self.flows - len(gone)))
            self.overflow += max(0, len(ready) - room)
        ready = ready[:room]
        if not gone and not ready:
            return
        last, refused = self.sets.change(self._changing(gone), self._changing(ready))
        offered = {flow[:5] for flow in ready}
        adding = {el: code for el, code in refused.items() if flow_of(el) in offered}
        self._withdrawn(gone, last, {el: code for el, code in refused.items() if el not in adding})
        self._note_refused(adding, "adding")
        failed = {flow_of(el) for el in adding}  # flows of `ready`: never None
        if failed:  # a flow goes whole or not at all: take back its other element
            self.sets.remove([el for flow in failed for el in elements(flow)])
        done = [flow for flow in ready if flow[:5] not in failed]
        self.engine.offloaded_now(done)
        self.flows += len(done)
        self.added += len(done)

    def _changing(self, flows: list[FlowKey]) -> list[Element]:
        """The elements of flows being added or removed; a reading under way skips them."""
        if self._began is not None:
            self._touched.update(flows)
        return [el for flow in flows for el in elements(flow[:5])]

    def _withdrawn(
        self, flows: list[FlowKey], last: dict[Element, tuple[int, int]], refused: dict[Element, int]
    ) -> None:
        """Credit the withdrawn flows with their elements' last counts; note what was refused."""
        self._note_refused(refused, "removing")
        now = time.monotonic()
        for flow in flows:
            reading = _reading(last, flow[:5])
            if reading is not None:
                self.engine.credit(flow, reading, now)
            self.engine.withdrawn(flow)
        self.flows -= len(flows)
        self.removed += len(flows)

    def _note_refused(self, refused: dict[Element, int], doing: str) -> None:
        for el, code in refused.items():
            name = errno.errorcode.get(code, str(code))
            self.refused[name] = self.refused.get(name, 0) + 1
            self.faults.record(f"{doing} flow set elements", OffloadError(f"{el.set}: {os.strerror(code)}"))

    def status(self) -> dict:
        return {
            "mode": self.mode,
            "flows": self.flows,
            "limit": self.limit,
            "added": self.added,
            "removed": self.removed,
            "overflow": self.overflow,
            "refused": dict(self.refused),
            "reads": self.reads,
            "counter_age": None if self.read_at is None else time.monotonic() - self.read_at,
            "reading": self._began is not None,
            "read_seconds": self.read_seconds,
            "netlink_requests": self.sets.requests,
        }
