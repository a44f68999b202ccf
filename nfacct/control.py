"""The control socket: one JSON request line in, one JSON answer line out.

A UNIX stream socket, root-only (mode 0600), so `nfacct top` and `nfacct status` can ask a
running daemon for live figures.

`Server` is this protocol on `serving.Server`, which never blocks and drops a client that sends
nothing, sends slowly or never reads its answer at its deadline. A request longer than MAX_REQUEST
or nested deeper than MAX_DEPTH gets an error answer. One command is computed per loop turn (its
answer shared by every client waiting for the same command), so 500 concurrent `status` requests
cost a handful of snapshots, with the queue served between them. Clients beyond MAX_CLIENTS wait
in the listen backlog for their turn.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable

from . import serving
from .faults import Faults

DEFAULT_CONTROL = "/run/nfacct/control.sock"
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


def check_path(path: str) -> str:
    return serving.check_path(path, "control socket", ControlError)


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


class Server(serving.Server):
    """The control socket's protocol on the shared server: a command per request line."""

    def __init__(self, path: str, handler: Handler, selector: selectors.BaseSelector, faults: Faults):
        self.path = path
        self.handler = handler
        self._ready: deque[tuple[serving.Client, str]] = deque()  # commands waiting for their turn
        self.held: list[socket.socket] = []  # connections a handler answered LATER
        listener, self.created_dirs = listen(path)
        # Beyond MAX_CLIENTS, newcomers wait in the backlog; a request is a line.
        when_full = serving.WhenFull.WAIT
        terms = serving.Terms(
            "control", MAX_CLIENTS, when_full, MAX_REQUEST, b"\n", REQUEST_TIMEOUT, ANSWER_TIMEOUT
        )
        super().__init__(listener, selector, faults, terms)

    def close(self) -> None:
        super().close()
        for conn in self.held:
            conn.close()
        self.held = []
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

    def on_request(self, client: serving.Client, request: bytes) -> None:
        try:
            cmd = parse_request(request)
        except BadRequest as e:
            self.refused += 1
            self._answer(client, {"error": str(e)})
            return
        self._ready.append((client, cmd))

    def on_drop(self, client: serving.Client) -> None:
        if self._ready:  # at close: a client whose command waits is neither read nor timed
            self._ready = deque(r for r in self._ready if r[0] is not client)

    def work(self, now: float | None = None) -> None:
        """Compute one command for every client waiting for it; drop clients past their deadline."""
        if self._ready:
            cmd = self._ready[0][1]
            waiting = [client for client, c in self._ready if c == cmd]
            self._ready = deque(r for r in self._ready if r[1] != cmd)
            try:
                result = self.handler(cmd)
            except Exception as e:  # a bug must cost one answer, not the daemon
                self.faults.record(f"control command {cmd[:40]!r}", e)
                result = {"error": f"internal error while answering {cmd[:40]!r}: {type(e).__name__}"}
            for client in waiting:
                if result is LATER:
                    self.held.append(self.detach(client))
                else:
                    self._answer(client, result)
        super().work(now)

    def _answer(self, client: serving.Client, result: dict) -> None:
        try:
            data = encode(result)
        except ValueError as e:
            self.faults.record("control answer", e)
            data = encode({"error": f"internal error: answer not encodable ({e})"})
        self.send(client, data)


def listen(path: str) -> tuple[socket.socket, list[str]]:
    """A listening socket at `path`, and the directories made for it (for a failed start to remove)."""
    return serving.listen_unix(check_path(path), "control socket", BACKLOG, _clear, ControlError)


def _clear(path: str) -> None:
    if os.path.exists(path):
        try:
            request(path, "ping", timeout=1.0)
        except ControlError:
            os.unlink(path)  # left behind by a daemon that died
        else:
            raise ControlError(f"another nfacct daemon is already answering at {path}")
