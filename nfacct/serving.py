"""Serving clients from the daemon's one loop: the bounded non-blocking server under the control
socket (`control`), atop's socket (`atop`) and the Prometheus endpoint (`scrape`).

The loop also gives every queued packet its verdict, so no client may hold it: `Server` never
blocks. A socket is read or written only when the selector says it is ready, a request is read
into a buffer of bounded size, an answer goes out in non-blocking sends as the client takes it,
and a client that sends nothing, sends slowly or never reads its answer is dropped at a deadline.
At most `max_clients` are connected; what happens to a newcomer beyond them is each server's
choice (`WhenFull`). A client has one request in flight: once its request is whole, it is not read
again until its answer is out.

What a request means and what answers it is the protocol's business, in a subclass: it gets each
whole request in `on_request` and answers with `send`, then or at a later turn.
"""

from __future__ import annotations

import contextlib
import enum
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from .faults import Faults
from .files import make_dirs, remove_dirs

MAX_PATH = 107  # sun_path is 108 bytes with its terminating NUL


class WhenFull(enum.Enum):
    """What a newcomer meets while `max_clients` are connected."""

    WAIT = "it waits in the listen backlog until a slot frees"
    REFUSE = "it is accepted and closed at once"
    EVICT = "it takes the place of the client silent longest, or waits when all wait for answers"


@dataclass(frozen=True)
class Terms:
    """The terms a server serves its clients on."""

    kind: str  # names the server's faults: "<kind> accept"
    max_clients: int
    when_full: WhenFull
    # Bytes of a request at most, up to `terminator`; without one, every request is this long.
    # A request whose terminator does not come within them is given whole with one byte more,
    # for the protocol to refuse as too long.
    max_request: int
    terminator: bytes | None
    request_timeout: float  # to a whole request, from accept, or from its first byte when `keep`
    answer_timeout: float  # from an answer ready to its last byte taken by the client
    # Connections serve request after request, with no deadline between them (atop); otherwise
    # one request and its answer, then the connection is closed.
    keep: bool = False
    unit: int = 1  # answers are made of units of this size (atop's records)
    chunk: int | None = None  # bytes per send at most, a whole number of units; None: no bound
    sndbuf: int | None = None  # SO_SNDBUF of each connection; None: the kernel's default


class Client:
    """One connection: its request as read so far, its answer still to send, its deadline."""

    __slots__ = ("deadline", "inbuf", "out", "sock")

    def __init__(self, sock: socket.socket, deadline: float | None) -> None:
        self.sock = sock
        self.inbuf = b""
        self.out: memoryview | None = None  # the answer still to send
        # None while no deadline runs: the client waits for our answer, or between requests.
        self.deadline = deadline


