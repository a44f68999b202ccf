"""Persistence: what the daemon writes to SQLite, when, and how a new daemon continues from it.

Exited processes are written once their grace has passed (late FIN/ACKs still count), running
ones at each checkpoint, and with each checkpoint the coverage ledger settles how many packets
reached the queue rule without reaching any process's totals (`coverage`), one `Ledger` per
accounted namespace. A new daemon restores running processes from the last checkpoint (or takes a
predecessor's tables over), records those that exited while nobody counted, and, per namespace,
the packets that passed meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .coverage import NETNS_GONE, NOT_COUNTING, Coverage
from .engine import Engine
from .flowsets import flow_bytes, flow_from_bytes
from .procs import is_alive
from .store import Offloaded, Store
from .tables import COUNTER_NAMES, FlowKey, TaskInfo

log = logging.getLogger("nfacct")


def coverage_key(netns: str | None) -> str:
    """The name of a namespace's ledger in the store (`state`), also the scope of its offloaded
    flows' readings (`offloaded_flows`)."""
    return f"covered:{netns or ''}"


class Ledger:
    """The coverage ledger of one namespace: `counter()` reads its ruleset's counting rule (None:
    no rules), `waiting()` the packets queued and not yet read, `seen()` those read from its queue."""

    def __init__(
        self,
        netns: str | None,
        counter: Callable[[], int | None],
        waiting: Callable[[], int],
        seen: Callable[[], int],
    ) -> None:
        self.netns = netns
        self.key = coverage_key(netns)
        self.counter = counter
        self.waiting = waiting
        self.seen = seen
        self.coverage: Coverage | None = None
        self.first_here = True  # no daemon has checkpointed this namespace into this database yet

    def status(self, rules_problem: str) -> dict:
        """What `status` shows of the ledger: a snapshot, not settled (that is the checkpoint's job)."""
        if self.coverage is None:
            return {"rules": rules_problem}
        status = {"rules": "counting rule found"}
        counter = self.counter()
        if counter is not None:
            status.update(
                queued_by_kernel=counter,
                unaccounted=self.coverage.missing_now(counter, self.seen(), self.waiting()),
            )
        return status


