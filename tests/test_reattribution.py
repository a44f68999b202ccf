"""Sockets that change hands: inherited across fork and exec, passed with SCM_RIGHTS, shared.

Every scenario runs real processes (the `holder` lab role) in the accounted namespace against
an echo server in the peer namespace, and is split into phases by reading the kernel's own nft
counters for the socket's port between them: what the daemon gives each process must equal the
kernel's count of the phases in which that process owned the socket, packet for packet.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time

import pytest
from conftest import count_port, exited_rows, facts, kernel, udp_out, until

from lab.daemon import Daemon
from lab.hosts import PEER_V4
from nfacct.engine import Engine
from nfacct.resolver import Answer
from nfacct.tables import COUNTER_NAMES, SockInfo

QUIET = 0.5  # lets delayed ACKs leave before a phase's counters are read
PR_SET_CHILD_SUBREAPER = 36


def minus(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {c: a[c] - b[c] for c in COUNTER_NAMES}


def phase(counters, proto: str, port: int) -> dict[str, int]:
    """The kernel's count so far, once the traffic of the phase has settled."""
    time.sleep(QUIET if proto == "tcp" else 0.1)
    return kernel(counters, proto, port)


def live_counts(daemon: Daemon) -> dict[int, dict[str, int]]:
    return {t["pid"]: {c: t[c] for c in COUNTER_NAMES} for t in daemon.top()}


def wait_seen_exit(daemon: Daemon, pid: int) -> None:
    """The daemon has marked `pid` exited (its row is written after the 1 s grace)."""
    assert until(lambda: pid in exited_rows(daemon.db), True), f"exit of {pid} not recorded"


class Holder:
    """A `holder` process (lab/roles.py): a command line in, one JSON line out."""

    def __init__(self, stdin, stdout, popen: subprocess.Popen | None = None):
        self.stdin, self.stdout, self.popen = stdin, stdout, popen
        self.pid = self.answer()["pid"]  # the "ready" line
        assert popen is None or popen.pid == self.pid  # `ip netns exec` execs: no process between

    def answer(self) -> dict:
        line = self.stdout.readline()
        assert line, "the holder ended unexpectedly"
        return json.loads(line)

    def tell(self, command: str) -> None:
        self.stdin.write(command + "\n")
        self.stdin.flush()

    def ask(self, command: str) -> dict:
        self.tell(command)
        return self.answer()

    def send(self, rounds: int) -> None:
        assert "received" in self.ask(f"send {rounds}")

    def end(self) -> None:
        """Close its stdin and wait until the process has ended (reaped, so its exit is final)."""
        if not self.stdin.closed:
            self.stdin.close()
        if self.popen is not None:
            assert self.popen.wait(timeout=10) == 0
        else:  # adopted by us (child subreaper) once its parent ended
            assert wait_child(self.pid, 10) == 0


