"""atop's netatop-bpf socket (`nfacct run --atop-socket`), tested with a client written to atop's
own layout and reading as atop does (one `recv(96)` per record, no MSG_WAITALL); with the real
`atop -K` too when an atop >= 2.10 is at hand (NFACCT_ATOP=/path/to/atop, or on PATH).

The counters a client is served must equal the kernel's nft counters for the process's flows
and `nfacct top --json`; exited processes must reach every client, in the reply of the sample
after the exit too, even once the engine's GC has dropped them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import count_port, kernel, until

from lab.daemon import Daemon
from lab.hosts import PEER_V4, Counters, Lab
from nfacct import atop
from nfacct.cli import HANDED_OVER
from nfacct.faults import Faults
from nfacct.rules import Rules
from nfacct.tables import COUNTER_NAMES

RECORD = struct.Struct("=i4xQ16s8Q")  # atop's struct netpertask on x86-64, written out again here


class AtopClient:
    """A client as atop 2.10-2.13 is (netatopbpfif.c): one 96-byte request per sample, then
    one recv(96) per record until a record with id 0; a short record is atop's garbage."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)

    def request(self) -> None:
        self.sock.sendall(os.urandom(96))  # atop sends uninitialised memory

    def read_reply(self) -> list[dict]:
        records = []
        while True:
            data = self.sock.recv(96)
            assert data, "the server closed the connection (atop would drop this sample)"
            assert len(data) == 96, f"a record came in pieces: recv(96) returned {len(data)} bytes"
            pid, btime, command, *counters = RECORD.unpack(data)
            if pid == 0:
                return records
            name = command.rstrip(b"\0")
            records.append(
                {
                    "pid": pid,
                    "btime": btime,
                    "command": name,
                    **dict(zip(COUNTER_NAMES, counters, strict=True)),
                }
            )

    def sample(self) -> dict[int, dict]:
        self.request()
        return {r["pid"]: r for r in self.read_reply()}

    def close(self) -> None:
        self.sock.close()


def counters_of(record: dict | None) -> dict[int, int] | None:
    return None if record is None else {k: record[k] for k in COUNTER_NAMES}


def task(pid: int, counters: list[int], exited: bool = False, btime: float = 1000.5, comm: str = "p") -> dict:
    return {
        "pid": pid,
        "btime": btime,
        "comm": comm,
        "exit_time": 5.0 if exited else None,
        **dict(zip(COUNTER_NAMES, counters, strict=True)),
    }


def decode(reply: bytes) -> list[tuple]:
    """(pid, btime, command, counters) of each record before the end record."""
    out = [RECORD.unpack_from(reply, i) for i in range(0, len(reply), RECORD.size)]
    assert out[-1][0] == 0 and len(reply) % RECORD.size == 0
    return [(pid, btime, command.rstrip(b"\0"), list(c)) for pid, btime, command, *c in out[:-1]]


# ---- what is served (Feed: no I/O) -------------------------------------------------------------


def test_record_layout_is_atops_struct_netpertask():
    """Offsets of netatop.h's struct on x86-64: id 0, btime 8, command 16, counters 32..95."""
    data = atop.record(4242, 1_700_000_000.9, "curl", list(range(1, 9)))
    assert len(data) == 96 == atop.REQUEST_SIZE
    assert int.from_bytes(data[0:4], "little", signed=True) == 4242
    assert data[4:8] == b"\0" * 4
    assert int.from_bytes(data[8:16], "little") == 1_700_000_000  # whole seconds, as atop's gen.btime
    assert data[16:32] == b"curl" + b"\0" * 12
    assert [int.from_bytes(data[32 + 8 * i : 40 + 8 * i], "little") for i in range(8)] == list(range(1, 9))


def test_hostile_names_are_sent_as_their_bytes_and_always_nul_terminated():
    name = "\x1b[2J" + "\udcff" * 20  # an escape sequence, then bytes that are not UTF-8
    data = atop.record(7, 1.0, name, [0] * 8)
    assert data[16:31] == (b"\x1b[2J" + b"\xff" * 20)[:15] and data[31] == 0


