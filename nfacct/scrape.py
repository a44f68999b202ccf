"""The HTTP endpoint Prometheus scrapes: `GET /metrics`, served from the daemon's own loop.

`Endpoint` is this protocol on `serving.Server`, like the control socket, so it never blocks and
no client can hold the loop that gives every queued packet its verdict: a request must be
complete within REQUEST_TIMEOUT and its answer read within ANSWER_TIMEOUT, at most MAX_CLIENTS
are open (a newcomer takes the place of the one silent longest; when all wait for their answers,
more wait in the backlog), a request head longer than MAX_REQUEST is refused, and a body is made
at most once per RENDER_EVERY seconds (a scraper asking in a loop gets the same bytes again
instead of making the daemon work for it). The body is made in two steps: the loop copies what it
shows, a worker thread turns the copy into text.
HTTP/1.1 with one request per connection: enough for Prometheus, and nothing to keep between
scrapes. Not encrypted or authenticated: it listens on loopback unless told otherwise (see
docs/metrics.md for what it exposes).
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from . import serving
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


class Endpoint(serving.Server):
    """The HTTP protocol on the shared server: `GET /metrics`, one request per connection.

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
        listener = listen(*address, share)
        self.address = listener.getsockname()[:2]
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nfacct-metrics")
        self._rendering: Future | None = None
        self._waiting: list[serving.Client] = []  # for the rendering under way
        self._answer = b""
        self._prepared_at = -RENDER_EVERY
        # The worker says it is done through this pipe, so the loop picks the answer up at once.
        self._done_r, self._done_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        selector.register(self._done_r, selectors.EVENT_READ, self._on_rendered)
        # Beyond MAX_CLIENTS, a newcomer takes the place of the client silent longest: when newcomers
        # waited in the backlog, 40 silent connections kept a scraper waiting past its 10 s timeout.
        when_full = serving.WhenFull.EVICT
        end = b"\r\n\r\n"  # of the request head
        terms = serving.Terms(
            "metrics", MAX_CLIENTS, when_full, MAX_REQUEST, end, REQUEST_TIMEOUT, ANSWER_TIMEOUT
        )
        super().__init__(listener, selector, faults, terms)

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)  # a rendering takes at most ~1 s
        self._sel.unregister(self._done_r)
        os.close(self._done_r)
        os.close(self._done_w)
        super().close()

    def on_request(self, client: serving.Client, request: bytes) -> None:
        if len(request) > MAX_REQUEST:  # no end of the head within MAX_REQUEST
            self.send(client, response("431 Request Header Fields Too Large", b"request head too long\n"))
            return
        answer = route(request)
        if answer is not None:
            self.send(client, answer)
        elif time.monotonic() - self._prepared_at < RENDER_EVERY:
            self.send(client, self._answer)
        else:
            self._waiting.append(client)
            if self._rendering is None:
                self._render()

    def on_drop(self, client: serving.Client) -> None:
        if client in self._waiting:
            self._waiting.remove(client)

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
            self.send(client, answer)