class Persistence:
    def __init__(
        self, store: Store, engine: Engine, exit_grace: float, pause: Callable[[], None] = lambda: None
    ):
        self.store = store
        self.engine = engine
        self.exit_grace = exit_grace
        self.pause = pause  # called within long writes (see Store.checkpoint)
        self.ledgers: dict[str | None, Ledger] = {}
        self._pending_gaps: list[dict] = []  # unaccounted gaps whose write failed: retried

    def restore(self, handed: dict | None = None) -> list[FlowKey]:
        """Continue the counts of a predecessor: its tables if it handed them over, else its
        checkpoint; record processes that exited while no daemon ran. Returns the flows whose
        owner must be looked up again. The namespaces' ledgers follow (`open_ledger`)."""
        lookups = self.engine.load(handed) if handed is not None else []
        gone = []
        for row in self.store.live() if handed is None else ():
            task = TaskInfo(
                row["pid"],
                row["btime"],
                row["command"],
                row["cmdline"],
                row["uid"],
                row["cgroup"] or "",
                [row[c] for c in COUNTER_NAMES],
                netns=row["netns"],
            )
            task.checkpointed = list(task.counters)
            if is_alive(task.pid, task.btime):
                self.engine.restore(task)
            else:
                task.exit_time = row["checkpoint_time"]  # the latest moment we know it ran
                gone.append(task.row())
        self.store.save_exited(gone)
        return lookups

    def open_ledger(self, ledger: Ledger, counter_at_start: int | None) -> None:
        """Account one more namespace: continue its ledger where the last daemon left it, and
        record the packets that passed while nobody counted."""
        self.ledgers[ledger.netns] = ledger
        counter = ledger.counter()
        if counter is None:
            return
        covered = self.store.state(ledger.key)
        ledger.first_here = covered is None
        if covered is None:  # the first daemon here: nothing before our bind is ours to claim
            start = counter_at_start if counter_at_start is not None else 0
            ledger.coverage = Coverage(start, time.time())
        else:
            ledger.coverage = Coverage.parse(covered)
        self.checkpoint(reasons={ledger.netns: NOT_COUNTING})

    def close_ledger(self, netns: str | None, counter: int | None) -> None:
        """A namespace is no longer accounted: settle its ledger a last time with `counter` (the
        counting rule's last reading; None: unreadable, so what passed unseen since the last
        checkpoint is unknown, and said so) and stop it."""
        ledger = self.ledgers[netns]
        ledger.counter = lambda: counter
        if counter is None and ledger.coverage is not None:
            self._pending_gaps.append(
                {
                    "start": ledger.coverage.since,
                    "end": time.time(),
                    "packets": 0,
                    "reason": NETNS_GONE,
                    "netns": netns,
                }
            )
        self.checkpoint()
        del self.ledgers[netns]

    def persist_exited(self, grace: float | None = None) -> None:
        """Write exited tasks (again, if late packets changed them) once their grace has passed."""
        grace = self.exit_grace if grace is None else grace
        done = self.engine.exited_unwritten(time.time(), grace)
        if done:
            self.store.save_exited([t.row() for t in done])
            for task in done:
                task.saved = list(task.counters)

    def checkpoint(self, reasons: dict[str | None, str] | None = None) -> None:
        """Write live totals, exited processes still in their grace, and what went unaccounted in
        each namespace (`reasons`: why, where the default would be wrong)."""
        self.persist_exited(grace=0.0)  # late packets rewrite them later; a crash must not lose them
        state = {}
        for ledger in self.ledgers.values():
            counter = ledger.counter() if ledger.coverage is not None else None
            if counter is None:
                continue
            seen = ledger.seen()
            reason = (reasons or {}).get(ledger.netns)
            extra = {"reason": reason} if reason else {}
            gap = ledger.coverage.update(counter, seen, ledger.waiting(), time.time(), **extra)
            if gap is not None:
                where = f" in network namespace {ledger.netns}" if ledger.netns else ""
                log.warning("%d packets passed unaccounted%s: %s", gap.packets, where, gap.reason)
                self._pending_gaps.append({**gap.as_dict(), "netns": ledger.netns})
            state[ledger.key] = ledger.coverage.state(seen)
        changed = self.engine.running_unwritten()
        credited, forgotten = self.engine.take_offload_changes()
        scopes: dict[str | None, Offloaded] = {}
        for k, reading in credited.items():
            scope = scopes.setdefault(k[5], Offloaded(coverage_key(k[5]), {}, []))
            scope.credited[flow_bytes(k[:5])] = reading
        for k in forgotten:
            scopes.setdefault(k[5], Offloaded(coverage_key(k[5]), {}, [])).forgotten.append(flow_bytes(k[:5]))
        try:
            self.store.checkpoint(
                [t.row() for t in changed], self._pending_gaps, state, list(scopes.values()), self.pause
            )
        except BaseException:  # written next time, with whatever changes meanwhile
            self.engine.credited.update(credited)
            self.engine.forgotten.update(forgotten)
            raise
        self._pending_gaps = []
        for t in changed:
            t.checkpointed = list(t.counters)

    def offloaded(self, netns: str | None) -> dict[FlowKey, list[int]]:
        """The element readings of a namespace's flows the last checkpoint's totals include (for
        `Offloader.start`)."""
        saved = {}
        for key, reading in self.store.offloaded(coverage_key(netns)).items():
            flow = flow_from_bytes(key)
            if flow is not None:
                saved[(*flow, netns)] = reading
        return saved

    @property
    def unaccounted(self) -> int | None:
        """Packets this daemon recorded as unaccounted, every namespace together (None: no
        namespace has a counting rule, so nobody knows)."""
        known = [ledger.coverage.unaccounted for ledger in self.ledgers.values() if ledger.coverage]
        return sum(known) if known else None
