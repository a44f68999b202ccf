"""Nothing lost: a packet is either in a process's totals or recorded as unaccounted.

Queue overflow (fail-open), a killed daemon and a restart each let packets pass uncounted; the
ruleset's counting rule sees them, and the tests check, against nft counter rules, that totals
plus what nfacct recorded as unaccounted equal the kernel's count. A takeover loses nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from conftest import count_port, kernel, send, until

from lab.daemon import Daemon
from lab.hosts import ACCT_V4, PEER_V4, Counters, Lab
from nfacct import claim, control
from nfacct.claim import Claim
from nfacct.cli import HANDED_OVER
from nfacct.coverage import NOT_COUNTING, QUEUE_FULL
from nfacct.rules import Rules
from nfacct.tables import HANDOVER_FORMAT


def received(daemon: Daemon, pid: int, expected: int, within: float = 5.0) -> int:
    """The sink's udprcvpacks as nfacct reports it, once it reaches `expected` or time is up."""
    deadline = time.monotonic() + within
    while True:
        ours = next((t["udprcvpacks"] for t in daemon.top() if t["pid"] == pid), 0)
        if ours >= expected or time.monotonic() > deadline:
            return ours
        time.sleep(0.1)


def ours_once_settled(daemon: Daemon, pid: int, expected: dict[str, int], within: float = 5.0) -> dict:
    """nfacct's counters of `pid` (the keys of `expected`), once equal to `expected` or time is up."""
    deadline = time.monotonic() + within
    while True:
        task = next((t for t in daemon.top() if t["pid"] == pid), {})
        ours = {k: task.get(k) for k in expected}
        if ours == expected or time.monotonic() > deadline:
            return ours
        time.sleep(0.1)