def wait_child(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None  # not (or no longer) our child
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            raise TimeoutError(f"holder {pid} did not end")
        time.sleep(0.02)


@pytest.fixture
def subreaper():
    """Holders spawned by holders are orphaned when their parent ends: adopt and reap them here."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture
def holders(subreaper):
    """Holders a test starts; all are ended at teardown, killed if they do not end on EOF."""
    started: list[Holder] = []
    yield started
    for h in reversed(started):
        for f in (h.stdin, h.stdout):
            if not f.closed:
                f.close()
    for h in started:
        try:
            if h.popen is not None:
                h.popen.wait(timeout=5)
            else:
                wait_child(h.pid, 5)
        except (subprocess.TimeoutExpired, TimeoutError):
            if h.popen is not None:
                h.popen.kill()
                h.popen.wait()
            else:
                os.kill(h.pid, signal.SIGKILL)
                wait_child(h.pid, 5)


@pytest.fixture(params=["udp", "tcp"])
def proto(request):
    return request.param


@pytest.fixture
def echo(lab, port, proto):
    p = port()
    server = lab.role(lab.peer, "echo-server", "--proto", proto, "--port", str(p))
    assert json.loads(server.stdout.readline())["ready"]
    yield p
    server.kill()
    server.wait()


@pytest.fixture
def own_daemon(lab, rules, tmp_path):
    """A daemon of the test's own, with a fresh database."""
    d = Daemon(lab.acct, tmp_path)
    yield d
    assert d.stop() == 0, d.log.read_text()


class Scene:
    """One socket (port `sport`) and the holders that pass it around."""

    def __init__(self, lab, counters, port, proto, echo, holders, tmp_path):
        self.lab, self.counters, self.proto, self.echo = lab, counters, proto, echo
        self.holders, self.tmp_path = holders, tmp_path
        self.sport = port()
        count_port(counters, proto, self.sport)

    def _args(self) -> list[str]:
        return ["--proto", self.proto, "--connect", PEER_V4, "--port", str(self.echo)]

    def opener(self, child_pipes: bool = False) -> Holder:
        """A holder that opens the socket; with `child_pipes`, it can `spawn` an heir we talk to."""
        fds = ()
        if child_pipes:
            self._to_child = os.pipe()
            self._from_child = os.pipe()
            fds = (self._to_child[0], self._from_child[1])
        p = self.lab.role(self.lab.acct, "holder", *self._args(), "--sport", str(self.sport), pass_fds=fds)
        for fd in fds:
            os.close(fd)  # the heir's ends now live in the opener only
        h = Holder(p.stdin, p.stdout, p)
        self.holders.append(h)
        return h

    def spawn_heir(self, parent: Holder) -> Holder:
        """`parent` forks and execs a new holder that inherits the socket."""
        child = parent.ask(f"spawn {self._to_child[0]} {self._from_child[1]}")["child"]
        heir = Holder(os.fdopen(self._to_child[1], "w"), os.fdopen(self._from_child[0]))
        self.holders.append(heir)
        assert heir.pid == child
        return heir

    def receiver(self) -> Holder:
        """An unrelated holder (started by us, not by the opener) waiting for the socket."""
        self.path = str(self.tmp_path / "pass.sock")
        p = self.lab.role(self.lab.acct, "holder", *self._args(), "--listen", self.path)
        h = Holder(p.stdin, p.stdout, p)
        self.holders.append(h)
        return h

    def pass_fd(self, sender: Holder, receiver: Holder) -> None:
        """SCM_RIGHTS over a UNIX socket; both still hold the socket afterwards."""
        receiver.tell("receive")
        assert sender.ask(f"pass {self.path}")["passed"]
        assert receiver.answer()["received_fd"]

    def hand_over(self, how: str, a: Holder) -> Holder:
        if how == "fork-exec":
            return self.spawn_heir(a)
        b = self.receiver()
        self.pass_fd(a, b)
        return b

    def kernel(self) -> dict[str, int]:
        return phase(self.counters, self.proto, self.sport)


def assert_phase_shape(proto: str, counts: dict[str, int], rounds: int) -> None:
    """Sanity: the kernel saw the exchange we asked for (UDP: one datagram each way per round)."""
    if proto == "udp":
        assert counts["udpsndpacks"] == counts["udprcvpacks"] == rounds, counts
        assert counts["udpsndbytes"] == counts["udprcvbytes"] == rounds * (300 + 28), counts
    else:
        assert counts["tcpsndpacks"] >= rounds and counts["tcprcvpacks"] >= rounds, counts


def assert_recorded(daemon: Daemon, expected: dict[int, dict[str, int]], within: float = 10.0) -> None:
    """exited_tasks holds exactly `expected` for these pids (late FIN/ACK included)."""

    def rows():
        r = exited_rows(daemon.db)
        return {pid: {c: r[pid][c] for c in COUNTER_NAMES} for pid in expected if pid in r}

    assert until(rows, expected, within) == expected


@pytest.mark.parametrize("how", ["fork-exec", "scm-rights"])
def test_socket_follows_its_holder_when_the_first_exits(
    lab, counters, port, proto, echo, own_daemon, holders, tmp_path, how
):
    """A sends N and hands the socket to B (an exec'd child, or an unrelated process over a
    UNIX socket) and exits; B sends M. A is recorded with exactly N's packets, B with M's."""
    daemon = own_daemon
    scene = Scene(lab, counters, port, proto, echo, holders, tmp_path)
    a = scene.opener(child_pipes=how == "fork-exec")
    a.send(5)
    k1 = scene.kernel()
    assert_phase_shape(proto, k1, 5)
    assert until(lambda: live_counts(daemon).get(a.pid), k1) == k1

    b = scene.hand_over(how, a)
    a.end()
    wait_seen_exit(daemon, a.pid)
    b.send(7)
    k2 = scene.kernel()
    assert_phase_shape(proto, minus(k2, k1), 7)
    assert until(lambda: live_counts(daemon).get(b.pid), minus(k2, k1)) == minus(k2, k1)
    assert_recorded(daemon, {a.pid: k1})

    b.end()  # a TCP socket closes now: its FIN and last ACK count for B
    k3 = scene.kernel()
    assert_recorded(daemon, {a.pid: k1, b.pid: minus(k3, k1)})
    if how == "fork-exec":
        assert "--fd" in exited_rows(daemon.db)[b.pid]["cmdline"]  # the exec'd program's cmdline


@pytest.mark.parametrize("how", ["fork-exec", "scm-rights"])
def test_two_live_holders_count_for_the_first_until_it_exits(
    lab, counters, port, proto, echo, own_daemon, holders, tmp_path, how
):
    """The documented rule: a socket held by two live processes counts for the one it was first
    attributed to, whichever of them sends, even after that one closed its copy; from its
    exit on, the next packet moves it to the remaining holder."""
    daemon = own_daemon
    scene = Scene(lab, counters, port, proto, echo, holders, tmp_path)
    a = scene.opener(child_pipes=how == "fork-exec")
    a.send(3)
    b = scene.hand_over(how, a)
    b.send(4)  # both alive: still A's
    a.send(2)
    assert a.ask("close")["closed"]  # A keeps running without the socket
    b.send(3)  # still A's: a closed copy is not noticed while A lives
    k1 = scene.kernel()
    assert_phase_shape(proto, k1, 3 + 4 + 2 + 3)
    got = until(lambda: {p: c for p, c in live_counts(daemon).items() if p in (a.pid, b.pid)}, {a.pid: k1})
    assert got == {a.pid: k1}

    a.end()
    wait_seen_exit(daemon, a.pid)
    b.send(6)
    k2 = scene.kernel()
    assert_phase_shape(proto, minus(k2, k1), 6)
    b.end()
    k3 = scene.kernel()
    assert_recorded(daemon, {a.pid: k1, b.pid: minus(k3, k1)})


def test_late_packets_of_a_socket_nobody_holds_go_to_its_exited_owner_at_once(
    lab, counters, port, own_daemon, holders
):
    """The other side of the re-check: A closes a TCP connection and exits, and packets of it
    arrive afterwards (the peer's ACK of A's FIN, or the peer's own FIN later). No process holds
    the socket any more (sock_diag: no inode, FIN_WAIT2 or TIME_WAIT), so they count for A on
    the first look, not after the retries meant for connections waiting to be accepted."""
    daemon = own_daemon
    server_port, sport = port(), port()
    count_port(counters, "tcp", sport)
    args = ["--proto", "tcp", "--connect", PEER_V4, "--port", str(server_port)]
    p = lab.role(lab.peer, "holder", *args, "--accept")
    peer = Holder(p.stdin, p.stdout, p)
    holders.append(peer)
    p = lab.role(lab.acct, "holder", *args, "--sport", str(sport), "--linger2", "120")
    a = Holder(p.stdin, p.stdout, p)
    holders.append(a)
    assert peer.ask("accept")["accepted"]
    gave_up = daemon.status()["resolver"]["gave_up"]

    a.end()  # A's FIN goes out and is acknowledged; the connection waits in FIN_WAIT2
    wait_seen_exit(daemon, a.pid)
    k1 = phase(counters, "tcp", sport)
    assert_recorded(daemon, {a.pid: k1}, within=1.0)
    assert peer.ask("close")["closed"]  # the peer's FIN, well after A's exit; A's kernel answers
    k2 = phase(counters, "tcp", sport)
    late = minus(k2, k1)
    assert late["tcprcvpacks"] == late["tcpsndpacks"] == 1, late
    assert_recorded(daemon, {a.pid: k2}, within=1.0)
    # One re-check (for the first packet after the exit, whichever it was) and it found nobody.
    assert daemon.status()["resolver"]["gave_up"] == gave_up + 1


# ---- the same transitions in-process, for the orders the kernel tests cannot force ------------


def test_engine_counts_a_recheck_for_whoever_it_finds_and_loses_nothing():
    submitted = []
    engine = Engine(submit=lambda key, ifindex: submitted.append(key))
    tables = engine.tables
    out, key = udp_out(5000)
    engine.account(out, True)
    engine.apply_answers([Answer(key, facts(1))])
    a = tables.tasks[(1, 1001.0)]
    engine.account(out, True)
    assert a.counters[4:6] == [2, 200] and submitted == [key]

    tables.exited(a, 10.0)  # B holds the socket now; its first packet asks again
    engine.account(out, True)
    engine.account(out, True)  # still in flight: counted aside, for whoever is found
    assert tables.socks[key].state == SockInfo.RECHECK and submitted == [key, key]
    assert a.counters[4:6] == [2, 200]
    engine.apply_answers([Answer(key, facts(2))])
    engine.apply_answers([Answer(key, facts(2))])  # a stale second answer adds nothing
    b = tables.tasks[(2, 1002.0)]
    assert (a.counters[4:6], b.counters[4:6]) == ([2, 200], [2, 200])

    tables.exited(b, 20.0)  # B exits and nobody holds the socket: the late packet is B's
    engine.account(out, True)
    engine.apply_answers([Answer(key, None)])
    assert b.counters[4:6] == [3, 300] and tables.socks[key].state == SockInfo.RESOLVED

    out, key = udp_out(5001)  # C's flow: C exits, a packet asks again, GC drops the flow first
    engine.account(out, True)
    engine.apply_answers([Answer(key, facts(3))])
    c = tables.tasks[(3, 1003.0)]
    tables.exited(c, 30.0)
    engine.account(out, True)
    tables.remove_sock(tables.socks[key])
    engine.apply_answers([Answer(key, facts(4))])  # the answer finds no flow: ignored
    assert c.counters[4:6] == [2, 200] and (4, 1004.0) not in tables.tasks
    assert tables.unidentified == [0] * 8
