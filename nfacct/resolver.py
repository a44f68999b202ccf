"""Attribution off the packet path: flow → socket (sock_diag) → process (/proc), in a thread.

The engine submits flows it has not seen; the resolver answers each with the owning process's
facts or with None once it gives up. Answers are applied by the engine's own thread, so only
that thread ever touches counters. A flow whose socket is not yet owned by a process (a TCP
connection still in the accept queue, inode 0) is retried with backoff; a listening socket is
only accepted as the owner on the last try, because the accepting process is the better answer.
"""

from __future__ import annotations

import heapq
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from .packet import TCP
from .procs import ProcessFacts, SocketIndex, process_facts
from .sockdiag import TCP_LISTEN, SockDiag
from .tables import FlowKey

RETRY_DELAYS = (0.0, 0.002, 0.01, 0.05, 0.2, 1.0, 3.0)


@dataclass
class Answer:
    key: FlowKey
    facts: ProcessFacts | None  # None: gave up, the flow stays unidentified


class Resolver:
    def __init__(self, sockdiag: SockDiag, index: SocketIndex | None = None):
        self.sockdiag = sockdiag
        self.index = index or SocketIndex()
        self.answers: deque[Answer] = deque()
        self._requests: queue.SimpleQueue[tuple[FlowKey, int] | None] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="nfacct-resolver", daemon=True)
        self.in_flight = 0
        self.gave_up = 0
        self.resolved = 0
        self.errors = 0
        self._thread.start()

    def fileno(self) -> int:
        """Readable when answers are waiting; the engine's loop selects on it."""
        return self._wake_r

    def submit(self, key: FlowKey, ifindex: int) -> None:
        self.in_flight += 1
        self._requests.put((key, ifindex))

    def take_answers(self) -> list[Answer]:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        out = []
        while self.answers:
            out.append(self.answers.popleft())
        self.in_flight -= len(out)
        return out

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _answer(self, key: FlowKey, facts: ProcessFacts | None) -> None:
        if facts is None:
            self.gave_up += 1
        else:
            self.resolved += 1
        self.answers.append(Answer(key, facts))
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full, so a wake-up is already pending

    def attempt(self, key: FlowKey, ifindex: int, last: bool) -> ProcessFacts | None:
        """One try at finding the process that owns flow `key`."""
        proto, local, lport, remote, rport = key
        entry = self.sockdiag.lookup(proto, local, lport, remote, rport, ifindex)
        if entry is None or entry.inode == 0:
            return None
        if proto == TCP and entry.state == TCP_LISTEN and not last:
            return None
        pid = self.index.owner(entry.inode, entry.uid)
        return process_facts(pid) if pid is not None else None

    def _run(self) -> None:
        retries: list[tuple[float, int, FlowKey, int]] = []  # (due, attempt, key, ifindex)
        while True:
            timeout = max(0.0, retries[0][0] - time.monotonic()) if retries else None
            try:
                request = self._requests.get(timeout=timeout)
            except queue.Empty:
                request = ...
            if request is None:
                return
            if request is not ...:
                key, ifindex = request
                heapq.heappush(retries, (time.monotonic(), 0, key, ifindex))
            now = time.monotonic()
            while retries and retries[0][0] <= now:
                _due, n, key, ifindex = heapq.heappop(retries)
                last = n == len(RETRY_DELAYS) - 1
                try:
                    facts = self.attempt(key, ifindex, last)
                except Exception:  # noqa: BLE001 - one bad lookup must not stop attribution
                    self.errors += 1
                    facts = None
                if facts is not None or last:
                    self._answer(key, facts)
                else:
                    heapq.heappush(retries, (now + RETRY_DELAYS[n + 1], n + 1, key, ifindex))