def gaps(db: str) -> list[tuple[int, str]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT packets, reason FROM unaccounted ORDER BY start").fetchall()
    finally:
        conn.close()


def test_a_full_queue_is_recorded_as_unaccounted(lab, counters, tmp_path, port, procs, daemons):
    p = port()
    count_port(counters, "udp", p)
    daemon = Daemon(lab.acct, tmp_path, "--queue-maxlen", "32", "--checkpoint-interval", "0.5")
    daemons.append(daemon)
    # The 168 or so packets that pass the full queue arrive at once: a buffer that holds them.
    sink = lab.role(lab.acct, "sink", "--port", str(p), "--count", "200", "--rcvbuf", "8000000", "--hold")
    procs.append(sink)
    try:
        assert json.loads(sink.stdout.readline())["ready"]
        os.kill(daemon.proc.pid, signal.SIGSTOP)  # a daemon that reads nothing: the queue fills up
        try:
            send(lab, p, 200)
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        assert json.loads(sink.stdout.readline())["received"] == 200 * 200  # fail-open: none dropped
        ours = received(daemon, sink.pid, 32, within=3)
        # At most what the queue held (none, if the send outlasted the guard's look: then the
        # guard let the queued ones pass, recorded as a stall)
        assert 0 <= ours <= 32
        time.sleep(1.0)  # a checkpoint settles the count
        unaccounted = daemon.status()["coverage"]["unaccounted"]
        assert ours + unaccounted == kernel(counters, "udp", p)["udprcvpacks"] == 200
        recorded = gaps(daemon.db)
        assert sum(n for n, _ in recorded) == unaccounted
        assert QUEUE_FULL in {reason for _, reason in recorded}
    finally:
        assert daemon.stop() == 0


def test_a_killed_daemon_loses_at_most_a_checkpoint_and_says_how_much(
    lab, counters, tmp_path, port, procs, daemons
):
    p = port()
    count_port(counters, "udp", p)
    daemon = Daemon(lab.acct, tmp_path, "--checkpoint-interval", "0.5")
    daemons.append(daemon)
    sink = lab.role(lab.acct, "sink", "--port", str(p), "--count", "120", "--hold")
    procs.append(sink)
    assert json.loads(sink.stdout.readline())["ready"]
    send(lab, p, 30)
    assert received(daemon, sink.pid, 30) == 30
    time.sleep(1.0)  # checkpointed
    send(lab, p, 30)
    time.sleep(0.1)  # counted, most likely not yet checkpointed
    daemon.proc.kill()
    daemon.proc.wait()
    # Its guard dies with it (it shares the queue's socket): nothing holds the queue any more.
    bound = until(lambda: lab.run(lab.acct, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout, "", 2)
    assert bound == "", f"the queue is still bound: {bound}"
    conn = sqlite3.connect(daemon.db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)  # the file survives
    conn.close()
    send(lab, p, 30)  # nobody bound: bypass
    daemon = Daemon(lab.acct, tmp_path, "--checkpoint-interval", "0.5", db=daemon.db)
    daemons.append(daemon)
    try:
        send(lab, p, 30)
        assert json.loads(sink.stdout.readline())["received"] == 120 * 200
        recorded = gaps(daemon.db)
        assert [reason for _, reason in recorded] == [NOT_COUNTING]
        # Waits for the whole figure: `top` shows offloaded flows' counts up to a second old.
        ours = received(daemon, sink.pid, 120 - recorded[0][0])
        assert 60 <= ours <= 90  # the first checkpoint and the last 30 at least
        assert ours + recorded[0][0] == kernel(counters, "udp", p)["udprcvpacks"] == 120
    finally:
        assert daemon.stop() == 0


def wait_until_answering(daemon: Daemon, predecessor: Daemon) -> None:
    assert predecessor.proc.wait(timeout=15) == HANDED_OVER, predecessor.log.read_text()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if control.request(daemon.control, "ping").get("ok"):
            return
    raise AssertionError("the successor does not answer")


def test_takeover_in_the_middle_of_traffic_loses_nothing(lab, counters, tmp_path, port, procs, daemons):
    """Two takeovers while UDP flows in both directions and a TCP client exchanges: all exact."""
    sink_port, out_port, echo_port, tcp_sport = port(), port(), port(), port()
    count_port(counters, "udp", sink_port)
    count_port(counters, "tcp", tcp_sport)
    counters.add("out-snd", "out", f"udp dport {out_port}")
    daemon = Daemon(lab.acct, tmp_path)
    daemons.append(daemon)
    try:
        peer_sink = lab.role(lab.peer, "sink", "--port", str(out_port), "--count", "3000")
        echo = lab.role(lab.peer, "echo-server", "--port", str(echo_port))
        # A takeover holds packets for a few hundred ms, then releases them at once: a big buffer.
        sink = lab.role(
            lab.acct, "sink", "--port", str(sink_port), "--count", "3000", "--rcvbuf", "8000000", "--hold"
        )
        procs += [peer_sink, echo, sink]
        for p in (peer_sink, echo, sink):
            assert json.loads(p.stdout.readline())["ready"]
        out = ["sender", "--connect", PEER_V4, "--port", str(out_port), "--count", "3000", "--rate", "1000"]
        inbound = [
            "sender",
            "--connect",
            ACCT_V4,
            "--port",
            str(sink_port),
            "--count",
            "3000",
            "--rate",
            "1000",
        ]
        tcp = ["client", "--connect", PEER_V4, "--port", str(echo_port), "--sport", str(tcp_sport)]
        tcp += ["--rounds", "300", "--size", "2000", "--pause", "0.01", "--hold"]
        sender_out, sender_in, client = (
            lab.role(lab.acct, *out),
            lab.role(lab.peer, *inbound),
            lab.role(lab.acct, *tcp),
        )
        procs += [sender_out, sender_in, client]
        for _ in range(2):
            time.sleep(0.8)
            successor = Daemon(lab.acct, tmp_path, "--takeover", db=daemon.db)
            daemons.append(successor)
            wait_until_answering(successor, daemon)
            daemon = successor
        got = json.loads(sink.stdout.readline())["received"]
        udp = lab.run(lab.acct, ["grep", "Udp:", "/proc/net/snmp"]).stdout  # RcvbufErrors: the sink's fault
        assert got == 3000 * 200, udp
        assert json.loads(client.stdout.readline())["received"] == 300 * 2000
        assert sender_out.wait(timeout=10) == 0
        sent = {"udpsndpacks": counters.read()["out-snd"][0]}
        assert ours_once_settled(daemon, sender_out.pid, sent) == sent == {"udpsndpacks": 3000}
        # Offloaded flows' counters are read at most once a second: poll until they have caught up.
        received = {"udprcvpacks": kernel(counters, "udp", sink_port)["udprcvpacks"]}
        assert ours_once_settled(daemon, sink.pid, received) == received == {"udprcvpacks": 3000}
        tcp_kernel = kernel(counters, "tcp", tcp_sport)
        tcp_kernel = {k: tcp_kernel[k] for k in ("tcpsndpacks", "tcpsndbytes", "tcprcvpacks", "tcprcvbytes")}
        assert ours_once_settled(daemon, client.pid, tcp_kernel) == tcp_kernel
        assert daemon.status()["coverage"]["unaccounted"] == 0
        assert gaps(daemon.db) == []
    finally:
        assert daemon.stop() == 0


def test_a_thousand_short_connections_are_all_attributed(lab, counters, daemon, port, procs):
    """connect, 32 bytes echoed, close: over in about a millisecond, yet never unidentified."""
    first = port()
    for _ in range(3):
        port()  # the flows role uses four consecutive server ports
    ports = f"{first}-{first + 3}"
    counters.add(f"flows{first}-snd", "out", f"tcp dport {ports}")
    counters.add(f"flows{first}-rcv", "in", f"tcp sport {ports}")
    for i in range(4):
        server = lab.role(lab.peer, "echo-server", "--port", str(first + i))
        procs.append(server)
        assert json.loads(server.stdout.readline())["ready"]
    flows = ["flows", "--connect", PEER_V4, "--port", str(first), "--ports", "4", "--count", "1000", "--hold"]
    client = lab.role(lab.acct, *flows)
    procs.append(client)
    assert json.loads(client.stdout.readline())["flows"] == 1000
    read = counters.read()
    kernel_counts = {"tcpsndpacks": read[f"flows{first}-snd"][0], "tcprcvpacks": read[f"flows{first}-rcv"][0]}
    assert ours_once_settled(daemon, client.pid, kernel_counts) == kernel_counts
    assert kernel_counts["tcpsndpacks"] >= 5000


def test_short_connections_to_a_local_server_count_for_the_server(lab, counters, daemon, port, procs):
    """The server accepts, echoes and closes within a millisecond; a connection closed before
    its lookup counts for the process owning the listening socket."""
    p = port()
    count_port(counters, "tcp", p)
    server = lab.role(lab.acct, "echo-server", "--port", str(p))
    procs.append(server)
    assert json.loads(server.stdout.readline())["ready"]
    flows = ["flows", "--connect", ACCT_V4, "--port", str(p), "--count", "1000"]
    assert json.loads(lab.run(lab.peer, ["python3", "-m", "lab.roles", *flows]).stdout)["flows"] == 1000
    expected = kernel(counters, "tcp", p)
    assert ours_once_settled(daemon, server.pid, expected) == expected
    assert expected["tcprcvpacks"] >= 5000


@pytest.mark.parametrize("refusal", ["handover", "format"])
def test_a_failed_takeover_gives_the_queue_back(tmp_path, port, procs, refusal):
    """A successor whose handover is refused takes its queue rule back and lets go of
    everything it took. The predecessor here is an impostor that holds the namespace's claim,
    answers ping and refuses the handover, in a lab of its own (the module's daemon holds the
    claim of the shared lab). With `format`, it answers ping as a daemon whose tables come in
    an older format: the successor refuses before it changes anything."""
    p = port()
    impostor_path = str(tmp_path / "impostor.sock")
    with Lab("nfto") as lab:
        rules = Rules(lab.acct)
        rules.install()
        counters = Counters(lab, lab.acct)
        count_port(counters, "udp", p)
        held = Claim(lab.acct, impostor_path)
        impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        impostor.bind(impostor_path)
        impostor.listen(4)

        def answer_badly() -> None:  # answers ping, refuses the handover
            for _ in range(2 if refusal == "handover" else 1):  # a refused format asks no more
                conn, _ = impostor.accept()
                with conn:
                    cmd = json.loads(conn.makefile().readline())["cmd"]
                    ping = {"ok": True, "handover_format": HANDOVER_FORMAT if refusal == "handover" else 1}
                    reply = ping if cmd == "ping" else {"error": "handover refused"}
                    conn.sendall(json.dumps(reply).encode() + b"\n")

        threading.Thread(target=answer_badly, daemon=True).start()
        sink = lab.role(lab.acct, "sink", "--port", str(p), "--count", "40", "--hold")
        procs.append(sink)
        try:
            assert json.loads(sink.stdout.readline())["ready"]
            run = [sys.executable, "-m", "nfacct", "run", "--netns", lab.acct, "--takeover"]
            failed = subprocess.run(
                [*run, "--control", impostor_path, "--db", str(tmp_path / "b" / "b.db")],
                capture_output=True,
                text=True,
            )
            expected = {
                "handover": "nfacct: error: handover refused\n",
                "format": f"nfacct: error: the running daemon hands its tables over in format 1, this nfacct"
                f" reads format {HANDOVER_FORMAT}: restart it instead of --takeover (the packets passing"
                " meanwhile are recorded as unaccounted)\n",
            }
            assert failed.returncode == 1 and failed.stderr == expected[refusal]
            assert {q for *_where, q in rules.queue_rules()} == {0}
            assert claim.holder(lab.acct)["pid"] == os.getpid(), "the claim stays with the predecessor"
            assert not os.path.exists(tmp_path / "b"), "a failed start leaves no database behind"
            queues = lab.run(lab.acct, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
            assert queues == "", f"the successor left a queue bound: {queues}"
            send(lab, p, 40)  # no daemon bound: bypass lets everything through
            assert json.loads(sink.stdout.readline())["received"] == 40 * 200
            assert counters.read()[f"udp{p}-rcv"][0] == 40
        finally:
            impostor.close()
            held.release()
            rules.remove()