def test_counters_never_go_down():
    feed = atop.Feed()
    feed.observe([task(10, [5, 500, 3, 300, 0, 0, 0, 0])])
    assert decode(feed.reply(1))[0][3] == [5, 500, 3, 300, 0, 0, 0, 0]
    feed.observe([task(10, [4, 600, 3, 200, 1, 28, 0, 0])])  # a lower reading (e.g. a stale kernel counter)
    assert decode(feed.reply(1))[0][3] == [5, 600, 3, 300, 1, 28, 0, 0]


def test_an_exit_is_served_to_each_client_in_two_replies_even_after_the_engine_dropped_it():
    feed = atop.Feed()
    feed.observe([task(10, [1] * 8), task(11, [2] * 8)])
    feed.reply(1), feed.reply(1), feed.reply(2), feed.reply(2)  # both clients are past their first samples
    feed.observe([task(10, [1] * 8), task(11, [3] * 8, exited=True)])
    assert [r[0] for r in decode(feed.reply(1))] == [11, 10]
    feed.observe([task(10, [1] * 8)])  # the engine's GC dropped 11
    assert [(r[0], r[3]) for r in decode(feed.reply(1))] == [(11, [3] * 8), (10, [1] * 8)]
    assert [(r[0], r[3]) for r in decode(feed.reply(2))] == [(11, [3] * 8), (10, [1] * 8)]
    feed.observe([task(10, [1] * 8)])
    assert [r[0] for r in decode(feed.reply(1))] == [10]  # twice is enough for client 1
    assert [r[0] for r in decode(feed.reply(2))] == [11, 10]  # client 2 had had it once only
    feed.observe([task(10, [1] * 8)])
    assert feed.retained == 0  # every client had it twice: forgotten


def test_a_reused_pid_puts_the_live_process_last():
    """atop keeps the last record per pid: the live process must win over an exited namesake."""
    feed = atop.Feed()
    feed.observe([task(10, [9] * 8, exited=True, btime=100.0), task(10, [1] * 8, btime=200.0)])
    assert [(r[0], r[1]) for r in decode(feed.reply(1))] == [(10, 100), (10, 200)]


def test_exits_kept_past_the_engines_tables_are_bounded_and_the_excess_is_counted():
    feed = atop.Feed(max_retained=3)
    feed.reply(1)  # a client that never asks again would otherwise keep every exit
    feed.observe([task(pid, [1] * 8, exited=True) for pid in range(100, 105)])
    assert (feed.retained, feed.forgotten) == (5, 0)  # the engine still has them: no cost here
    feed.observe([])  # its GC dropped them
    assert (feed.retained, feed.forgotten) == (3, 2)


# ---- the socket: whole records, bounded clients, deadlines (real sockets, a fake snapshot) ------


class Loop:
    """The daemon's loop reduced to what the atop server needs, in a thread."""

    def __init__(self, path: str, tasks: list[dict]) -> None:
        self.sel = selectors.DefaultSelector()
        self.faults = Faults()
        self.server = atop.Server(path, lambda: tasks, self.sel, self.faults)
        self.turns = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, mask in self.sel.select(timeout=0.02):
                key.data(mask)
            self.server.work()
            self.turns += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()
        self.sel.close()


@pytest.fixture
def loop_with(tmp_path):
    made: list[Loop] = []

    def make(tasks: list[dict]) -> Loop:
        made.append(Loop(str(tmp_path / "atop.sock"), tasks))
        return made[-1]

    yield make
    for loop in made:
        loop.close()


