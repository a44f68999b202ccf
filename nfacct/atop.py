"""atop's netatop-bpf socket: `atop -K` (atop 2.10 to 2.13) shows nfacct's per-process counters.

The protocol is netatop-bpf's, as atop speaks it (atop's netatopbpfif.c; docs/atop.md):
atop connects to a UNIX stream socket at a fixed path, keeps the connection, and at each
sample sends one 96-byte request (uninitialised memory) and reads 96-byte records until one
has id 0. A record: the tgid, its start time, its name, and the eight cumulative counters.

atop reads each record with one `recv(fd, rec, 96, 0)` and takes any positive return as a
whole record, so a record must never reach it in pieces. A reply is written in pieces of at
most CHUNK bytes, a whole number of records each (`serving.Terms.chunk`); on a non-blocking
AF_UNIX stream socket one send() of at most 32 KiB is one skb, queued whole or refused with
EAGAIN (unix_stream_sendmsg), so the reader only ever finds whole records queued, however
slowly it reads and however large the reply.

What each client is served is `Feed`'s business (no I/O): cumulative counters that never go
down, and every exited process in at least two consecutive replies after nfacct saw it exit,
to every client, so atop finds it in the sample where it reports the exit.

`Server` is this protocol on `serving.Server`, which never blocks: sockets are read and
written when the selector says so, a client that stops mid-request or stops reading its reply
is dropped at a deadline, and at most MAX_CLIENTS are connected (more are accepted and closed
at once: atop waits for an answer without a timeout, so a connection left waiting in the
backlog would freeze it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import stat
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from . import serving, text
from .faults import Faults
from .tables import COUNTER_NAMES

log = logging.getLogger("nfacct")

DEFAULT_ATOP_SOCKET = "/run/netatop-bpf-socket"  # hard-coded in atop (netatop.h)

# struct netpertask on x86-64: int32 id, 4 bytes padding, unsigned long btime,
# char command[16], struct taskcount (eight uint64), native byte order.
RECORD = struct.Struct("=i4xQ16s8Q")
REQUEST_SIZE = RECORD.size  # atop sends one whole struct netpertask as its request
END = RECORD.pack(0, 0, b"", *[0] * len(COUNTER_NAMES))  # id 0 ends a reply
COMMAND_SIZE = 15  # bytes of the name; the 16th stays NUL, as atop's own names end
# A send() of at most 32 KiB (UNIX_SKB_FRAGS_SZ) is one skb, all or nothing: 341 records.
CHUNK = (32768 // RECORD.size) * RECORD.size
# Room for a few CHUNKs however small wmem_default is: a send bigger than half the buffer would
# be split across skbs, and could then be cut inside a record.
SNDBUF = 4 * CHUNK

MAX_CLIENTS = 16
REQUEST_TIMEOUT = 5.0  # from a request's first byte to its last
REPLY_TIMEOUT = 10.0  # from a reply ready to its last byte taken by the client
MAX_RETAINED = 100_000  # exited tasks kept past the engine's GC for clients not yet served them
SERVED_TIMES = 2  # an exit is in this many replies to each client after nfacct saw it

Key = tuple[int, float]  # (pid, btime): a process, as the engine's tables key it
Snapshot = Callable[[], list[dict]]  # `Service.snapshot`: every task as `Engine.top()` gives it


class AtopError(Exception):
    """The atop socket cannot be served; one line for the user."""


def check_path(path: str) -> str:
    return serving.check_path(path, "atop socket", AtopError)


def check_usable(path: str) -> str:
    """What can be known about `path` before the daemon starts: short enough, not a file of
    another kind, and in a directory that exists or can be made."""
    check_path(path)
    _socket_there(path)
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise AtopError(f"cannot create the atop socket {path}: {ancestor} is not a directory")
    return path


def _socket_there(path: str) -> bool:
    """Whether a socket file is at `path`; AtopError if a file of another kind is."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # check_usable names the ancestor in the way
        return False
    except OSError as e:
        raise AtopError(f"cannot look at the atop socket path {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise AtopError(f"{path} exists and is not a socket; remove it or choose another --atop-socket")
    return True


def record(pid: int, btime: float, comm: str, counters: list[int]) -> bytes:
    """One netpertask. btime is the start in whole epoch seconds, as atop computes its own
    (gen.btime; its netatop-bpf code keys by pid only, the old netatop module matched on it)."""
    return RECORD.pack(pid, int(btime), text.encode(comm)[:COMMAND_SIZE], *counters)


@dataclass
class _Task:
    pid: int
    btime: float
    comm: str
    counters: list[int]
    exited: int | None = None  # the snapshot that first showed it exited


class Feed:
    """What atop clients are served, snapshot after snapshot (no I/O).

    `observe` takes a snapshot of the engine's tasks; `reply(client)` is that client's next
    reply. Counters are the highest ever observed per task, so a reply never shows a counter
    lower than an earlier one did. An exited task is in each client's replies until that client
    has had SERVED_TIMES replies since the snapshot that first showed the exit, even after the
    engine's GC dropped the task: atop looks an exit up in the reply of the sample where its
    process accounting reports it, which may be the sample after nfacct learned of the exit.
    """

    def __init__(self, max_retained: int = MAX_RETAINED) -> None:
        self.max_retained = max_retained
        self.seq = 0  # snapshots observed
        self._running: dict[Key, _Task] = {}
        self._exited: dict[Key, _Task] = {}  # in the last snapshot, or since dropped but owed
        self._served: dict[int, deque[int]] = {}  # client → the snapshots of its last replies
        self.forgotten = 0  # exited tasks dropped at max_retained before every client had them

    def observe(self, tasks: list[dict]) -> None:
        self.seq += 1
        previous = {**self._exited, **self._running}
        running: dict[Key, _Task] = {}
        present = set()
        for t in tasks:
            key = (t["pid"], t["btime"])
            counters = [t[name] for name in COUNTER_NAMES]
            known = previous.get(key)
            if known is not None:  # never lower than what a client may have been served
                counters = [max(a, b) for a, b in zip(counters, known.counters, strict=True)]
            task = _Task(t["pid"], t["btime"], t["comm"], counters)
            if t["exit_time"] is None:
                running[key] = task
            else:
                present.add(key)
                task.exited = known.exited if known is not None and known.exited is not None else self.seq
                self._exited[key] = task
        self._running = running
        gone = [k for k in self._exited if k not in present]  # the engine's GC dropped them
        for key in [k for k in gone if not self._owed(self._exited[k])]:
            del self._exited[key]  # and every client had them
        gone = [k for k in gone if k in self._exited]
        excess = len(gone) - self.max_retained
        if excess > 0:
            for key in sorted(gone, key=lambda k: self._exited[k].exited)[:excess]:
                del self._exited[key]
            self.forgotten += excess

    def _owed(self, task: _Task, client: int | None = None) -> bool:
        """Whether `client` (None: any client) has had fewer than SERVED_TIMES replies since the exit."""
        clients = self._served.values() if client is None else (self._served[client],)
        return any(len(s) < SERVED_TIMES or s[0] < task.exited for s in clients)

    def reply(self, client: int) -> bytes:
        """The client's reply to the last snapshot: its owed exits, then the running tasks
        (last, so that when a pid was reused atop keeps the live process's record for it)."""
        served = self._served.setdefault(client, deque(maxlen=SERVED_TIMES))
        exits = sorted((t for t in self._exited.values() if self._owed(t, client)), key=lambda t: t.btime)
        served.append(self.seq)
        tasks = [*exits, *self._running.values()]
        return b"".join(record(t.pid, t.btime, t.comm, t.counters) for t in tasks) + END

    def forget(self, client: int) -> None:
        self._served.pop(client, None)
        if not self._served:  # nobody left to owe anything; the next client starts afresh
            self._running, self._exited = {}, {}

    @property
    def retained(self) -> int:
        """Exited tasks the feed holds (in the engine's tables, or kept after them)."""
        return len(self._exited)


class Server(serving.Server):
    """atop's protocol on the shared server: a reply of records per request, on kept connections;
    `work` each loop turn, `before_gc` before each GC."""

    def __init__(self, path: str, snapshot: Snapshot, selector: selectors.BaseSelector, faults: Faults):
        self.path = check_path(path)
        self.snapshot = snapshot
        self.feed = Feed()
        self._ready: list[serving.Client] = []  # whole requests waiting for this turn's snapshot
        listener, self.created_dirs, self._inode = listen(path)
        terms = serving.Terms(
            kind="atop",
            max_clients=MAX_CLIENTS,
            when_full=serving.WhenFull.REFUSE,  # atop sees the close, skips the sample, reconnects
            max_request=REQUEST_SIZE,  # its content means nothing: atop sends uninitialised memory
            terminator=None,
            request_timeout=REQUEST_TIMEOUT,
            answer_timeout=REPLY_TIMEOUT,
            keep=True,  # atop's interval is its own: no deadline between samples
            unit=RECORD.size,
            chunk=CHUNK,
            sndbuf=SNDBUF,
        )
        super().__init__(listener, selector, faults, terms)

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self._inode:  # still ours, not a successor's
                os.unlink(self.path)

    def status(self) -> dict:
        return {
            "path": self.path,
            "clients": len(self._clients),
            "replies": self.answered,
            "snapshots": self.feed.seq,
            "exits_retained": self.feed.retained,
            "exits_forgotten": self.feed.forgotten,
            "refused": self.refused,
            "dropped_at_deadline": self.dropped,
            "split_sends": self.split_sends,
        }

    def on_request(self, client: serving.Client, request: bytes) -> None:
        self._ready.append(client)

    def on_drop(self, client: serving.Client) -> None:
        with contextlib.suppress(ValueError):
            self._ready.remove(client)
        self.feed.forget(client.sock.fileno())

    # ---- the loop's turn and the GC's ----------------------------------------------------------

    def work(self, now: float | None = None) -> None:
        """Answer every whole request with one snapshot; drop clients past their deadline."""
        if self._ready:
            ready, self._ready = self._ready, []
            observed = self._observe()
            for client in ready:
                try:
                    reply = self.feed.reply(client.sock.fileno()) if observed else None
                except Exception as e:  # a bug costs this client its sample, not the daemon
                    self.faults.record("atop reply", e)
                    reply = None
                if reply is None:
                    self.drop(client)  # atop skips the sample and reconnects at the next
                else:
                    self.send(client, reply)
        super().work(now)

    def before_gc(self) -> None:
        """Observe the exited tasks the engine's GC may drop, so they stay owed to clients."""
        if self._clients:
            self._observe()

    def _observe(self) -> bool:
        try:
            self.feed.observe(self.snapshot())
        except Exception as e:  # counted and logged once; the GC and the loop go on
            self.faults.record("atop snapshot", e)
            return False
        return True


def listen(path: str) -> tuple[socket.socket, list[str], int]:
    """A listening socket at `path` (mode 0600), the directories made for it, and its inode.

    A socket file already there is taken over only if nothing answers on it (left behind by a
    server that died); a live server there (netatop-bpf, or another nfacct) is an error.
    Connecting needs write permission, so only root (atop runs as root, or set-uid root and
    regains it before connecting) can read every process's traffic.
    """
    s, created = serving.listen_unix(path, "atop socket", MAX_CLIENTS, _clear_stale, AtopError)
    return s, created, os.lstat(path).st_ino


def _clear_stale(path: str) -> None:
    if not _socket_there(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: left behind by a server that died
            log.info("removed the stale atop socket %s", path)
            return
        except OSError as e:
            raise AtopError(f"cannot check the existing atop socket {path}: {e.strerror or e}") from None
    raise AtopError(f"another server (netatop-bpf or nfacct) is serving atop at {path}")
