"""Attribution: flow → socket (sock_diag) → process (/proc).

Runs in the engine's loop between queue batches, never inside the per-packet path: every
packet of a batch has its verdict before any lookup starts. It runs right after the batch
that brought a flow's first packet because a short-lived process must be caught while its
socket is still open. (A thread was tried first: under load the GIL made its /proc scans so
slow that clients had closed their sockets before being found.)

A flow whose socket is not yet owned by a process (a TCP connection waiting in the accept
queue has inode 0) is retried with backoff; a listening socket is only accepted as the owner
on the last try, because the process that accepts is the better answer.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

from .faults import Faults
from .packet import TCP, UDP
from .procs import ProcessFacts, SocketIndex
from .sockdiag import TCP_ESTABLISHED, TCP_LISTEN, TCP_SYN_RECV, SockDiag
from .tables import FlowKey

RETRY_DELAYS = (0.0, 0.002, 0.01, 0.05, 0.2, 1.0, 3.0)
TCP_CLOSE_WAIT = 8
# A TCP socket without an inode may still be waiting in an accept queue in these states; in any
# other (FIN_WAIT, TIME_WAIT, LAST_ACK...) every process that held it has closed it.
TCP_ACCEPTABLE = (TCP_ESTABLISHED, TCP_SYN_RECV, TCP_CLOSE_WAIT)


def family_zero(addr: bytes) -> bytes:
    """The unspecified address of `addr`'s family (a lookup with it finds listening sockets)."""
    return bytes(len(addr))


class Unowned(Exception):
    """No process holds the socket and none ever will: retrying is pointless.

    `listener` is the owner of a socket listening on the flow's local port, if any: an
    accepted connection closed before its lookup most likely belonged to that process."""

    def __init__(self, listener: ProcessFacts | None = None):
        super().__init__()
        self.listener = listener


@dataclass
class Answer:
    key: FlowKey
    facts: ProcessFacts | None  # None: gave up, the flow stays unidentified
    via_listener: bool = False  # facts are the listening socket's owner, not the socket's


class Resolver:
    """Finds the owners of one namespace's flows (its `sockdiag` socket lives there); `index` may
    be shared by several: socket inodes are unique across namespaces."""

    def __init__(self, sockdiag: SockDiag, index: SocketIndex | None = None, faults: Faults | None = None):
        self.sockdiag = sockdiag
        # Not `or`: an empty SocketIndex is falsy (it has a length) and would be replaced.
        self.index = index if index is not None else SocketIndex()
        self.faults = faults if faults is not None else Faults()  # the daemon passes its own
        self._new: list[tuple[FlowKey, int]] = []
        self._retries: list[tuple[float, int, FlowKey, int]] = []  # (due, attempt, key, ifindex)
        self.resolved = 0
        self.gave_up = 0
        self.by_listener = 0  # closed accepted connections given to the listening socket's owner
        self.errors = 0  # failed attempts (a sock_diag error answer, /proc...): retried like misses

    @property
    def in_flight(self) -> int:
        return len(self._new) + len(self._retries)

    def status(self) -> dict:
        return {
            "in_flight": self.in_flight,
            "resolved": self.resolved,
            "gave_up": self.gave_up,
            "by_listener": self.by_listener,
            "errors": self.errors,
            "proc_scans": self.index.scans,
            "proc_probes": self.index.probes,
            "socket_index": len(self.index),
        }

    def submit(self, key: FlowKey, ifindex: int) -> None:
        self._new.append((key, ifindex))

    def next_due(self) -> float | None:
        """Seconds until a retry is due (0 when new flows wait), None when idle."""
        if self._new:
            return 0.0
        if self._retries:
            return max(0.0, self._retries[0][0] - time.monotonic())
        return None

    def attempt(self, key: FlowKey, ifindex: int, last: bool) -> ProcessFacts | None:
        """One try at finding the process that owns flow `key`."""
        proto, local, lport, remote, rport, _netns = key  # our sock_diag socket is in that namespace
        entry = self.sockdiag.lookup(proto, local, lport, remote, rport, ifindex)
        if entry is None and proto == UDP:
            # No socket receives on this port: the sender's socket is closed (a datagram it sent
            # just before exiting), or nobody ever listened. Asking again changes nothing.
            raise Unowned
        if entry is None or entry.inode == 0:
            if entry is not None and proto == TCP and entry.state not in TCP_ACCEPTABLE:
                raise Unowned(self._listener_owner(family_zero(local), local, lport, ifindex))
            return None
        if proto == TCP and entry.state == TCP_LISTEN and not last:
            return None
        pid = self.index.owner(entry.inode, entry.uid)
        return self.index.facts(pid) if pid is not None else None

    def _listener_owner(self, zero: bytes, local: bytes, lport: int, ifindex: int) -> ProcessFacts | None:
        entry = self.sockdiag.lookup(TCP, local, lport, zero, 0, ifindex)
        if entry is None or entry.state != TCP_LISTEN or entry.inode == 0:
            return None
        pid = self.index.owner(entry.inode, entry.uid)
        return self.index.facts(pid) if pid is not None else None

    def _try(self, n: int, key: FlowKey, ifindex: int, now: float, answers: list[Answer]) -> None:
        last = n == len(RETRY_DELAYS) - 1
        via_listener = False
        try:
            facts = self.attempt(key, ifindex, last)
        except Unowned as e:  # e.g. late FIN/ACK of an exited owner: settle now, not after every retry
            facts, last, via_listener = e.listener, True, e.listener is not None
        except Exception as e:
            self.errors += 1
            self.faults.record("resolver", e)
            facts = None
        if facts is not None or last:
            self.resolved += facts is not None
            self.gave_up += facts is None
            self.by_listener += via_listener
            answers.append(Answer(key, facts, via_listener))
        else:
            heapq.heappush(self._retries, (now + RETRY_DELAYS[n + 1], n + 1, key, ifindex))

    def work(self) -> list[Answer]:
        """Try new flows and the retries that are due; returns what was settled."""
        answers: list[Answer] = []
        now = time.monotonic()
        new, self._new = self._new, []
        for key, ifindex in new:
            self._try(0, key, ifindex, now, answers)
        while self._retries and self._retries[0][0] <= now:
            _due, n, key, ifindex = heapq.heappop(self._retries)
            self._try(n, key, ifindex, now, answers)
        return answers
