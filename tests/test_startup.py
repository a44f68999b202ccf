"""Starting the daemon: one per network namespace, and a failed start leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import count_port, kernel, send, until

from lab.hosts import Lab
from nfacct import claim, control
from nfacct.control import ControlError
from nfacct.control import request as control_request
from nfacct.queue import Queue
from nfacct.rules import Rules
from nfacct.tables import HANDOVER_FORMAT


def nfacct_run(netns: str, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "nfacct", "run", "--netns", netns, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_a_second_daemon_is_refused_and_names_the_first(lab, counters, daemon, tmp_path, port, procs):
    """Found as a defect: a second daemon (`--queue 5`, its own control socket) moved the rules
    to its queue without a word, and the first reported the packets it lost as `queue full`."""
    p = port()
    count_port(counters, "udp", p)
    sink = lab.role(lab.acct, "sink", "--port", str(p), "--count", "40", "--hold")
    procs.append(sink)
    assert json.loads(sink.stdout.readline())["ready"]
    send(lab, p, 20)
    other, db = str(tmp_path / "other.sock"), str(tmp_path / "new/x.db")
    second = nfacct_run(lab.acct, "--queue", "5", "--control", other, "--db", db)
    assert second.returncode == 1
    assert second.stderr == (
        f"nfacct: error: network namespace {lab.acct!r} is already accounted by nfacct pid"
        f" {daemon.proc.pid} (control socket {daemon.control}); stop it first, or replace it without"
        f" a gap: nfacct run --takeover --control {daemon.control}\n"
    )
    assert {q for *_where, q in Rules(lab.acct).queue_rules()} == {0}, "the rules did not move"
    assert os.listdir(tmp_path) == [], "the refused daemon created nothing"
    send(lab, p, 20)
    assert json.loads(sink.stdout.readline())["received"] == 40 * 200
    assert kernel(counters, "udp", p)["udprcvpacks"] == 40
    assert daemon.status()["coverage"]["unaccounted"] == 0


def test_a_failed_start_takes_back_what_it_made(tmp_path):
    """A daemon that cannot bind its queue (another consumer holds it) removes the database and
    the directories it created, its claim on the namespace and its control socket."""
    with Lab("nfst") as lab:
        rules = Rules(lab.acct)
        rules.install(queue=7)
        squatter = Queue(7, lambda pkt: True, lab.acct)
        try:
            control, db = tmp_path / "c1/c2/control.sock", tmp_path / "d1/d2/nfacct.db"
            failed = nfacct_run(lab.acct, "--queue", "7", "--control", str(control), "--db", str(db))
            assert failed.returncode == 1
            assert failed.stderr.startswith("nfacct: error: cannot bind NFQUEUE 7")
            assert len(failed.stderr.splitlines()) == 1
            assert os.listdir(tmp_path) == []
            assert claim.holder(lab.acct) is None
            assert not os.path.exists(claim.claim_path(lab.acct))
            # Now free: the same start succeeds, and stops cleanly.
            squatter.close()
            squatter = None
            argv = [sys.executable, "-m", "nfacct", "run", "--netns", lab.acct, "--queue", "7"]
            argv += ["--control", str(control), "--db", str(db)]
            daemon = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
            try:
                assert until(lambda: answers(str(control)), True, 15), "the daemon did not come up"
                assert claim.holder(lab.acct)["pid"] == daemon.pid
                # Other children come and go (the daemon runs nft to read its counter), and the
                # guard names itself just after the fork: look until it shows.
                assert until(lambda: len(guards_of(daemon.pid)), 1, 5) == 1
                guards = guards_of(daemon.pid)
            finally:
                daemon.terminate()
                assert daemon.wait(timeout=10) == 0, daemon.stderr.read()
            assert not control.exists() and claim.holder(lab.acct) is None
            assert not os.path.exists(f"/proc/{guards[0]}"), "the guard outlived its daemon"
            assert db.exists(), "a clean stop keeps its database"
        finally:
            if squatter is not None:
                squatter.close()
            rules.remove()


def test_an_unusable_control_path_is_one_line(tmp_path):
    with Lab("nfcp") as lab:
        failed = nfacct_run(lab.acct, "--control", "/proc/x.sock", "--db", str(tmp_path / "d/nfacct.db"))
        assert failed.returncode == 1
        assert failed.stderr.startswith("nfacct: error: cannot create the control socket /proc/x.sock: ")
        assert len(failed.stderr.splitlines()) == 1
        assert os.listdir(tmp_path) == []
        assert claim.holder(lab.acct) is None


def guards_of(pid: int) -> list[str]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    found = []
    for child in children:
        try:
            if Path(f"/proc/{child}/comm").read_text() == "nfacct-guard\n":
                found.append(child)
        except FileNotFoundError:  # a short-lived child already gone
            pass
    return found


def answers(path: str) -> bool:
    try:
        return control_request(path, "ping", timeout=1)["ok"]
    except ControlError:
        return False


def test_a_start_stopped_midway_takes_back_what_it_made(tmp_path):
    """SIGTERM while a takeover waits for its predecessor (here an impostor that answers ping
    and never answers the handover): the successor puts the rules back and leaves nothing."""
    import socket
    import threading

    impostor_path = str(tmp_path / "impostor.sock")
    with Lab("nfsm") as lab:
        rules = Rules(lab.acct)
        rules.install()
        held = claim.Claim(lab.acct, impostor_path)
        impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        impostor.bind(impostor_path)
        impostor.listen(4)
        asked = threading.Event()
        conns = []

        def ping_then_silence() -> None:
            for _ in range(2):
                conn, _ = impostor.accept()
                if json.loads(conn.makefile().readline())["cmd"] == "ping":
                    with conn:
                        conn.sendall(control.encode({"ok": True, "handover_format": HANDOVER_FORMAT}))
                else:
                    conns.append(conn)  # the handover: never answered
                    asked.set()

        threading.Thread(target=ping_then_silence, daemon=True).start()
        db = tmp_path / "d/nfacct.db"
        argv = [sys.executable, "-m", "nfacct", "run", "--netns", lab.acct, "--takeover"]
        successor = subprocess.Popen(
            [*argv, "--control", impostor_path, "--db", str(db)], stderr=subprocess.PIPE, text=True
        )
        try:
            assert asked.wait(15), "the successor never asked for the handover"
            assert {q for *_where, q in rules.queue_rules()} == {1, 0}, "its queue rule went in front"
            successor.terminate()
            assert successor.wait(timeout=10) == 1
            assert successor.stderr.read() == (
                "nfacct: error: stopped by SIGTERM while starting; nothing was changed\n"
            )
            assert {q for *_where, q in rules.queue_rules()} == {0}
            assert claim.holder(lab.acct)["pid"] == os.getpid()
            assert sorted(os.listdir(tmp_path)) == ["impostor.sock"]
            queues = lab.run(lab.acct, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
            assert queues == "", queues
        finally:
            if successor.poll() is None:
                successor.kill()
            for conn in conns:
                conn.close()
            impostor.close()
            held.release()
            rules.remove()
