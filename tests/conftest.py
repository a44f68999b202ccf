"""Fixtures: throwaway namespaces, the real ruleset and a real daemon, all removed afterwards."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from scapy.layers.inet import IP, UDP

from lab.daemon import Daemon
from lab.hosts import ACCT_V4, Counters, Lab, NeedsRoot
from nfacct.procs import ProcessFacts
from nfacct.rules import Rules
from nfacct.store import SCHEMA_VERSION, Store
from nfacct.tables import COUNTER_NAMES

ROOT_ONLY = "needs root (network namespaces, queue rules, a daemon, other users); unit tests run without"


# Derandomized: the same examples on every run, so a red CI run reproduces with the same command
# and a green one cannot turn red without a code change. No example database: with derandomize it
# would only store failures that no run replays. 400 examples each keep each property file near 20 s.
PROFILE = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def need_root() -> None:
    """Skip the test unless we are root: for fixtures that need the real kernel or other users."""
    if os.geteuid() != 0:
        pytest.skip(ROOT_ONLY)


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true", help="also run the long soaks (`make soak`)")


def pytest_configure(config):
    config.addinivalue_line("markers", "root: the test needs root, and is skipped without it")
    config.addinivalue_line("markers", "soak: a long soak, run only with --soak (`make soak`)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    """Without root, a test marked `root`, or whose fixtures make a Lab (in any test module),
    is skipped, not failed. A soak runs only with --soak."""
    if item.get_closest_marker("soak") and not item.config.getoption("--soak"):
        pytest.skip("a long soak: `make soak` runs it")
    if item.get_closest_marker("root"):
        need_root()
    try:
        return (yield)
    except NeedsRoot:
        pytest.skip(ROOT_ONLY)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """The same for a Lab made in the test itself."""
    try:
        return (yield)
    except NeedsRoot:
        pytest.skip(ROOT_ONLY)


# Below the ephemeral range (32768-60999 by default), so no client's local port ever takes one.
_ports = itertools.count(20000)


def free_port() -> int:
    """Ports unique within this test session, so counter rules of different tests never overlap."""
    return next(_ports)


def kernel(counters, proto: str, port: int) -> dict[str, int]:
    """The kernel's count for a port set up by `count_port`, shaped like nfacct's counters."""
    read = counters.read()
    view = dict.fromkeys(COUNTER_NAMES, 0)
    view[f"{proto}sndpacks"], view[f"{proto}sndbytes"] = read[f"{proto}{port}-snd"]
    view[f"{proto}rcvpacks"], view[f"{proto}rcvbytes"] = read[f"{proto}{port}-rcv"]
    return view


def count_port(counters, proto: str, port: int) -> None:
    """Kernel counters for a local port: `snd` leaves from it, `rcv` arrives at it."""
    counters.add(f"{proto}{port}-snd", "out", f"meta l4proto {proto} th sport {port}")
    counters.add(f"{proto}{port}-rcv", "in", f"meta l4proto {proto} th dport {port}")


def send(lab, port: int, count: int, rate: float = 0) -> None:
    """`count` UDP datagrams from the peer namespace to the accounted host's `port`."""
    argv = ["python3", "-m", "lab.roles", "sender", "--connect", ACCT_V4, "--port", str(port)]
    lab.run(lab.peer, [*argv, "--count", str(count), "--rate", str(rate)])


def exited_rows(db: str) -> dict[int, dict]:
    """exited_tasks by pid, read straight from the file (empty before the daemon created it)."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return {r["pid"]: dict(r) for r in conn.execute("SELECT * FROM exited_tasks")}
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


def until(what, expected, within: float = 10.0):
    """Poll `what()` until it returns `expected` or `within` seconds pass; returns the last value."""
    deadline = time.monotonic() + within
    while True:
        got = what()
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def udp_out(sport: int) -> tuple[bytes, tuple]:
    """An outgoing 100-byte UDP datagram from port `sport`, and its flow key (in our namespace)."""
    pkt = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=sport, dport=53) / (b"q" * 72))
    return pkt, (17, bytes([10, 0, 0, 1]), sport, bytes([10, 0, 0, 2]), 53, None)


def facts(pid: int) -> ProcessFacts:
    return ProcessFacts(pid, 1000.0 + pid, f"p{pid}", f"p{pid}", 0, "")


def cgroup2() -> tuple[str, str]:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a
    hybrid host) and the path its root has in /proc/PID/cgroup; skips the test if there is none."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    found = [(m[4], m[3]) for m in mounts if m[m.index("-") + 1] == "cgroup2"]
    if not found:
        pytest.skip("no cgroup v2 hierarchy mounted")
    return found[0]


def own_cgroup(pid: int | str = "self") -> str:
    """The cgroup v2 path of a process, as the daemon reads it."""
    with open(f"/proc/{pid}/cgroup", "rb") as f:
        return next(line[3:].rstrip(b"\n") for line in f if line.startswith(b"0::")).decode(
            "utf-8", "surrogateescape"
        )


@pytest.fixture(scope="module")
def lab():
    need_root()
    with Lab() as lab:
        yield lab


@pytest.fixture(scope="module")
def rules(lab):
    r = Rules(lab.acct)
    r.install()
    yield r
    r.remove()


@pytest.fixture(scope="module")
def counters(lab, rules):
    return Counters(lab, lab.acct)


@pytest.fixture(scope="module", params=["offload", "queue"])
def daemon(lab, rules, tmp_path_factory, request):
    """One daemon per module and mode: every test that uses it runs with flow offload (the default)
    and with every packet through the queue."""
    d = Daemon(lab.acct, tmp_path_factory.mktemp("daemon"), "--mode", request.param)
    yield d
    assert d.stop() == 0, d.log.read_text()
    assert not os.path.exists(d.control), "the daemon left its control socket behind"


@pytest.fixture
def shared_dir():
    """A directory every user may read, for what a test runs as another user: the checkout, and
    pytest's tmp_path, may be root's alone (a clone into `mktemp -d` is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="nfacct-shared-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


# The system's Python for scripts run as another user: ours may live under /root (pyenv, the
# checkout's .venv). The scripts it runs use the standard library only.
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def port():
    """A function returning a fresh port number per call."""
    return free_port


@pytest.fixture
def daemons():
    """Daemons a test starts (append them); any still running is stopped at teardown."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


@pytest.fixture
def procs():
    """Processes a test starts; all are ended at teardown."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


@contextlib.contextmanager
def migrated(db: str, conn: sqlite3.Connection, version: int) -> Iterator[Store]:
    """The database `conn` built by hand as schema `version` had it, with one exited process
    "old": marked with that version, closed, and opened by Store, which must bring it to the
    current schema with the old row kept (in no namespace). Yields the store, closed after."""
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()
    store = Store(db)
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert [(r["command"], r["netns"]) for r in store.exited()] == [("old", None)]
        yield store
    finally:
        store.close()
