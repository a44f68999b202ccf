"""One daemon, several namespaces: each process's counters equal the kernel's nft counters of ITS
namespace, the same flow (127.0.0.1, same ports) in two namespaces is two flows, a namespace that
goes away is dropped settled, and one added later is accounted after a reload.

Every namespace here is a throwaway lab namespace; traffic stays on its loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import count_port, exited_rows, kernel, until

from lab.daemon import Daemon
from lab.hosts import Counters, Lab, stop_all
from nfacct.rules import Rules
from nfacct.tables import COUNTER_NAMES

LO = "127.0.0.1"
MODES = ["offload", "queue"]


@contextlib.contextmanager
def accounted(prefix: str, rules: bool = True):
    """A lab namespace with the nfacct rules (unless `rules` is False) and nft counters; all
    removed afterwards, even if the test deleted the namespace itself."""
    with Lab(prefix) as lab:
        installed = Rules(lab.acct)
        if rules:
            installed.install()
        try:
            yield lab, Counters(lab, lab.acct)
        finally:
            with contextlib.suppress(Exception):  # gone with a namespace the test deleted
                installed.remove()


def role(lab, procs, *args: str):
    """A traffic role in the lab's accounted namespace, and its first line of output."""
    p = lab.role(lab.acct, *args)
    procs.append(p)
    return p, json.loads(p.stdout.readline())


def talk(lab, counters, procs, tcp: int, udp: int, sport: int) -> dict[int, tuple[str, int]]:
    """TCP (2 MB each way) and UDP (50 rounds) over the namespace's loopback between a client
    bound to `sport` and echo servers on `tcp` and `udp`; every process is held open. Returns
    each process's pid: (protocol, its local port), whose kernel counters are set up."""
    for proto, port in (("tcp", tcp), ("tcp", sport), ("udp", udp), ("udp", sport)):
        count_port(counters, proto, port)
    found = {}
    for proto, port in (("tcp", tcp), ("udp", udp)):
        server, _ = role(lab, procs, "echo-server", "--proto", proto, "--bind", LO, "--port", str(port))
        lab.wait_listening(lab.acct, proto, port)
        size, rounds = ("200000", "10") if proto == "tcp" else ("500", "50")
        client, report = role(
            lab, procs, "client", "--proto", proto, "--connect", LO, "--port", str(port),
            "--sport", str(sport), "--size", size, "--rounds", rounds, "--hold",
        )  # fmt: skip
        assert report["received"] == int(size) * int(rounds)
        found[server.pid], found[client.pid] = (proto, port), (proto, sport)
    return found


def ours(daemon: Daemon, pid: int) -> dict | None:
    for task in daemon.top():
        if task["pid"] == pid:
            return task
    return None


def assert_exact(daemon: Daemon, counters, expected: dict[int, tuple[str, int]], netns: str) -> None:
    """Each process's counters equal its namespace's kernel counters for its local port, and it
    says its namespace."""
    for pid, (proto, port) in expected.items():
        want = kernel(counters, proto, port)
        assert want[f"{proto}sndpacks"] > 0 and want[f"{proto}rcvpacks"] > 0
        got = until(lambda pid=pid: {k: (ours(daemon, pid) or {}).get(k) for k in COUNTER_NAMES}, want)
        assert got == want, (pid, proto, port, json.dumps(daemon.status()["namespaces"]))
        assert ours(daemon, pid)["netns"] == netns


def kernel_via(counters, name: str, proto: str, port: int) -> dict[str, int]:
    """`kernel` for a namespace whose own name is deleted, through another name for it."""
    counters.ns = name
    return kernel(counters, proto, port)