def test_a_reply_larger_than_the_socket_buffer_reaches_a_slow_reader_in_whole_records(loop_with, monkeypatch):
    tasks = [task(pid, [pid, 2 * pid, 0, 0, 0, 0, 0, pid]) for pid in range(1, 20_001)]  # 1.9 MB
    loop = loop_with(tasks)
    assert oct(os.stat(loop.server.path).st_mode & 0o777) == "0o600"
    slow = AtopClient(loop.server.path)
    slow.request()
    time.sleep(0.5)  # the server fills the socket buffer and waits for room
    fast = AtopClient(loop.server.path)  # meanwhile, the loop serves another client at once
    started = time.monotonic()
    assert len(fast.sample()) == 20_000
    assert time.monotonic() - started < 5
    records = []
    while True:  # one recv(96) per record, reading as slowly as a busy atop might
        data = slow.sock.recv(96)
        assert len(data) == 96, len(data)
        if RECORD.unpack(data)[0] == 0:
            break
        records.append(RECORD.unpack(data))
        if len(records) % 2000 == 0:
            time.sleep(0.01)
    assert [(r[0], r[3], r[10]) for r in records] == [(p, p, p) for p in range(1, 20_001)]
    assert loop.server.split_sends == 0
    assert len(slow.sample()) == 20_000  # the same connection serves the next sample


def test_a_client_that_stops_reading_or_stops_mid_request_is_dropped_at_its_deadline(loop_with, monkeypatch):
    monkeypatch.setattr(atop, "REPLY_TIMEOUT", 0.5)
    monkeypatch.setattr(atop, "REQUEST_TIMEOUT", 0.5)
    loop = loop_with([task(pid, [1] * 8) for pid in range(1, 20_001)])
    stuck = AtopClient(loop.server.path)
    stuck.request()  # and never reads: 1.9 MB will not fit its socket buffer
    half = AtopClient(loop.server.path)
    half.sock.sendall(b"x" * 50)  # and never the rest
    assert until(lambda: loop.server.dropped, 2, within=5) == 2
    assert loop.server.status()["clients"] == 0
    half.sock.settimeout(1)
    assert half.sock.recv(96) == b""  # closed: atop would skip the sample and reconnect


def test_connections_beyond_the_limit_are_closed_at_once_not_left_waiting(loop_with):
    loop = loop_with([task(1, [1] * 8)])
    clients = [AtopClient(loop.server.path) for _ in range(atop.MAX_CLIENTS)]
    for c in clients:
        assert set(c.sample()) == {1}
    extra = AtopClient(loop.server.path)
    extra.sock.settimeout(5)
    assert extra.sock.recv(96) == b""  # atop, blocked in recv without a timeout, is not left hanging
    assert loop.server.refused == 1


