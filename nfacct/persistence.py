"""Persistence: what the daemon writes to SQLite, when, and how a new daemon continues from it.

Exited processes are written once their grace has passed (late FIN/ACKs still count), running
ones at each checkpoint, and with each checkpoint the coverage ledger settles how many packets
reached the queue rule without reaching any process's totals (`coverage`). A new daemon restores
running processes from the last checkpoint (or takes a predecessor's tables over), records those
that exited while nobody counted, and the packets that passed meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .coverage import NOT_COUNTING, Coverage
from .engine import Engine
from .flowsets import flow_bytes, flow_from_bytes
from .procs import is_alive
from .store import Offloaded, Store
from .tables import COUNTER_NAMES, FlowKey, TaskInfo

log = logging.getLogger("nfacct")


class Persistence:
    def __init__(
        self,
        store: Store,
        engine: Engine,
        coverage_key: str,
        counter: Callable[[], int | None],
        waiting: Callable[[], int],
        exit_grace: float,
    ):
        """`counter()` reads the ruleset's counting rule (None: no rules), `waiting()` the packets
        queued and not yet read; `coverage_key` names this namespace's ledger in the store."""
        self.store = store
        self.engine = engine
        self.coverage_key = coverage_key
        self._counter = counter
        self._waiting = waiting
        self.exit_grace = exit_grace
        self.coverage: Coverage | None = None
        self.first_here = True  # no daemon has checkpointed this namespace into this database yet
        self._pending_gaps: list[dict] = []  # unaccounted gaps whose write failed: retried

    def restore(self, counter_at_start: int | None, handed: dict | None = None) -> list[FlowKey]:
        """Continue the counts of a predecessor: its tables if it handed them over, else its
        checkpoint; record processes that exited while no daemon ran, and the packets that
        passed meanwhile. Returns the flows whose owner must be looked up again."""
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
            )
            task.checkpointed = list(task.counters)
            if is_alive(task.pid, task.btime):
                self.engine.restore(task)
            else:
                task.exit_time = row["checkpoint_time"]  # the latest moment we know it ran
                gone.append(task.row())
        self.store.save_exited(gone)
        counter = self._counter()
        if counter is not None:
            covered = self.store.state(self.coverage_key)
            self.first_here = covered is None
            if covered is None:  # the first daemon here: nothing before our bind is ours to claim
                start = counter_at_start if counter_at_start is not None else 0
                self.coverage = Coverage(start, time.time())
            else:
                self.coverage = Coverage.parse(covered)
            self.checkpoint(reason=NOT_COUNTING)
        return lookups

    def persist_exited(self, grace: float | None = None) -> None:
        """Write exited tasks (again, if late packets changed them) once their grace has passed."""
        grace = self.exit_grace if grace is None else grace
        done = self.engine.exited_unwritten(time.time(), grace)
        if done:
            self.store.save_exited([t.row() for t in done])
            for task in done:
                task.saved = list(task.counters)

    def checkpoint(self, reason: str | None = None) -> None:
        """Write live totals, exited processes still in their grace, and what went unaccounted."""
        self.persist_exited(grace=0.0)  # late packets rewrite them later; a crash must not lose them
        state = {}
        counter = self._counter() if self.coverage is not None else None
        if counter is not None:
            extra = {"reason": reason} if reason else {}
            seen = self.engine.packets
            gap = self.coverage.update(counter, seen, self._waiting(), time.time(), **extra)
            if gap is not None:
                log.warning("%d packets passed unaccounted: %s", gap.packets, gap.reason)
                self._pending_gaps.append(gap.as_dict())
            state[self.coverage_key] = self.coverage.state(seen)
        changed = self.engine.running_unwritten()
        credited, forgotten = self.engine.take_offload_changes()
        offloaded = Offloaded(
            self.coverage_key,
            {flow_bytes(k): reading for k, reading in credited.items()},
            [flow_bytes(k) for k in forgotten],
        )
        try:
            self.store.checkpoint([t.row() for t in changed], self._pending_gaps, state, offloaded)
        except BaseException:  # written next time, with whatever changes meanwhile
            self.engine.credited.update(credited)
            self.engine.forgotten.update(forgotten)
            raise
        self._pending_gaps = []
        for t in changed:
            t.checkpointed = list(t.counters)

    def offloaded(self) -> dict[FlowKey, list[int]]:
        """The element readings the last checkpoint's totals include (for `Offloader.start`)."""
        saved = {
            flow_from_bytes(key): reading for key, reading in self.store.offloaded(self.coverage_key).items()
        }
        saved.pop(None, None)
        return saved

    def coverage_status(self, rules_problem: str) -> dict:
        """What `status` shows of the ledger: a snapshot, not settled (that is the checkpoint's job)."""
        if self.coverage is None:
            return {"rules": rules_problem}
        status = {"rules": "counting rule found"}
        counter = self._counter()
        if counter is not None:
            status.update(
                queued_by_kernel=counter,
                unaccounted=self.coverage.missing_now(counter, self.engine.packets, self._waiting()),
            )
        return status
