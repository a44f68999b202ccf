"""The control socket: one JSON request line in, one JSON answer line out.

A UNIX stream socket, root-only (mode 0600), so `nfacct top` and `nfacct status` can ask a
running daemon for live figures.

The daemon's one loop also gives every queued packet its verdict, so no client may hold it:
`Server` never blocks. Connections are read and written only when the selector says they are
ready; a client that sends nothing, sends slowly or never reads its answer is dropped at its
deadline, and a request longer than MAX_REQUEST or nested deeper than MAX_DEPTH gets an error
answer. One command is computed per loop turn (its answer shared by every client waiting for
the same command), so 500 concurrent `status` requests cost a handful of snapshots, with the
queue served between them. Clients beyond MAX_CLIENTS wait in the listen backlog for their turn.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable

from .faults import Faults
from .files import make_dirs, remove_dirs

log = logging.getLogger("nfacct")

DEFAULT_CONTROL = "/run/nfacct/control.sock"
MAX_PATH = 107  # sun_path is 108 bytes with its terminating NUL
MAX_REQUEST = 4096  # bytes up to the newline; the longest real request is ~20
MAX_DEPTH = 8  # JSON nesting: `[` * 4000 overflowed the parser's recursion limit
MAX_CLIENTS = 64  # open connections; more wait in the backlog
BACKLOG = 4096  # the kernel caps it at net.core.somaxconn (4096 by default since Linux 5.4)
REQUEST_TIMEOUT = 5.0  # from accept to a complete request line
ANSWER_TIMEOUT = 10.0  # from a ready answer to its last byte read by the client
BAD_REQUEST = 'bad request: expected one JSON line like {"cmd": "status"}'


class ControlError(Exception):
    pass


class BadRequest(ValueError):
    """A request the daemon cannot take; the message is the error answer."""


def path_too_long(path: str, what: str) -> str | None:
    """Why `path` cannot name a UNIX socket (it must fit sockaddr_un), or None if it can; said
    before bind or connect would fail with a less helpful error. `what` names the socket."""
    size = len(os.fsencode(path))
    if size > MAX_PATH:
        return f"{what} path is {size} bytes; a UNIX socket path is at most {MAX_PATH}"
    return None


def check_path(path: str) -> str:
    problem = path_too_long(path, "control socket")
    if problem:
        raise ControlError(problem)
    return path


def json_depth(data: bytes) -> int:
    """Deepest nesting of JSON arrays and objects in `data`, brackets inside strings excluded."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def parse_request(line: bytes) -> str:
    """The command of one request line; BadRequest for anything else."""
    if len(line) > MAX_REQUEST:
        raise BadRequest(f"bad request: longer than {MAX_REQUEST} bytes")
    if json_depth(line) > MAX_DEPTH:
        raise BadRequest(f"bad request: nested deeper than {MAX_DEPTH}")
    try:
        message = json.loads(line)
    except ValueError:  # UnicodeDecodeError included
        raise BadRequest(BAD_REQUEST) from None
    if not isinstance(message, dict) or not isinstance(message.get("cmd"), str):
        raise BadRequest(BAD_REQUEST)
    return message["cmd"]


def encode(answer: dict) -> bytes:
    # allow_nan=False: NaN is not JSON, and a client must be able to parse every answer.
    return json.dumps(answer, allow_nan=False).encode() + b"\n"


def request(path: str, cmd: str, timeout: float = 5.0) -> dict:
    """Ask the daemon at `path`; waits for a free slot rather than failing when it is busy."""
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            while True:
                try:
                    s.connect(check_path(path))
                    break
                except BlockingIOError:
                    # A full backlog answers a connect with a timeout with EAGAIN at once.
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            chunks = []
            while chunk := s.recv(1 << 16):
                chunks.append(chunk)
    except FileNotFoundError:
        raise ControlError(f"no nfacct daemon at {path} (start one with `nfacct run`)") from None
    except OSError as e:
        raise ControlError(f"cannot talk to the nfacct daemon at {path}: {e.strerror or e}") from None
    if not chunks:
        raise ControlError(f"the nfacct daemon at {path} closed the connection without an answer")
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise ControlError(f"the nfacct daemon at {path} sent an answer that is not JSON") from None
    if "error" in answer:
        raise ControlError(answer["error"])
    return answer


def answer(conn: socket.socket, result: dict) -> None:
    """Answer a connection the server handed over (LATER), blocking: the daemon is exiting."""
    with conn:
        try:
            conn.setblocking(True)
            conn.settimeout(ANSWER_TIMEOUT)
            conn.sendall(encode(result))
        except OSError:
            pass  # a client that goes away mid-answer is its own problem


LATER = object()  # a handler's answer meaning "the caller will answer this connection itself"

Handler = Callable[[str], "dict | object"]


class _Client:
    __slots__ = ("cmd", "deadline", "inbuf", "out", "sock")

    def __init__(self, sock: socket.socket, now: float):
        self.sock = sock
        self.inbuf = b""
        self.out: memoryview | None = None
        self.cmd: str | None = None
        self.deadline = now + REQUEST_TIMEOUT


