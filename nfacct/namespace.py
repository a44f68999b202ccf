"""One accounted network namespace: everything the daemon opens inside it.

The daemon stays in the root namespace (the proc connector works only there) and opens, in each
namespace it accounts, a queue, a sock_diag socket with its resolver, a socket for destroy
events, the flow sets with their offloader, a guard for the queue; it reads the namespace's
ruleset (and its counting rule, for the coverage ledger) and claims the namespace. Packets and
flows of every namespace go to the daemon's one engine, whose flow keys end with the namespace's
name. NFQUEUE binding is per namespace, so every namespace's queue has the same number.

A named namespace is held open (`netns.Held`): when its name goes (`ip netns del`) the daemon
notices, and the namespace itself lives on while the daemon's sockets refer to it, so its queue
can be drained and its flow sets read a last time before the daemon lets go.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Sequence

from . import netns
from .claim import Claim
from .engine import Engine
from .faults import Faults
from .files import remove_dirs
from .flowsets import FlowSets, OffloadError
from .guard import Guard
from .offload import Offloader
from .persistence import Ledger, Persistence
from .procs import SocketIndex
from .queue import Queue, QueuedPacket
from .resolver import Resolver
from .rules import Rules, RulesError, takeover_pair
from .sockdiag import ALL_STATES, DestroyEvents, SockDiag, SockDiagError
from .tables import FlowKey

log = logging.getLogger("nfacct")


def label(name: str | None) -> str:
    """How messages name a namespace."""
    return f"network namespace {name!r}" if name else "this network namespace"


class Namespace:
    """The daemon's sockets, rules and ledger in namespace `name` (None: the daemon's own).
    Opening claims nothing and binds nothing yet (`claim`, `bind`); `close` undoes it all."""

    def __init__(self, name: str | None, engine: Engine, index: SocketIndex, faults: Faults):
        self.name = name
        self.engine = engine
        self.faults = faults
        self._resources = contextlib.ExitStack()
        self.created_dirs: list[str] = []  # by the claim: a failed start removes them
        try:
            self._open(index)
        except BaseException:
            self.close()
            raise
        self.queue: Queue | None = None
        self.guard: Guard | None = None
        self.guard_seen = 0  # packets the guard accepted, as of the last checkpoint
        self.closes_seen = 0  # destroy event overruns already answered by a socket dump
        self.offloader: Offloader | None = None
        self.offload_problem = ""
        self.ledger = Ledger(name, self.queued, self.waiting, lambda: self.queue.received)

    def _open(self, index: SocketIndex) -> None:
        name = self.name
        self.held = netns.Held(name) if name is not None else None  # NoSuchNetns: one line
        if self.held is not None:
            self._resources.callback(self.held.close)
        self.sockdiag = SockDiag(name)
        self._resources.callback(self.sockdiag.close)
        self.resolver = Resolver(self.sockdiag, index, self.faults)
        self.destroy: DestroyEvents | None = None
        try:
            self.destroy = DestroyEvents(name)
            self._resources.callback(self.destroy.close)
            self.destroy_mode = "sock_diag destroy events"
        except SockDiagError as e:
            self.destroy_mode = f"socket dump each GC cycle ({e})"
        self.rules: Rules | None = None
        self.rules_problem = f"no nfacct rules installed in {label(name)}"
        try:
            # Through the held namespace: its counting rule can be read a last time once its name is gone.
            self.rules = Rules(name, self.held.path if self.held else None)
        except RulesError as e:
            self.rules_problem = str(e)

    def claim(self, control_path: str, wait: float = 0.0) -> None:
        """Claim the namespace for this daemon (ClaimError names the one that has it)."""
        held = Claim(self.name, control_path, wait=wait)
        self._resources.callback(held.release)
        self.created_dirs = held.created_dirs

    # ---- the queue and its rules ---------------------------------------------------------------

    def bind(self, number: int, on_packet: Callable[[QueuedPacket, str | None], bool], maxlen: int) -> None:
        name = self.name
        self.queue = Queue(number, lambda pkt: on_packet(pkt, name), name, maxlen=maxlen)
        self._resources.callback(self.queue.close)

    def queue_numbers(self) -> set[int]:
        """The queues the namespace's rules send to now."""
        return {rule.queue for rule in self.rules.queue_rules()} if self.rules is not None else set()

    def lead_rules_here(self, undo: contextlib.ExitStack) -> bool:
        """Put a queue rule for our queue in front of rules that send elsewhere (`undo` takes it
        back); True if there were such rules (`drop_other_queues` ends them once nothing they
        queued waits)."""
        number = self.queue.number
        others = self.queue_numbers() - {number}
        if not others:
            return False
        self.rules.add_queue(number)
        undo.callback(self._drop_queue_quietly, number)
        log.info("queue rules of %s now send to queue %d (were %s)", label(self.name), number, sorted(others))
        return True

    def drop_other_queues(self) -> None:
        self.rules.drop_queues_except(self.queue.number)

    def _drop_queue_quietly(self, number: int) -> None:
        with contextlib.suppress(RulesError):
            self.rules.drop_queue(number)

    def start_guard(self) -> None:
        """Only once the loop is about to read: a takeover's queue fills while the predecessor
        drains, and those packets are ours to count, not the guard's to let pass."""
        self.guard = Guard(self.queue.fileno(), self.queue.number)
        self._resources.callback(self.guard.stop)  # before the queue closes: it shares its socket
        self.queue.on_read = self.guard.beat

    def queued(self) -> int | None:
        """The counting rule's packets (None without rules), for the coverage ledger."""
        if self.rules is None:
            return None
        try:
            return self.rules.queued_packets()
        except RulesError as e:
            self.faults.record("reading the counting rule", e)
            return None

    def waiting(self) -> int:
        """Packets queued for us or a predecessor and not yet read."""
        ours = takeover_pair(self.queue.number)
        return sum(s.waiting for n, s in self.queue.all_kernel_stats().items() if n in ours)

    # ---- flow offload ---------------------------------------------------------------------------

    def start_offload(self, mode: str, limit: int, persistence: Persistence) -> None:
        """Open the flow sets and continue from the elements in them (a predecessor's, even in
        queue mode: their counts are taken, then they go). Without sets, every packet is queued.
        OffloadError or OSError: the sets cannot be read."""
        if self.rules is None:
            self.offload_problem = self.rules_problem
        elif not self.rules.has_flow_sets():
            self.offload_problem = "the installed ruleset has no flow sets: run `nfacct rules install` again"
        if self.offload_problem:
            if mode == "offload":
                log.warning(
                    "flow offload off in %s, every packet goes through the queue: %s",
                    label(self.name),
                    self.offload_problem,
                )
            return
        sets = FlowSets(self.name)
        self._resources.callback(sets.close)
        self.offloader = Offloader(sets, self.engine, self.faults, limit, mode, self.name)
        self.offloader.start(persistence.offloaded(self.name), self.ledger.first_here)

    def offload(
        self, work: str, max_age: float = 0.0, withdraw: Sequence[FlowKey] = (), ready: Sequence[FlowKey] = ()
    ) -> None:
        """Flush (`withdraw` these flows' elements, add `ready`'s), withdraw, step or refresh the
        flow sets; a failure is counted and logged once, never fatal: the flows stay on the
        queue path, or their counts come at the next reading."""
        if self.offloader is None:
            return
        try:
            if work == "flush":
                self.offloader.flush(list(withdraw), list(ready))
            elif work == "withdraw":
                self.offloader.withdraw(list(withdraw))
            elif work == "step":
                self.offloader.step()
            else:
                self.offloader.refresh(max_age)
        except (OffloadError, OSError) as e:
            self.faults.record(f"flow sets ({work})", e)

    def withdraw_all(self) -> None:
        """Every offloaded flow out of the kernel, each credited with its last count."""
        self.offload("withdraw", withdraw=[k for k in self.engine.offloaded_flows() if self.owns(k)])

    # ---- events ---------------------------------------------------------------------------------

    def on_destroy_events(self) -> None:
        for proto, e in self.destroy.read():
            self.engine.socket_closed(self.name, proto, e.local, e.lport, e.remote, e.rport)

    def dump_closed(self, pause: Callable[[], None] = lambda: None) -> None:
        """Without destroy events, or when some were lost (closing 100,000 sockets at once
        overran them: bench/modes.py), the sockets left tell which flows closed; else those flows
        would wait for --unreferenced-idle (60 s). `pause` is called as the dumps go on."""
        if self.destroy is not None and self.destroy.overruns <= self.closes_seen:
            return
        self.closes_seen = self.destroy.overruns if self.destroy else 0
        live = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for proto in (6, 17):
                for e in self.sockdiag.dump(family, proto, ALL_STATES, pause):
                    if e.inode:
                        live.add((proto, e.lport))
        self.engine.close_all_but(self.name, live)

    def owns(self, key: FlowKey) -> bool:
        return key[5] == self.name

    def gone(self) -> bool:
        """The namespace's name is gone, or names another namespace now."""
        return self.held is not None and self.held.gone()

    # ---- what `status` shows ----------------------------------------------------------------------

    def status(self) -> dict:
        queue: dict = {}
        if self.queue is not None:
            queue = {"number": self.queue.number, "flags": self.queue.flags}
            kernel = self.queue.kernel_stats()
            if kernel is not None:
                queue.update(vars(kernel))
                # Packet ids count every packet handed to us since bind; any we did not see was
                # lost to a full socket buffer (and, with FAIL_OPEN, accepted without accounting).
                queue["missed"] = kernel.id_sequence - self.queue.received
            queue["maxlen"] = self.queue.maxlen
            queue["received"] = self.queue.received
        if self.guard is not None:
            queue["guard_accepted"] = self.guard.accepted
        return {
            "name": self.name,
            "queue": queue,
            "coverage": self.ledger.status(self.rules_problem),
            "offload": self.offloader.status()
            if self.offloader is not None
            else {"mode": "queue", "problem": self.offload_problem or None},
            "resolver": {**self.resolver.status(), "sock_diag_requests": self.sockdiag.requests},
            "socket_close": self.destroy_mode,
            "destroy_overruns": self.destroy.overruns if self.destroy else None,
        }

    def close(self) -> None:
        self._resources.close()

    def discard(self) -> None:
        """Close, and remove the directories the claim made (a failed start)."""
        self.close()
        remove_dirs(self.created_dirs)