def test_a_live_server_at_the_path_is_refused_and_a_stale_socket_is_replaced(tmp_path):
    path = str(tmp_path / "atop.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen()
    with pytest.raises(atop.AtopError, match="another server"):
        atop.listen(path)
    live.close()  # the file stays, nobody listens: what a killed server leaves
    s, _, inode = atop.listen(path)
    assert os.lstat(path).st_ino == inode
    s.close()
    os.unlink(path)
    Path(path).write_text("not a socket")
    with pytest.raises(atop.AtopError, match="not a socket"):
        atop.check_usable(path)


# ---- a real daemon in a throwaway namespace ----------------------------------------------------


@pytest.fixture(scope="module")
def atop_daemon(lab, rules, tmp_path_factory):
    """A daemon serving atop, with a 1-second GC so that exited processes leave its tables soon."""
    directory = tmp_path_factory.mktemp("atop")
    path = str(directory / "atop.sock")
    d = Daemon(lab.acct, directory, "--atop-socket", path, "--gc-cycle", "1", "--closed-idle", "1")
    d.atop = path
    yield d
    assert d.stop() == 0, d.log.read_text()
    assert not os.path.exists(path), "the daemon left its atop socket behind"


def start_role(lab, procs, ns, *args):
    p = lab.role(ns, *args)
    procs.append(p)
    return p, json.loads(p.stdout.readline())


def echo_server(lab, procs, port: int) -> None:
    start_role(lab, procs, lab.peer, "echo-server", "--port", str(port))
    start_role(lab, procs, lab.peer, "echo-server", "--proto", "udp", "--port", str(port))


def top_of(daemon, pid: int) -> dict | None:
    return next((t for t in daemon.top() if t["pid"] == pid), None)


def agree(read_kernel, read_served, within: float = 10.0) -> tuple[dict, dict | None]:
    """Poll the kernel's counters and what is served until they agree (lookups and late ACKs
    settle), or `within` seconds pass; returns both."""
    deadline = time.monotonic() + within
    while True:
        expected, served = read_kernel(), read_served()
        if served == expected or time.monotonic() > deadline:
            return expected, served
        time.sleep(0.1)


def test_served_counters_equal_the_kernels_and_top(lab, counters, atop_daemon, procs, port):
    server, sport = port(), port()
    echo_server(lab, procs, server)
    count_port(counters, "tcp", sport)
    client = AtopClient(atop_daemon.atop)
    _p, report = start_role(
        lab, procs, lab.acct, "client", "--connect", PEER_V4, "--port", str(server), "--sport", str(sport),
        "--rounds", "20", "--size", "3000", "--hold",
    )  # fmt: skip
    pid = report["pid"]
    expected, served = agree(
        lambda: kernel(counters, "tcp", sport), lambda: counters_of(client.sample().get(pid))
    )
    assert expected["tcpsndpacks"] > 20
    assert served == expected
    ours = top_of(atop_daemon, pid)
    assert {k: ours[k] for k in COUNTER_NAMES} == expected
    record = client.sample()[pid]
    assert record["btime"] == int(ours["btime"]) == int(psutil.Process(pid).create_time())
    assert record["command"] == os.fsencode(ours["comm"])[:15]
    client.close()


def test_counters_grow_and_never_drop_over_samples_on_one_connection(lab, counters, atop_daemon, procs, port):
    server, sport = port(), port()
    echo_server(lab, procs, server)
    count_port(counters, "udp", sport)
    p, report = start_role(
        lab, procs, lab.acct, "holder", "--proto", "udp", "--connect", PEER_V4, "--port", str(server),
        "--sport", str(sport),
    )  # fmt: skip
    pid = report["pid"]
    client = AtopClient(atop_daemon.atop)
    seen = []
    for _ in range(6):
        p.stdin.write("send 5\n")
        p.stdin.flush()
        assert json.loads(p.stdout.readline())["received"] == 5 * 300
        expected, served = agree(
            lambda: kernel(counters, "udp", sport), lambda: counters_of(client.sample().get(pid))
        )
        assert served == expected
        seen.append(served)
    for before, after in itertools.pairwise(seen):
        assert all(after[k] >= before[k] for k in COUNTER_NAMES)
    assert seen[-1]["udpsndpacks"] == 30 and seen[-1]["udprcvpacks"] == 30
    status = atop_daemon.status()["atop"]
    assert status["clients"] >= 1 and status["split_sends"] == 0
    client.close()


def test_an_exit_reaches_every_client_twice_even_after_the_gc_dropped_it(
    lab, counters, atop_daemon, procs, port
):
    server, sport = port(), port()
    echo_server(lab, procs, server)
    count_port(counters, "tcp", sport)
    first, second = AtopClient(atop_daemon.atop), AtopClient(atop_daemon.atop)
    for _ in range(2):  # both past their first samples, as a running atop is
        first.sample(), second.sample()
    p, report = start_role(
        lab, procs, lab.acct, "client", "--connect", PEER_V4, "--port", str(server), "--sport", str(sport),
        "--rounds", "7",
    )  # fmt: skip
    pid = report["pid"]
    p.wait(timeout=10)
    # The engine saw the exit, wrote the task and its GC dropped it: only the atop feed has it now.
    assert until(lambda: any(t["pid"] == pid for t in atop_daemon.top()), False, within=15) is False
    expected = kernel(counters, "tcp", sport)
    assert expected["tcpsndpacks"] >= 7
    for client in (first, second):
        served = [counters_of(client.sample().get(pid)) for _ in range(3)]
        assert served == [expected, expected, None]


def test_a_takeover_moves_the_atop_socket_and_counters_go_on(tmp_path, port, procs, daemons):
    """The successor serves atop at the same path once the predecessor has gone; a client of
    the predecessor sees the connection close (atop skips one sample and reconnects), and the
    reconnected client's counters go on from where they were. In a lab of its own: the
    module's daemon holds the shared lab's namespace."""
    server, sport = port(), port()
    path = str(tmp_path / "atop.sock")
    with Lab("nfat") as lab:
        rules = Rules(lab.acct)
        rules.install()
        try:
            counters = Counters(lab, lab.acct)
            count_port(counters, "udp", sport)
            daemons.append(Daemon(lab.acct, tmp_path, "--atop-socket", path))
            echo_server(lab, procs, server)
            holder, report = start_role(
                lab,
                procs,
                lab.acct,
                "holder",
                "--connect",
                PEER_V4,
                "--port",
                str(server),
                "--sport",
                str(sport),
            )
            pid = report["pid"]

            def exchange(rounds: int) -> None:
                holder.stdin.write(f"send {rounds}\n")
                holder.stdin.flush()
                assert json.loads(holder.stdout.readline())["received"] == rounds * 300

            exchange(4)
            before = AtopClient(path)
            expected, served = agree(
                lambda: kernel(counters, "udp", sport), lambda: counters_of(before.sample().get(pid))
            )
            assert served == expected and expected["udpsndpacks"] == 4
            successor = Daemon(lab.acct, tmp_path, "--takeover", "--atop-socket", path, db=daemons[0].db)
            daemons.append(successor)
            assert daemons[0].proc.wait(timeout=15) == HANDED_OVER
            with pytest.raises(BrokenPipeError):  # atop's send fails alike: it skips the sample, reconnects
                before.request()
            exchange(3)
            after = AtopClient(path)
            expected, served = agree(
                lambda: kernel(counters, "udp", sport), lambda: counters_of(after.sample().get(pid))
            )
            assert served == expected and expected["udpsndpacks"] == 7
            assert successor.stop() == 0
            assert not os.path.exists(path)
        finally:
            rules.remove()


@pytest.mark.parametrize("where", ["a file", "under a file", "too long"])
def test_a_path_the_daemon_cannot_serve_is_one_error_line_before_anything_starts(tmp_path, where):
    """Checked before the daemon starts (a takeover's predecessor would be gone by the time the
    socket is made). The namespace does not exist: a check that let a path through fails there."""
    afile = tmp_path / "afile"
    afile.write_text("")
    long = tmp_path / ("a" * 110)
    path, error = {
        "a file": (afile, f"{afile} exists and is not a socket; remove it or choose another --atop-socket"),
        "under a file": (
            afile / "atop.sock",
            f"cannot create the atop socket {afile}/atop.sock: {afile} is not a directory",
        ),
        "too long": (long, f"atop socket path is {len(str(long))} bytes; a UNIX socket path is at most 107"),
    }[where]
    argv = [sys.executable, "-m", "nfacct", "run", "--netns", "nfacct-no-such-ns", "--atop-socket", str(path)]
    out = subprocess.run([*argv, "--control", str(tmp_path / "c.sock"), "--db", str(tmp_path / "db")],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert (out.returncode, out.stderr) == (1, f"nfacct: error: {error}\n")
    assert sorted(os.listdir(tmp_path)) == ["afile"]


# ---- the real atop -----------------------------------------------------------------------------


def real_atop() -> str | None:
    """An atop >= 2.10 (the first with a netatop-bpf client), or None."""
    binary = os.environ.get("NFACCT_ATOP") or shutil.which("atop")
    if not binary:
        return None
    version = subprocess.run([binary, "-V"], capture_output=True, text=True).stdout
    found = re.search(r"Version: (\d+)\.(\d+)", version)
    return binary if found and (int(found[1]), int(found[2])) >= (2, 10) else None


PRN = re.compile(r"PRN \S+ \d+ \S+ \S+ \d+ (?P<pid>\d+) \(.*\) (?P<state>\S) \S (?P<figures>(?:\d+ ){8})")
ACCT_V3 = struct.Struct("=BBHIIIIIIf8H16s")  # struct acct_v3 (linux/acct.h), 64 bytes


def acct_record(pid: int, btime: float, comm: bytes) -> bytes:
    """What the kernel's process accounting writes when `pid` exits (version 3)."""
    return ACCT_V3.pack(0, 3, 0, 0, 0, 0, pid, 1, int(btime), 0.0, *[0] * 8, comm)


def test_real_atop_shows_the_counters_of_a_running_and_an_exited_process(
    lab, counters, atop_daemon, procs, port, tmp_path
):
    """`atop -K -P PRN` as shipped, in a private mount namespace whose /run holds only a link to
    the daemon's socket. Exits come from an accounting file written here (ATOPACCT), so the
    host's process accounting is never switched on. atop's first sample counts from boot, so
    the sum of every sample's figures for a process is its total."""
    binary = real_atop()
    if binary is None:
        pytest.skip("no atop >= 2.10 (set NFACCT_ATOP=/path/to/atop; Debian 12 ships 2.8)")
    server, live_port, gone_port = port(), port(), port()
    echo_server(lab, procs, server)
    count_port(counters, "tcp", live_port)
    count_port(counters, "udp", gone_port)
    accounting = tmp_path / "pacct"
    accounting.write_bytes(acct_record(1, 0, b"init"))  # atop reads the first record for the version
    samples = 4
    script = (
        f'mount -t tmpfs tmpfs /run && ln -s "$1" /run/netatop-bpf-socket && exec "$2" -K -P PRN 1 {samples}'
    )
    argv = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
        atop_daemon.atop,
        binary,
    ]
    env = {**os.environ, "ATOPACCT": str(accounting)}
    # Other processes on the host may have names that are not UTF-8.
    pipes = {
        "stdout": subprocess.PIPE,
        "stderr": subprocess.PIPE,
        "encoding": "utf-8",
        "errors": "surrogateescape",
    }
    atop_run = subprocess.Popen(argv, env=env, **pipes)
    try:
        _live, live = start_role(
            lab, procs, lab.acct, "client", "--connect", PEER_V4, "--port", str(server),
            "--sport", str(live_port), "--rounds", "9", "--size", "2000", "--hold",
        )  # fmt: skip
        gone, report = start_role(
            lab, procs, lab.acct, "client", "--proto", "udp", "--connect", PEER_V4, "--port", str(server),
            "--sport", str(gone_port), "--rounds", "6",
        )  # fmt: skip
        gone.wait(timeout=10)
        with open(accounting, "ab") as f:  # atop 2.13 matches an exit by pid; its btime is not read
            f.write(acct_record(report["pid"], time.time(), b"python3"))
        out, err = atop_run.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            atop_run.kill()
        atop_run.wait()
    assert atop_run.returncode == 0, err
    totals: dict[int, list[int]] = {}
    states: dict[int, set[str]] = {}
    for line in out.splitlines():
        # PRN host epoch date time interval PID (name) state netatop tcpsnd tcpssz tcprcv tcprsz
        # udpsnd udpssz udprcv udprsz 0 0 TGID is_process
        found = PRN.match(line)
        if found is None:
            continue
        pid = int(found["pid"])
        states.setdefault(pid, set()).add(found["state"])
        figures = [int(x) for x in found["figures"].split()]
        totals[pid] = [a + b for a, b in zip(totals.get(pid, [0] * 8), figures, strict=True)]
    live_kernel, gone_kernel = kernel(counters, "tcp", live_port), kernel(counters, "udp", gone_port)
    assert dict(zip(COUNTER_NAMES, totals[live["pid"]], strict=True)) == live_kernel, out
    assert "E" in states[report["pid"]], out
    assert dict(zip(COUNTER_NAMES, totals[report["pid"]], strict=True)) == gone_kernel, out