def nfacct(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nfacct", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mode", MODES)
def test_two_namespaces_each_process_counts_exactly_its_own_namespaces_traffic(
    tmp_path, daemons, procs, port, mode
):
    """The same flows (127.0.0.1, the same ports) in both namespaces at once: four processes in
    each, every one's counters equal to its own namespace's nft counters."""
    tcp, udp, sport = port(), port(), port()
    with accounted("nfma") as (a, count_a), accounted("nfmb") as (b, count_b):
        d = Daemon(a.acct, tmp_path, "--netns", b.acct, "--mode", mode)
        daemons.append(d)
        status = d.status()
        assert [ns["name"] for ns in status["namespaces"]] == [a.acct, b.acct]
        assert {ns["queue"]["number"] for ns in status["namespaces"]} == {0}, (
            "one queue number, per namespace"
        )
        in_a = talk(a, count_a, procs, tcp, udp, sport)
        in_b = talk(b, count_b, procs, tcp, udp, sport)
        assert_exact(d, count_a, in_a, a.acct)
        assert_exact(d, count_b, in_b, b.acct)
        if mode == "offload":
            assert all(ns["offload"]["flows"] > 0 for ns in d.status()["namespaces"])

        # A second daemon for a namespace already accounted: one line naming it.
        other = tmp_path / "other"
        refused = nfacct(
            "run", "--netns", b.acct, "--control", str(other / "c.sock"), "--db", str(other / "db")
        )
        assert refused.returncode == 1
        assert (
            refused.stderr.count("\n") == 1
            and f"network namespace '{b.acct}' is already accounted" in refused.stderr
        )

        stop_all(procs)  # every process exits: its row goes to the database, with its namespace
        for pid in [*in_a, *in_b]:
            assert until(lambda pid=pid: pid in exited_rows(d.db), True), pid
        assert d.stop() == 0, d.log.read_text()
        rows = exited_rows(d.db)
        assert {rows[pid]["netns"] for pid in in_a} == {a.acct}
        assert {rows[pid]["netns"] for pid in in_b} == {b.acct}
        by_netns = json.loads(nfacct("history", "--db", d.db, "--by", "netns", "--json").stdout)
        assert {r["netns"]: r["processes"] for r in by_netns} == {a.acct: 4, b.acct: 4}
        by_pid = json.loads(nfacct("history", "--db", d.db, "--by", "pid", "--json").stdout)
        assert {r["pid"]: r["netns"] for r in by_pid} == {
            **dict.fromkeys(in_a, a.acct),
            **dict.fromkeys(in_b, b.acct),
        }


