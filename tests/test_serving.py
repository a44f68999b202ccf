"""The bounded non-blocking server that control, atop and the metrics endpoint share (nfacct.serving).

Real UNIX and TCP sockets on loopback and a real selector, driven turn by turn as the daemon's
loop drives them; a small protocol plays the part of control, atop or scrape. Deadlines are
reached by passing `work` a later clock, not by waiting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import selectors
import socket
import time

import pytest

from nfacct import control, serving
from nfacct.faults import Faults

BIG = b"x" * (4 << 20)  # more than any socket buffer holds


def terms(**changes) -> serving.Terms:
    base = serving.Terms(
        kind="test",
        max_clients=2,
        when_full=serving.WhenFull.WAIT,
        max_request=64,
        terminator=b"\n",
        request_timeout=5.0,
        answer_timeout=10.0,
    )
    return dataclasses.replace(base, **changes)


class Upper(serving.Server):
    """A line in, the line in capitals out (with no terminator: each fixed-size request); `big`
    gets BIG, and a line without its end within 64 bytes gets `too long`. With `defer`, requests
    wait in `waiting` until `release`."""

    def __init__(self, listener: socket.socket, sel: selectors.BaseSelector, t: serving.Terms):
        self.defer = False
        self.waiting: list[tuple[serving.Client, bytes]] = []
        self.requests: list[bytes] = []
        super().__init__(listener, sel, Faults(), t)

    def on_request(self, client: serving.Client, request: bytes) -> None:
        self.requests.append(request)
        if self.defer:
            self.waiting.append((client, request))
        else:
            self.send(client, self.answer(request))

    def on_drop(self, client: serving.Client) -> None:
        self.waiting = [(c, r) for c, r in self.waiting if c is not client]

    def answer(self, request: bytes) -> bytes:
        if len(request) > self.terms.max_request:
            return b"too long\n"
        return BIG if request == b"big" else request.upper() + b"\n"

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for client, request in waiting:
            self.send(client, self.answer(request))


class Loop:
    """A selector and a server on it; the test plays the clients between turns."""

    def __init__(self, sel: selectors.BaseSelector, server: serving.Server, address: str | tuple):
        self.sel, self.server, self.address = sel, server, address
        self.family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET

    def turn(self, seconds: float = 0.01) -> None:
        for key, mask in self.sel.select(seconds):
            key.data(mask)
        self.server.work()

    def connect(self, rcvbuf: int | None = None) -> socket.socket:
        s = socket.socket(self.family, socket.SOCK_STREAM)
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect(self.address)
        s.setblocking(False)
        return s

    def read(self, s: socket.socket, within: float = 5.0) -> bytes | None:
        """What `s` is sent until the server closes it; None if it is still open after `within`."""
        data = []
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self.turn()
            try:
                while chunk := s.recv(1 << 20):
                    data.append(chunk)
                return b"".join(data)
            except BlockingIOError:
                continue
        return None

    def close(self) -> None:
        self.server.close()
        self.sel.close()


def upper(listener: socket.socket, **changes) -> Loop:
    sel = selectors.DefaultSelector()
    return Loop(sel, Upper(listener, sel, terms(**changes)), listener.getsockname())


@pytest.fixture
def unix(tmp_path):
    loops: list[Loop] = []

    def make(**changes) -> Loop:
        path = str(tmp_path / f"s{len(loops)}.sock")
        listener, _created = serving.listen_unix(path, "test socket", 16, lambda _p: None, OSError)
        loops.append(upper(listener, **changes))
        return loops[-1]

    yield make
    for lp in loops:
        lp.close()


@pytest.fixture
def tcp():
    loops: list[Loop] = []

    def make(**changes) -> Loop:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        loops.append(upper(listener, **changes))
        return loops[-1]

    yield make
    for lp in loops:
        lp.close()


def test_one_request_one_answer_then_the_connection_is_closed(unix):
    loop = unix()
    s = loop.connect()
    s.sendall(b"hello\nsecond\n")  # what follows the first request is not read as one
    assert loop.read(s) == b"HELLO\n"
    assert loop.server.requests == [b"hello"] and loop.server.answered == 1


def test_beyond_the_limit_newcomers_wait_in_the_backlog_until_a_slot_frees(unix):
    loop = unix()
    silent = [loop.connect(), loop.connect()]
    for _ in range(5):
        loop.turn()
    newcomer = loop.connect()  # the kernel accepts it into the backlog: connect returns at once
    newcomer.sendall(b"me\n")
    assert loop.read(newcomer, within=0.5) is None  # not accepted while both slots are taken
    assert loop.server.requests == []
    silent[0].sendall(b"a\n")  # a slot frees once its answer is out
    assert loop.read(silent[0]) == b"A\n"
    assert loop.read(newcomer) == b"ME\n"
    assert loop.server.dropped == 0 and loop.server.refused == 0


def test_beyond_the_limit_refuse_closes_newcomers_at_once(unix):
    loop = unix(when_full=serving.WhenFull.REFUSE)
    kept = [loop.connect(), loop.connect()]
    for _ in range(5):
        loop.turn()
    assert loop.read(loop.connect()) == b""  # closed without an answer, not left waiting
    assert loop.server.refused == 1
    kept[1].sendall(b"b\n")
    assert loop.read(kept[1]) == b"B\n"


def test_beyond_the_limit_evict_makes_room_from_the_silent_longest_only(unix):
    loop = unix(when_full=serving.WhenFull.EVICT)
    loop.server.defer = True
    waits = loop.connect()
    waits.sendall(b"w\n")
    for _ in range(5):
        loop.turn()
    silent = loop.connect()
    for _ in range(5):
        loop.turn()
    newcomer = loop.connect()
    assert loop.read(silent) == b""  # it made room
    assert loop.server.dropped == 1
    late = loop.connect()  # the newcomer is now the silent one: it goes, a client waiting for us stays
    newcomer_gone = loop.read(newcomer)
    assert newcomer_gone == b"" and loop.server.dropped == 2
    late.sendall(b"late\n")
    for _ in range(5):
        loop.turn()
    assert len(loop.server.waiting) == 2  # both wait for answers: a newcomer now waits in the backlog
    third = loop.connect()
    assert loop.read(third, within=0.5) is None and loop.server.dropped == 2
    loop.server.defer = False
    loop.server.release()
    assert loop.read(waits) == b"W\n" and loop.read(late) == b"LATE\n"
    third.sendall(b"t\n")
    assert loop.read(third) == b"T\n"


def test_a_silent_client_is_dropped_at_its_request_deadline_not_one_that_waits_for_us(unix):
    loop = unix()
    loop.server.defer = True
    silent, waiting = loop.connect(), loop.connect()
    silent.sendall(b"no end")
    waiting.sendall(b"w\n")
    for _ in range(5):
        loop.turn()
    loop.server.work(time.monotonic() + loop.server.terms.request_timeout + 0.1)
    assert loop.server.dropped == 1
    assert loop.read(silent) == b""
    loop.server.release()  # its answer is ours to give, however long it took
    assert loop.read(waiting) == b"W\n"


def test_a_client_that_never_reads_its_answer_is_dropped_at_the_answer_deadline(unix):
    loop = unix()
    stuck = loop.connect(rcvbuf=4096)
    stuck.sendall(b"big\n")
    for _ in range(10):
        loop.turn()
    other = loop.connect()  # served meanwhile: the stuck client holds no one up
    other.sendall(b"o\n")
    assert loop.read(other) == b"O\n"
    loop.server.work(time.monotonic() + loop.server.terms.answer_timeout + 0.1)
    assert loop.server.dropped == 1 and loop.server.answered == 1
    stuck.setblocking(True)
    taken = b""
    while chunk := stuck.recv(1 << 20):  # what reached its buffer, then the close
        taken += chunk
    assert 0 < len(taken) < len(BIG)


def test_a_request_too_long_is_answered_and_the_answer_survives_the_bytes_left_unread(tcp):
    loop = tcp()
    s = loop.connect()
    s.setblocking(True)
    s.sendall(b"a" * 32768)  # no end within 64 bytes, and far more than the server reads of it
    s.setblocking(False)
    assert loop.read(s) == b"too long\n"  # a reset would have lost it
    assert loop.server.requests == [b"a" * 65]


def test_kept_connections_have_no_deadline_between_requests_and_take_them_one_at_a_time(unix):
    loop = unix(keep=True, terminator=None, max_request=4, max_clients=3)
    idle, pipelined, halfway = loop.connect(), loop.connect(), loop.connect()
    pipelined.sendall(b"abcdefgh")
    answers = b""
    while len(answers) < 10:
        loop.turn()
        with contextlib.suppress(BlockingIOError):
            answers += pipelined.recv(100)
    assert answers == b"ABCD\nEFGH\n" and loop.server.requests == [b"abcd", b"efgh"]
    loop.server.work(time.monotonic() + 3600)  # idle between requests: no deadline runs
    assert loop.server.dropped == 0
    halfway.sendall(b"ab")  # its request's deadline runs from its first byte
    for _ in range(5):
        loop.turn()
    loop.server.work(time.monotonic() + loop.server.terms.request_timeout + 0.1)
    assert loop.server.dropped == 1 and loop.read(halfway) == b""
    idle.sendall(b"wxyz")
    pipelined.sendall(b"ijkl")
    for _ in range(5):
        loop.turn()
    for s, answer in ((idle, b"WXYZ\n"), (pipelined, b"IJKL\n")):
        assert s.recv(100) == answer
        with pytest.raises(BlockingIOError):  # kept open after its answer: no end follows
            s.recv(100)


def test_an_accept_that_fails_is_recorded_by_kind_and_tried_again_next_turn(unix):
    loop = unix()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    waiting = loop.connect()  # in the backlog: accept would need one more descriptor
    fillers = []
    try:
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
        while True:  # every descriptor below the limit taken
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        for _ in range(3):
            loop.turn()
        assert loop.server.faults.counts == {"test accept: OSError": 3}
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    waiting.sendall(b"x\n")
    assert loop.read(waiting) == b"X\n"


def test_the_control_socket_keeps_clients_beyond_its_limit_waiting_and_refuses_a_long_request(tmp_path):
    sel = selectors.DefaultSelector()
    server = control.Server(str(tmp_path / "control.sock"), lambda cmd: {"ok": cmd}, sel, Faults())
    loop = Loop(sel, server, server.path)
    try:
        silent = [loop.connect() for _ in range(control.MAX_CLIENTS)]
        for _ in range(5):
            loop.turn()
        asking = loop.connect()
        asking.sendall(b'{"cmd": "ping"}\n')
        assert loop.read(asking, within=0.5) is None  # waits in the backlog
        server.work(time.monotonic() + control.REQUEST_TIMEOUT + 0.1)
        assert server.status()["dropped_at_deadline"] == control.MAX_CLIENTS
        assert loop.read(asking) == b'{"ok": "ping"}\n'
        greedy = loop.connect()
        greedy.sendall(b" " * (control.MAX_REQUEST + 100))
        assert loop.read(greedy) == b'{"error": "bad request: longer than 4096 bytes"}\n'
        assert server.status() | {"clients": 0} == {
            "clients": 0,
            "answered": 2,
            "dropped_at_deadline": control.MAX_CLIENTS,
            "bad_requests": 1,
        }
        for s in silent:
            s.close()
    finally:
        loop.close()
