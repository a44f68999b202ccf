"""The facts nfacct reads from /proc itself (procs.process_facts, is_alive), checked against
psutil, which reads the same files its own way: start time, real uid, name and arguments."""

from __future__ import annotations

import os
import subprocess
import time

import psutil
import pytest
from conftest import SYSTEM_PYTHON, until

from nfacct.procs import PAUSE_EVERY, SocketIndex, is_alive, process_facts


@pytest.fixture
def sleeper():
    """A process whose real uid is 65534 and effective uid 0 (setpriv), named "a (b) c":
    parentheses and spaces in a name are what /proc/PID/stat makes hard to split."""
    argv = ["setpriv", "--ruid", "65534", "--", SYSTEM_PYTHON, "-c"]
    argv += ["import time\nopen('/proc/self/comm', 'w').write('a (b) c')\ntime.sleep(60)", "x y"]
    p = subprocess.Popen(argv)
    until(lambda: psutil.Process(p.pid).name(), "a (b) c")
    yield p
    p.kill()
    p.wait()


@pytest.mark.root
def test_facts_agree_with_psutil(sleeper):
    facts = process_facts(sleeper.pid)
    p = psutil.Process(sleeper.pid)
    assert (facts.btime, facts.uid) == (p.create_time(), p.uids().real)
    assert p.uids()[:2] == (65534, 0), "the real uid is the one recorded, not the effective one"
    assert facts.comm == "a (b) c"
    assert facts.cmdline == " ".join(p.cmdline())


@pytest.mark.root
def test_known_facts_are_kept_only_for_the_same_process(sleeper):
    known = process_facts(sleeper.pid)
    assert process_facts(sleeper.pid, known) is known
    other = process_facts(os.getpid())
    assert process_facts(os.getpid(), known) == other, "another pid's facts are not taken"
    reused = known.__class__(sleeper.pid, known.btime - 5, "old", "old", 0, "")  # pid reused since
    assert process_facts(sleeper.pid, reused) == known
    sleeper.kill()
    sleeper.wait()
    assert process_facts(sleeper.pid, known) is None, "a process gone has no facts, known or not"


@pytest.mark.root
def test_is_alive_tells_running_zombie_and_reused():
    p = subprocess.Popen(["sleep", "0.2"])
    btime = psutil.Process(p.pid).create_time()
    assert is_alive(p.pid, btime)
    assert not is_alive(p.pid, btime + 1), "another process under the same pid"
    deadline = time.monotonic() + 10
    while psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_alive(p.pid, btime), "exited, not yet reaped"
    p.wait()
    assert not is_alive(p.pid, btime)


HOLDER = """
import os, socket, sys
socks = {}
def report(s):
    socks[s.fileno()] = s
    print(s.fileno(), os.fstat(s.fileno()).st_ino, flush=True)
for line in sys.stdin:
    cmd, n = line.split()
    if cmd == "open":
        for _ in range(int(n)):
            report(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    else:  # reuse: close descriptor n, then open a socket, which takes the lowest free number
        socks.pop(int(n)).close()
        report(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    print("done", flush=True)
"""


@pytest.mark.root
def test_a_process_that_keeps_opening_sockets_is_probed_not_read_again():
    """A process with 2,000 sockets opens 50 more: each is found by reading only the descriptors
    above the highest known (no whole read of its directory); a descriptor number it reuses for
    a new socket is found by the whole read the probe falls back to. A whole read pauses every
    PAUSE_EVERY descriptors (the daemon serves its queues there)."""
    holder = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )

    def ask(line: str) -> list[tuple[int, int]]:
        holder.stdin.write(line + "\n")
        holder.stdin.flush()
        out = []
        while (answer := holder.stdout.readline().split()) != ["done"]:
            out.append((int(answer[0]), int(answer[1])))
        return out

    try:
        first = ask("open 2000")
        pauses = []
        index = SocketIndex(pause=lambda: pauses.append(1))
        assert index.owner(first[-1][1]) == holder.pid  # found by reading every process
        assert len(pauses) >= 2000 // PAUSE_EVERY, "a whole read pauses for the daemon's queues"
        scans = index.scans
        more = ask("open 50")
        assert [index.owner(inode) for _, inode in more] == [holder.pid] * 50
        assert index.scans == scans and index.probes >= 1, "no directory read again"
        [(fd, inode)] = ask(f"reuse {first[10][0]}")
        assert fd == first[10][0], "the new socket took the number closed"
        assert index.owner(inode) == holder.pid
        assert index.scans == scans + 1, "the probe missed it, the whole read found it"
        assert index.owner(first[10][1]) is None, "the closed socket has no owner"
    finally:
        holder.kill()
        holder.wait()
