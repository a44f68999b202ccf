"""The HTTP endpoint Prometheus scrapes: `GET /metrics`, served from the daemon's own loop.

The loop also gives every queued packet its verdict, so, like the control socket, this server
never blocks and no client can hold it: connections are read and written only when the selector
says they are ready, a request must be complete within REQUEST_TIMEOUT and its answer read within
ANSWER_TIMEOUT, at most MAX_CLIENTS are open (a newcomer takes the place of the one silent
longest; when all wait for their answers, more wait in the backlog), a request head longer than
MAX_REQUEST is refused, and a body is made at most once per RENDER_EVERY seconds (a scraper
asking in a loop gets the same bytes again instead of making the daemon work for it). The body is
made in two steps: the loop copies what it shows, a worker thread turns the copy into text.
HTTP/1.1 with one request per connection: enough for Prometheus, and nothing to keep between
scrapes. Not encrypted or authenticated: it listens on loopback unless told otherwise (see
docs/metrics.md for what it exposes).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from .faults import Faults

DEFAULT_HOST = "127.0.0.1"
MAX_REQUEST = 8192  # bytes of request head; Prometheus sends ~250
MAX_CLIENTS = 16  # open connections; more wait in the backlog (a few Prometheus servers scrape)
BACKLOG = 64
REQUEST_TIMEOUT = 5.0  # from accept to the end of the request head
ANSWER_TIMEOUT = 10.0  # from a ready answer to its last byte read by the client
RENDER_EVERY = 1.0  # seconds: scrapes closer together than this share one rendering
PATH = "/metrics"


class ScrapeError(Exception):
    """The endpoint cannot listen; one line for the user."""


def parse_address(value: str) -> tuple[str, int]:
    """`PORT`, `HOST:PORT` or `[IPV6]:PORT` as (host, port); a bare port listens on loopback."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host = DEFAULT_HOST
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, like [::1]:9108, not {value!r}")
    if not host:
        raise ValueError(f"expected HOST:PORT, PORT or [IPV6]:PORT, not {value!r}")
    if not port.isdecimal() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected a port from 1 to 65535 in {value!r}")
    return host, int(port)