class Server:
    """The listening socket and its clients, driven by the daemon's selector."""

    def __init__(self, path: str, handler: Handler, selector: selectors.BaseSelector, faults: Faults):
        self.path = path
        self.handler = handler
        self.faults = faults
        self._sel = selector
        self._clients: dict[int, _Client] = {}
        self._ready: deque[_Client] = deque()  # complete requests waiting for their turn
        self.held: list[socket.socket] = []  # connections a handler answered LATER
        self.answered = 0
        self.dropped = 0  # clients cut off at their deadline
        self.refused = 0  # bad requests
        self._listener, self.created_dirs = listen(path)
        self._accepting = False
        self._accept_more()

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        for conn in self.held:
            conn.close()
        self.held = []
        if self._accepting:
            self._sel.unregister(self._listener)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    @property
    def busy(self) -> bool:
        """Requests wait to be computed: the loop should come back without sleeping."""
        return bool(self._ready)

    def status(self) -> dict:
        return {
            "clients": len(self._clients),
            "answered": self.answered,
            "dropped_at_deadline": self.dropped,
            "bad_requests": self.refused,
        }

    # ---- selector callbacks ------------------------------------------------------------------

    def _accept_more(self) -> None:
        want = len(self._clients) < MAX_CLIENTS
        if want and not self._accepting:
            self._sel.register(self._listener, selectors.EVENT_READ, self._on_accept)
        elif not want and self._accepting:
            self._sel.unregister(self._listener)  # the backlog holds the rest until a slot frees
        self._accepting = want

    def _on_accept(self, _mask: int) -> None:
        now = time.monotonic()
        while len(self._clients) < MAX_CLIENTS:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                break
            except OSError as e:  # EMFILE and friends: try again next turn, say so once
                self.faults.record("control accept", e)
                break
            sock.setblocking(False)
            client = _Client(sock, now)
            self._clients[sock.fileno()] = client
            self._sel.register(sock, selectors.EVENT_READ, lambda mask, c=client: self._on_readable(c))
        self._accept_more()

    def _on_readable(self, client: _Client) -> None:
        try:
            chunk = client.sock.recv(MAX_REQUEST + 1)
        except BlockingIOError:
            return
        except OSError:
            self._drop(client)
            return
        if not chunk:
            self._drop(client)  # gone before asking anything
            return
        client.inbuf += chunk
        line, newline, _rest = client.inbuf.partition(b"\n")
        if not newline and len(client.inbuf) <= MAX_REQUEST:
            return  # more to come, until the deadline
        self._sel.unregister(client.sock)
        try:
            client.cmd = parse_request(line)
        except BadRequest as e:
            self.refused += 1
            self._send(client, {"error": str(e)})
            return
        self._ready.append(client)

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
            self._drop(client)

    # ---- the loop's turn -----------------------------------------------------------------------

    def work(self, now: float | None = None) -> None:
        """Compute one command for every client waiting for it; drop clients past their deadline."""
        now = time.monotonic() if now is None else now
        if self._ready:
            cmd = self._ready[0].cmd
            waiting = [c for c in self._ready if c.cmd == cmd]
            self._ready = deque(c for c in self._ready if c.cmd != cmd)
            try:
                result = self.handler(cmd)
            except Exception as e:  # a bug must cost one answer, not the daemon
                self.faults.record(f"control command {cmd[:40]!r}", e)
                result = {"error": f"internal error while answering {cmd[:40]!r}: {type(e).__name__}"}
            for client in waiting:
                if result is LATER:
                    del self._clients[client.sock.fileno()]
                    self.held.append(client.sock)
                    self._accept_more()
                else:
                    self._send(client, result)
        for client in list(self._clients.values()):
            # A client whose request waits in _ready waits for us, not we for it.
            if now > client.deadline and (client.cmd is None or client.out is not None):
                self.dropped += 1
                self._drop(client)

    def _send(self, client: _Client, result: dict) -> None:
        try:
            data = encode(result)
        except ValueError as e:
            self.faults.record("control answer", e)
            data = encode({"error": f"internal error: answer not encodable ({e})"})
        client.out = memoryview(data)
        client.deadline = time.monotonic() + ANSWER_TIMEOUT
        self._sel.register(client.sock, selectors.EVENT_WRITE, lambda mask, c=client: self._on_writable(c))

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(client.sock)
        with contextlib.suppress(ValueError):
            self._ready.remove(client)
        self._clients.pop(fd, None)
        client.sock.close()
        self._accept_more()


def listen(path: str) -> tuple[socket.socket, list[str]]:
    """A listening socket at `path`, and the directories made for it (for a failed start to remove)."""
    check_path(path)
    directory = os.path.dirname(path) or "."
    try:
        created = make_dirs(directory, 0o755)
    except OSError as e:
        raise ControlError(f"cannot create the directory {directory} for {path}: {e.strerror}") from None
    if os.path.exists(path):
        try:
            request(path, "ping", timeout=1.0)
        except ControlError:
            os.unlink(path)  # left behind by a daemon that died
        else:
            raise ControlError(f"another nfacct daemon is already answering at {path}")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(path)
    except OSError as e:
        s.close()
        remove_dirs(created)
        raise ControlError(f"cannot create the control socket {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    s.listen(BACKLOG)
    s.setblocking(False)
    return s, created