class Server:
    """A listening socket and its clients on the daemon's selector; `work` each loop turn."""

    def __init__(
        self, listener: socket.socket, selector: selectors.BaseSelector, faults: Faults, terms: Terms
    ) -> None:
        self.faults = faults
        self.terms = terms
        self._sel = selector
        self._listener = listener
        self._clients: dict[int, Client] = {}
        self.answered = 0
        self.dropped = 0  # clients cut off at a deadline, or evicted
        self.refused = 0  # what the server turned away: bad requests, newcomers when full
        self.split_sends = 0  # sends the kernel cut inside a unit (never seen; a reader would misread)
        self._accepting = False
        self._accept_more()

    # ---- what a protocol gets and uses ---------------------------------------------------------

    def on_request(self, client: Client, request: bytes) -> None:
        """A whole request of `client`, without its terminator (see Terms.max_request): answer it
        with `send`, now or at a later turn."""
        raise NotImplementedError

    def on_drop(self, client: Client) -> None:
        """`client` is about to be closed: forget what the protocol keeps of it."""

    def send(self, client: Client, answer: bytes) -> None:
        client.out = memoryview(answer)  # clients given the same answer share its bytes
        client.deadline = time.monotonic() + self.terms.answer_timeout
        self._sel.register(client.sock, selectors.EVENT_WRITE, lambda _m, c=client: self._on_writable(c))
        self._on_writable(client)  # most answers fit the socket buffer: no need to wait a turn

    def drop(self, client: Client) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(client.sock)
        self.on_drop(client)
        self._clients.pop(client.sock.fileno(), None)
        client.sock.close()
        self._accept_more()

    def detach(self, client: Client) -> socket.socket:
        """Hand a client's connection over to the caller, who answers and closes it."""
        del self._clients[client.sock.fileno()]
        self._accept_more()
        return client.sock

    def work(self, now: float | None = None) -> None:
        """Drop clients past their deadline (the loop calls this every turn)."""
        now = time.monotonic() if now is None else now
        for client in list(self._clients.values()):
            if client.deadline is not None and now > client.deadline:
                self.dropped += 1
                self.drop(client)

    def close(self) -> None:
        for client in list(self._clients.values()):
            self.drop(client)
        if self._accepting:
            self._sel.unregister(self._listener)
        self._listener.close()

    # ---- selector callbacks ----------------------------------------------------------------------

    def _accept_more(self) -> None:
        want = (
            len(self._clients) < self.terms.max_clients
            or self.terms.when_full is WhenFull.REFUSE
            or (self.terms.when_full is WhenFull.EVICT and self._silent() is not None)
        )
        if want and not self._accepting:
            self._sel.register(self._listener, selectors.EVENT_READ, self._on_accept)
        elif not want and self._accepting:
            self._sel.unregister(self._listener)  # the backlog holds the rest until a slot frees
        self._accepting = want

    def _on_accept(self, _mask: int) -> None:
        now = time.monotonic()
        when_full = self.terms.when_full
        # The selector calls this when a newcomer waits, so room may be made for the first one;
        # past it the backlog may be empty, and a client evicted for nobody would be lost for nothing.
        may_evict = when_full is WhenFull.EVICT
        while True:
            full = len(self._clients) >= self.terms.max_clients
            if full and when_full is not WhenFull.REFUSE and not (may_evict and self._evict()):
                break  # the selector calls again while more wait
            may_evict = False
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                break
            except OSError as e:  # EMFILE and friends: try again next turn, say so once
                self.faults.record(f"{self.terms.kind} accept", e)
                break
            if full and when_full is WhenFull.REFUSE:
                self.refused += 1
                sock.close()
                continue
            sock.setblocking(False)
            if self.terms.sndbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.terms.sndbuf)
            client = Client(sock, None if self.terms.keep else now + self.terms.request_timeout)
            self._clients[sock.fileno()] = client
            self._sel.register(sock, selectors.EVENT_READ, lambda _m, c=client: self._on_readable(c))
        self._accept_more()

    def _silent(self) -> Client | None:
        """The client that has been sending its request for the longest, if one is."""
        silent = [c for c in self._clients.values() if c.out is None and c.deadline is not None]
        return min(silent, key=lambda c: c.deadline, default=None)

    def _evict(self) -> bool:
        """Full, a newcomer takes the place of the client that has been silent longest, so
        connections that never send a request cannot keep others out. Each is read a last time
        first: its request may be there, not yet read. False when every client waits for its answer."""
        while len(self._clients) >= self.terms.max_clients:
            oldest = self._silent()
            if oldest is None:
                return False
            fd = oldest.sock.fileno()
            self._on_readable(oldest)
            if self._clients.get(fd) is oldest and oldest.out is None and oldest.deadline is not None:
                self.dropped += 1
                self.drop(oldest)
        return True

    def _on_readable(self, client: Client) -> None:
        terminator = self.terms.terminator
        size = self.terms.max_request + (terminator is not None)  # to tell a request too long
        try:
            chunk = client.sock.recv(size - len(client.inbuf))
        except BlockingIOError:
            return
        except OSError:
            self.drop(client)
            return
        if not chunk:
            self.drop(client)  # gone, or gave up before its request was whole
            return
        if client.deadline is None:
            client.deadline = time.monotonic() + self.terms.request_timeout
        client.inbuf += chunk
        if terminator is not None and terminator in client.inbuf:
            request = client.inbuf.partition(terminator)[0]
        elif len(client.inbuf) >= size:
            request = client.inbuf
        else:
            return  # more to come, until the deadline
        # Read no further until it is answered; a pipelined request waits in the kernel's buffer.
        self._sel.unregister(client.sock)
        client.inbuf, client.deadline = b"", None
        self.on_request(client, request)

    def _on_writable(self, client: Client) -> None:
        while client.out:
            try:
                sent = client.sock.send(client.out[: self.terms.chunk])
            except BlockingIOError:
                return
            except OSError:
                self.drop(client)
                return
            if sent % self.terms.unit:
                self.split_sends += 1
            client.out = client.out[sent:]
        self.answered += 1
        if self.terms.keep:
            client.out, client.deadline = None, None
            self._sel.modify(client.sock, selectors.EVENT_READ, lambda _m, c=client: self._on_readable(c))
            return
        # Closing with unread bytes would reset a TCP connection, and the client could lose the
        # answer (to a request too long, say): read what is there first.
        with contextlib.suppress(OSError):
            for _ in range(16):  # 1 MiB at most
                if not client.sock.recv(1 << 16):
                    break
        self.drop(client)


def check_path(path: str, what: str, error: type[Exception]) -> str:
    """`path`, if it can name a UNIX socket (it must fit sockaddr_un); else `error`, raised before
    bind or connect would fail with a less helpful one. `what` names the socket."""
    size = len(os.fsencode(path))
    if size > MAX_PATH:
        raise error(f"{what} path is {size} bytes; a UNIX socket path is at most {MAX_PATH}")
    return path


def listen_unix(
    path: str, what: str, backlog: int, clear: Callable[[str], None], error: type[Exception]
) -> tuple[socket.socket, list[str]]:
    """A listening UNIX socket at `path`, mode 0600, and the directories made for it (for a failed
    start to remove). `clear(path)` first deals with a file already there: it removes one a dead
    server left behind, and raises `error` when a live server answers there. `what` names the
    socket in `error`'s messages."""
    directory = os.path.dirname(path) or "."
    try:
        created = make_dirs(directory, 0o755)
    except OSError as e:
        raise error(f"cannot create the directory {directory} for {path}: {e.strerror}") from None
    try:
        clear(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # 0600: connecting needs write permission, so only root can ask: the answers show every
        # process's traffic.
        old = os.umask(0o177)
        try:
            s.bind(path)
        except OSError as e:
            s.close()
            raise error(f"cannot create the {what} {path}: {e.strerror}") from None
        finally:
            os.umask(old)
    except error:
        remove_dirs(created)
        raise
    s.listen(backlog)
    s.setblocking(False)
    return s, created