def listen(host: str, port: int, share: bool = False) -> socket.socket:
    """A listening socket that a successor can share (SO_REUSEPORT). It is itself refused a port
    anyone listens on, unless `share`: a takeover, listening beside its predecessor until that
    one exits."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ScrapeError(f"cannot listen for metrics on {where}: {e.strerror}") from None
    try:
        if not share:
            # A socket without SO_REUSEPORT conflicts with every other: this is the "in use" test.
            _bound(family, kind, proto, address, reuse_port=False).close()
        return _bound(family, kind, proto, address, reuse_port=True)
    except OSError as e:
        raise ScrapeError(f"cannot listen for metrics on {where}: {e.strerror}") from None


def _bound(family: int, kind: int, proto: int, address: tuple, reuse_port: bool) -> socket.socket:
    s = socket.socket(family, kind, proto)
    try:
        # A restarted daemon must get its port back while the old connections sit in TIME_WAIT.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
        s.bind(address)
        if reuse_port:
            s.listen(BACKLOG)
            s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def route(head: bytes) -> bytes | None:
    """The response to a request head (its lines up to the empty one); None for the metrics."""
    request_line = head.split(b"\r\n", 1)[0].split(b" ")
    if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/1."):
        return response("400 Bad Request", b"expected an HTTP/1.x request line\n")
    method, target, _version = request_line
    if target.split(b"?", 1)[0] != PATH.encode():
        return response("404 Not Found", b"nfacct serves its metrics at /metrics\n")
    if method != b"GET":
        return response("405 Method Not Allowed", b"only GET\n")
    return None


Render = Callable[[], tuple[bytes, str]]  # a body and its content type, made in the worker thread


class _Client:
    __slots__ = ("deadline", "inbuf", "out", "sock", "waiting")

    def __init__(self, sock: socket.socket, now: float):
        self.sock = sock
        self.inbuf = b""
        self.out: memoryview | None = None
        self.waiting = False  # for a rendering: it waits for us, not we for it
        self.deadline = now + REQUEST_TIMEOUT


class Endpoint:
    """The listening socket and its clients, driven by the daemon's selector.

    `prepare()` runs in the loop and returns the rendering to run in the worker thread: the loop
    reads the tables (they are not thread-safe) and the thread turns a copy into text, which
    at 80,000 series takes 0.7 s of CPU (docs/metrics.md) that the loop must not spend at once.
    The thread holds the GIL for at most the switch interval (5 ms) at a time."""

    def __init__(
        self,
        address: tuple[str, int],
        prepare: Callable[[], Render],
        selector: selectors.BaseSelector,
        faults: Faults,
        share: bool = False,
    ):
        self.prepare = prepare
        self.faults = faults
        self._sel = selector
        self._listener = listen(*address, share)
        self.address = self._listener.getsockname()[:2]
        self._clients: dict[int, _Client] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nfacct-metrics")
        self._rendering: Future | None = None
        self._waiting: list[_Client] = []
        self._answer = b""
        self._prepared_at = -RENDER_EVERY
        # The worker says it is done through this pipe, so the loop picks the answer up at once.
        self._done_r, self._done_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._done_r, selectors.EVENT_READ, self._on_rendered)
        self.answered = 0
        self.dropped = 0  # clients cut off at their deadline
        self._accepting = False
        self._accept_more()

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)  # a rendering takes at most ~1 s
        self._sel.unregister(self._done_r)
        os.close(self._done_r)
        os.close(self._done_w)
        for client in list(self._clients.values()):
            self._drop(client)
        if self._accepting:
            self._sel.unregister(self._listener)
        self._listener.close()

    def _idle(self) -> _Client | None:
        """The client that has been sending its request for the longest, if one is."""
        idle = [c for c in self._clients.values() if c.out is None and not c.waiting]
        return min(idle, key=lambda c: c.deadline, default=None)

    def _accept_more(self) -> None:
        want = len(self._clients) < MAX_CLIENTS or self._idle() is not None
        if want and not self._accepting:
            self._sel.register(self._listener, selectors.EVENT_READ, self._on_accept)
        elif not want and self._accepting:
            self._sel.unregister(self._listener)  # the backlog holds the rest until a slot frees
        self._accepting = want

    def _on_accept(self, _mask: int) -> None:
        now = time.monotonic()
        while True:
            full = len(self._clients) >= MAX_CLIENTS
            if full and not self._make_room():
                break
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                break
            except OSError as e:  # EMFILE and friends: try again next turn, say so once
                self.faults.record("metrics accept", e)
                break
            sock.setblocking(False)
            client = _Client(sock, now)
            self._clients[sock.fileno()] = client
            self._sel.register(sock, selectors.EVENT_READ, lambda _m, c=client: self._on_readable(c))
            if full:
                break  # one at a time: the selector calls again while more wait
        self._accept_more()

    def _make_room(self) -> bool:
        """Full, a newcomer takes the place of the client that has been silent longest, so
        connections that never send a request cannot keep Prometheus out (measured: when
        newcomers waited in the backlog, 40 of them kept a scraper waiting past its 10 s
        timeout). Each is read a last time first: its request may be there, not yet read."""
        while len(self._clients) >= MAX_CLIENTS:
            oldest = self._idle()
            if oldest is None:
                return False  # every client waits for its answer: newcomers wait in the backlog
            fd = oldest.sock.fileno()
            self._on_readable(oldest)
            if self._clients.get(fd) is oldest and oldest.out is None and not oldest.waiting:
                self.dropped += 1
                self._drop(oldest)
        return True

    def _on_readable(self, client: _Client) -> None:
        try:
            chunk = client.sock.recv(MAX_REQUEST + 1)
        except BlockingIOError:
            return
        except OSError:
            self._drop(client)
            return
        if not chunk:
            self._drop(client)
            return
        client.inbuf += chunk
        head, end, _body = client.inbuf.partition(b"\r\n\r\n")
        if not end and len(client.inbuf) <= MAX_REQUEST:
            return  # more to come, until the deadline
        self._sel.unregister(client.sock)
        if not end:
            self._send(client, response("431 Request Header Fields Too Large", b"request head too long\n"))
            return
        answer = route(head)
        if answer is not None:
            self._send(client, answer)
        elif time.monotonic() - self._prepared_at < RENDER_EVERY:
            self._send(client, self._answer)
        else:
            client.waiting = True
            self._waiting.append(client)
            if self._rendering is None:
                self._render()

    def _render(self) -> None:
        self._prepared_at = time.monotonic()
        try:
            job = self.prepare()
        except Exception as e:  # a bug must cost one scrape, not the daemon
            self._failed(e)
            return
        self._rendering = self._worker.submit(job)
        self._rendering.add_done_callback(lambda _f: os.write(self._done_w, b"."))

    def _on_rendered(self, _mask: int) -> None:
        os.read(self._done_r, 64)
        done, self._rendering = self._rendering, None
        try:
            body, content_type = done.result()
        except Exception as e:
            self._failed(e)
            return
        self._answer = response("200 OK", body, content_type)
        self._answer_waiting(self._answer)

    def _failed(self, exc: Exception) -> None:
        self.faults.record("metrics render", exc)
        self._prepared_at = -RENDER_EVERY  # the next scrape tries again
        self._answer_waiting(response("500 Internal Server Error", f"{type(exc).__name__}\n".encode()))

    def _answer_waiting(self, answer: bytes) -> None:
        waiting, self._waiting = self._waiting, []
        for client in waiting:
            client.waiting = False
            self._send(client, answer)

    def _send(self, client: _Client, answer: bytes) -> None:
        client.out = memoryview(answer)  # every client shares the same bytes
        client.deadline = time.monotonic() + ANSWER_TIMEOUT
        self._sel.register(client.sock, selectors.EVENT_WRITE, lambda _m, c=client: self._on_writable(c))

    def _on_writable(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.out)
        except BlockingIOError:
            return
        except OSError:
            self._drop(client)
            return
        client.out = client.out[sent:]
        if not client.out:
            self.answered += 1
            # Closing with unread bytes would reset the connection, and the client could lose
            # the answer (a request head over MAX_REQUEST): read what is there first.
            with contextlib.suppress(OSError):
                for _ in range(16):
                    if not client.sock.recv(1 << 16):
                        break
            self._drop(client)

    def work(self, now: float | None = None) -> None:
        """Drop clients past their deadline (the loop calls this every turn)."""
        if not self._clients:
            return
        now = time.monotonic() if now is None else now
        for client in list(self._clients.values()):
            if now > client.deadline and not client.waiting:
                self.dropped += 1
                self._drop(client)

    def _drop(self, client: _Client) -> None:
        if client.waiting:
            self._waiting.remove(client)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(client.sock)
        self._clients.pop(client.sock.fileno(), None)
        client.sock.close()
        self._accept_more()