@pytest.mark.parametrize("mode", MODES)
def test_a_deleted_namespace_is_dropped_settled_and_the_other_goes_on(tmp_path, daemons, procs, port, mode):
    """`ip netns del` while a process in it holds an attributed connection (offloaded, in offload
    mode): one log line, its totals (the elements' last readings included) stay exact in the
    database, and the other namespace is still accounted exactly."""
    tcp, udp, sport = port(), port(), port()
    with accounted("nfmd") as (a, count_a), accounted("nfme") as (b, count_b):
        d = Daemon(a.acct, tmp_path, "--netns", b.acct, "--mode", mode, "--checkpoint-interval", "1")
        daemons.append(d)
        in_a = talk(a, count_a, procs, tcp, udp, sport)
        assert_exact(d, count_a, in_a, a.acct)
        holder = next(iter(in_a))  # a process that lives on in the nameless namespace
        subprocess.run(["ip", "netns", "del", a.acct], check=True)
        dropped = f"network namespace '{a.acct}' is gone"
        assert until(lambda: dropped in d.log.read_text(), True), d.log.read_text()
        assert [ns["name"] for ns in d.status()["namespaces"]] == [b.acct]
        # Its counters, read through a new name for the same namespace (the daemon has let go).
        alias = a.acct + "r"
        subprocess.run(["ip", "netns", "attach", alias, str(holder)], check=True)
        try:
            final = {pid: kernel_via(count_a, alias, proto, p) for pid, (proto, p) in in_a.items()}
            bound = a.run(alias, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
            assert bound == "", "its queue is unbound: nothing of the daemon keeps it"
        finally:
            subprocess.run(["ip", "netns", "del", alias], check=True)
        in_b = talk(b, count_b, procs, tcp, udp, sport)
        assert_exact(d, count_b, in_b, b.acct)
        assert d.stop() == 0, d.log.read_text()
        log = d.log.read_text()
        assert [line for line in log.splitlines() if a.acct in line] == [
            f"nfacct: network namespace '{a.acct}' is gone (no /run/netns/{a.acct}): no longer accounted;"
            " its 4 flows settled, its processes keep their totals"
        ], log
        # Still running, or exited: each process of the dropped namespace keeps its exact totals.
        conn = sqlite3.connect(d.db)
        conn.row_factory = sqlite3.Row
        try:
            rows = {
                r["pid"]: dict(r)
                for t in ("live_tasks", "exited_tasks")
                for r in conn.execute(f"SELECT * FROM {t}")
            }
        finally:
            conn.close()
        for pid, want in final.items():
            assert {k: rows[pid][k] for k in COUNTER_NAMES} == want, pid
            assert rows[pid]["netns"] == a.acct


@pytest.mark.parametrize("mode", MODES)
def test_a_namespace_added_later_is_accounted_after_sighup_or_reload(tmp_path, daemons, procs, port, mode):
    """`--netns PATTERN` takes a namespace once `rules install` marked it and SIGHUP asked;
    `nfacct reload --netns NAME` takes a named one. Their traffic is then counted exactly."""
    tcp, udp, sport = port(), port(), port()
    pattern = f"nfmn{os.getpid() % 100000}x*a"  # Lab("nfmn")'s accounted namespaces, this run's only
    with accounted("nfmf") as (a, _count_a):
        d = Daemon(a.acct, tmp_path, "--netns", pattern, "--mode", mode)
        daemons.append(d)
        with accounted("nfmn", rules=False) as (n, count_n):
            d.proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert [ns["name"] for ns in d.status()["namespaces"]] == [a.acct], "no rules: not taken"
            Rules(n.acct).install()
            d.proc.send_signal(signal.SIGHUP)
            names = until(lambda: [ns["name"] for ns in d.status()["namespaces"]], [a.acct, n.acct])
            assert names == [a.acct, n.acct]
            assert_exact(d, count_n, talk(n, count_n, procs, tcp, udp, sport), n.acct)
            with accounted("nfmr") as (r, count_r):
                out = nfacct("reload", "--netns", r.acct, "--control", d.control)
                assert out.returncode == 0, out.stderr
                assert out.stdout == f"added: {r.acct}; accounting: {a.acct}, {n.acct}, {r.acct}\n"
                assert_exact(d, count_r, talk(r, count_r, procs, tcp, udp, sport), r.acct)
                missing = nfacct("reload", "--netns", r.acct + "-none", "--control", d.control)
                assert missing.returncode == 1 and "does not exist" in missing.stderr
                with accounted("nfmz") as (z, _count_z):
                    other = Daemon(z.acct, tmp_path / "other")
                    daemons.append(other)
                    taken = nfacct("reload", "--netns", z.acct, "--control", d.control)
                    assert taken.returncode == 1 and taken.stderr.count("\n") == 1
                    assert taken.stderr.startswith(
                        f"nfacct: error: cannot account {z.acct}: network namespace '{z.acct}' is already"
                        f" accounted by nfacct pid {other.proc.pid}"
                    ), taken.stderr
                    assert other.stop() == 0
                stop_all(procs)
                procs.clear()
        assert d.stop() == 0, d.log.read_text()


def test_a_namespace_that_does_not_exist_is_one_line_and_status_2(tmp_path):
    with accounted("nfmx") as (a, _counters):
        for names in (["nfacct-no-such-ns"], [a.acct, "nfacct-no-such-ns"]):
            argv = ["run", *(x for n in names for x in ("--netns", n))]
            out = nfacct(*argv, "--control", str(tmp_path / "c.sock"), "--db", str(tmp_path / "db" / "n.db"))
            assert out.returncode == 2
            assert out.stderr == (
                "nfacct: error: network namespace 'nfacct-no-such-ns' does not exist"
                " (no /run/netns/nfacct-no-such-ns; see `ip netns list`)\n"
            )
            assert os.listdir(tmp_path) == [], "nothing left behind"


def test_a_takeover_takes_every_namespace_over(tmp_path, daemons, procs, port):
    """The successor moves each namespace's queue to the other of the pair, then takes the tables
    once: processes of both namespaces go on with exact counts."""
    tcp, udp, sport = port(), port(), port()
    with accounted("nfmt") as (a, count_a), accounted("nfmu") as (b, count_b):
        first = Daemon(a.acct, tmp_path, "--netns", b.acct)
        daemons.append(first)
        in_a = talk(a, count_a, procs, tcp, udp, sport)
        assert_exact(first, count_a, in_a, a.acct)
        successor = Daemon(a.acct, tmp_path, "--netns", b.acct, "--takeover", db=first.db)
        daemons.append(successor)
        assert first.proc.wait(timeout=10) == 3
        queues = {ns["name"]: ns["queue"]["number"] for ns in successor.status()["namespaces"]}
        assert queues == {a.acct: 1, b.acct: 1}
        in_b = talk(b, count_b, procs, tcp, udp, sport)
        assert_exact(successor, count_a, in_a, a.acct)
        assert_exact(successor, count_b, in_b, b.acct)
        assert successor.stop() == 0, successor.log.read_text()
