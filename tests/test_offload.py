"""Flow offload against the real kernel: once a flow's owner is known, its set elements count it,
its packets stop meeting the daemon, and every total still equals the kernel's nft counters —
across process exits, a SIGKILLed daemon, a full set, fragments and a switch to queue mode.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from conftest import count_port, exited_rows, facts, free_port, kernel, until
from hypothesis import given
from hypothesis import strategies as st

from lab.daemon import Daemon
from lab.hosts import ACCT_V4, ACCT_V6, PEER_V4, PEER_V6
from nfacct.engine import Engine
from nfacct.faults import Faults
from nfacct.flowsets import FlowSets, elements, flow_bytes, flow_from_bytes, flow_of
from nfacct.offload import Offloader
from nfacct.resolver import Answer
from nfacct.tables import COUNTER_NAMES

ports = st.integers(0, 65535)
address_pairs = st.sampled_from([4, 16]).flatmap(
    lambda n: st.tuples(st.binary(min_size=n, max_size=n), st.binary(min_size=n, max_size=n))
)


@given(st.sampled_from([6, 17]), address_pairs, ports, ports)
def test_a_flow_and_its_elements_map_both_ways(proto, addrs, lport, rport):
    flow = (proto, addrs[0], lport, addrs[1], rport)
    out, inn = elements(flow)
    assert flow_of(out) == flow_of(inn) == flow_from_bytes(flow_bytes(flow)) == flow
    assert (out.set, inn.set) == (("out4", "in4") if len(addrs[0]) == 4 else ("out6", "in6"))


def elements_in_kernel(lab, port: int | None = None) -> int:
    """The flow sets' elements (of flows with `port` at either end), as `nft -j` lists them:
    independent of nfacct's own reading."""
    listing = json.loads(lab.run(lab.acct, ["nft", "-j", "list", "table", "inet", "nfacct"]).stdout)
    return sum(
        1
        for item in listing["nftables"]
        if "set" in item
        for el in item["set"].get("elem", [])
        if port is None or port in el["elem"]["val"]["concat"][2::2]
    )


def totals(daemon, pid: int) -> dict[str, int] | None:
    for task in daemon.top():
        if task["pid"] == pid:
            return {k: task[k] for k in COUNTER_NAMES}
    return None


def exact(daemon, counters, pid: int, proto: str, port: int, within: float = 10.0) -> dict[str, int]:
    """Poll until the process's totals equal the kernel's counters for its port; returns them."""
    truth = {}

    def same():
        truth.update(kernel(counters, proto, port))
        return totals(daemon, pid) == truth

    assert until(same, True, within), (totals(daemon, pid), truth, json.dumps(daemon.status()["offload"]))
    return truth


def client(lab, server: str, port: int, sport: int, *extra: str) -> subprocess.Popen:
    """A TCP client exchanging with `server`; it prints its report when done, then holds."""
    return lab.role(
        lab.acct, "client", "--connect", server, "--port", str(port), "--sport", str(sport), *extra
    )


def report(p: subprocess.Popen) -> dict:
    return json.loads(p.stdout.readline())


@pytest.fixture
def echo(lab, port, procs):
    """A TCP echo server in the peer, on both families; its port."""
    p = port()
    server = lab.role(lab.peer, "echo-server", "--bind", "::", "--port", str(p))
    procs.append(server)
    server.stdout.readline()
    return p


@pytest.mark.parametrize("server", [PEER_V4, PEER_V6], ids=["ipv4", "ipv6"])
def test_an_attributed_flow_leaves_the_queue_and_stays_exact(
    lab, counters, port, procs, daemons, tmp_path, echo, server
):
    d = Daemon(lab.acct, tmp_path)
    daemons.append(d)
    sport = port()
    count_port(counters, "tcp", sport)
    c = client(lab, server, echo, sport, "--size", "2000000", "--rounds", "10", "--pause", "0.2", "--hold")
    procs.append(c)
    assert until(lambda: elements_in_kernel(lab, sport), 2) == 2, "an open connection has its two elements"
    assert d.status()["offload"]["counter_age"] <= 1.0
    assert report(c)["received"] == 10 * 2_000_000
    # The client closed its socket: the elements went with their last counts.
    assert until(lambda: elements_in_kernel(lab, sport), 0) == 0
    truth = exact(d, counters, c.pid, "tcp", sport)
    status = d.status()
    assert status["offload"]["mode"] == "offload" and status["offload"]["removed"] >= 1
    queued = status["engine"]["packets"]
    assert queued < (truth["tcpsndpacks"] + truth["tcprcvpacks"]) / 10, "the flow still met the daemon"
    assert d.stop() == 0


def test_a_process_that_exits_is_written_with_its_elements_last_counts(
    lab, counters, port, daemons, tmp_path, echo
):
    d = Daemon(lab.acct, tmp_path, "--checkpoint-interval", "60")
    daemons.append(d)
    pids = {}
    for _ in range(5):
        sport = port()
        count_port(counters, "tcp", sport)
        p = lab.role(
            lab.acct, "client", "--connect", PEER_V4, "--port", str(echo), "--sport", str(sport),
            "--size", "1000000", "--rounds", "3", stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert p.wait(timeout=30) == 0
        pids[p.pid] = sport

    def written():
        rows = exited_rows(d.db)
        return all(
            pid in rows and {k: rows[pid][k] for k in COUNTER_NAMES} == kernel(counters, "tcp", sport)
            for pid, sport in pids.items()
        )

    assert until(written, True), (exited_rows(d.db), d.status()["offload"])
    assert d.status()["offload"]["added"] >= 5
    assert d.stop() == 0


MANY_SOCKETS = """
import resource, socket, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((sys.argv[2], int(sys.argv[3])))
    s.send(b"first")
    socks.append(s)
print("sent", flush=True)
sys.stdin.readline()
for s in socks:
    s.send(b"second, counted by its element")
"""


def test_a_process_with_more_flows_than_one_turn_withdraws_is_written_whole(
    lab, counters, port, procs, daemons, tmp_path
):
    """3,000 offloaded flows of one process that exits: their elements go over several loop
    turns (WITHDRAW_MOST a turn, so the queue is served in between), and the process is written
    once the last has gone, with exactly what the kernel counted."""
    flows, sink = 3000, port()
    counters.add("many", "out", f"udp dport {sink}")
    receive = "import socket, sys, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    receive += f"s.bind(('{PEER_V4}', {sink}))\nprint('ready', flush=True)\ntime.sleep(300)"
    receiver = ["python3", "-c", receive]
    procs.append(subprocess.Popen(lab.cmd(lab.peer, receiver), stdout=subprocess.PIPE, text=True))
    assert procs[-1].stdout.readline() == "ready\n"
    d = Daemon(lab.acct, tmp_path, "--checkpoint-interval", "60")
    daemons.append(d)
    argv = lab.cmd(lab.acct, ["python3", "-c", MANY_SOCKETS, str(flows), PEER_V4, str(sink)])
    sender = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs.append(sender)
    assert sender.stdout.readline() == "sent\n"
    assert until(lambda: elements_in_kernel(lab, sink), 2 * flows, 30) == 2 * flows
    removed = d.status()["offload"]["removed"]
    sender.stdin.write("go\n")
    sender.stdin.close()
    assert sender.wait(timeout=30) == 0

    def written() -> dict | None:
        row = exited_rows(d.db).get(sender.pid)
        return row and {k: row[k] for k in ("udpsndpacks", "udpsndbytes")}

    packets, nbytes = counters.read()["many"]
    assert packets == 2 * flows
    assert until(written, {"udpsndpacks": packets, "udpsndbytes": nbytes}, 30)
    assert elements_in_kernel(lab, sink) == 0
    assert d.status()["offload"]["removed"] - removed == flows
    assert d.stop() == 0


def test_a_daemon_killed_mid_flow_is_continued_from_its_elements(
    lab, counters, port, procs, daemons, tmp_path, echo
):
    """SIGKILL while an offloaded flow runs: the restarted daemon reads the elements it left and
    continues from the last checkpoint; nothing of the flow is lost (the elements counted
    while no daemon ran)."""
    d = Daemon(lab.acct, tmp_path, "--checkpoint-interval", "0.5")
    daemons.append(d)
    sport = port()
    count_port(counters, "tcp", sport)
    c = client(lab, PEER_V4, echo, sport, "--size", "200000", "--rounds", "40", "--pause", "0.1", "--hold")
    procs.append(c)
    assert until(lambda: elements_in_kernel(lab, sport), 2) == 2
    time.sleep(1.0)  # checkpointed with its elements' readings
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    time.sleep(1.0)  # the flow goes on, counted by its elements only
    d = Daemon(lab.acct, tmp_path, "--checkpoint-interval", "0.5", db=d.db)
    daemons.append(d)
    assert report(c)["received"] == 40 * 200000
    truth = exact(d, counters, c.pid, "tcp", sport)
    assert truth["tcpsndbytes"] > 40 * 200000
    assert d.status()["coverage"]["unaccounted"] == 0
    assert d.stop() == 0


def test_a_full_set_leaves_flows_on_the_queue_and_counts_the_overflow(
    lab, counters, port, procs, daemons, tmp_path, echo
):
    d = Daemon(lab.acct, tmp_path, "--max-offloaded", "1")
    daemons.append(d)
    clients = {}
    for _ in range(3):
        sport = port()
        count_port(counters, "tcp", sport)
        c = client(lab, PEER_V4, echo, sport, "--size", "300000", "--rounds", "4", "--pause", "0.2", "--hold")
        procs.append(c)
        clients[c] = sport
    for c in clients:
        assert report(c)["received"] == 4 * 300000
    for c, sport in clients.items():
        exact(d, counters, c.pid, "tcp", sport)
    offload = d.status()["offload"]
    assert offload["added"] >= 1 and offload["overflow"] >= 2, offload
    assert d.stop() == 0


def test_a_flow_left_on_the_queue_is_offloaded_once_there_is_room(
    lab, counters, port, procs, daemons, tmp_path, echo
):
    """One flow fits: the second stays on the queue path until the first closes, then the next
    GC cycle offers it again and the kernel counts it; both exact."""
    d = Daemon(lab.acct, tmp_path, "--max-offloaded", "1", "--gc-cycle", "1")
    daemons.append(d)
    first, second = port(), port()
    for p in (first, second):
        count_port(counters, "tcp", p)
    a = client(lab, PEER_V4, echo, first, "--size", "100000", "--rounds", "5", "--pause", "0.1", "--hold")
    procs.append(a)
    assert until(lambda: elements_in_kernel(lab, first), 2) == 2
    b = client(lab, PEER_V4, echo, second, "--size", "100000", "--rounds", "40", "--pause", "0.1", "--hold")
    procs.append(b)
    assert until(lambda: d.status()["offload"]["overflow"] >= 1, True)
    assert elements_in_kernel(lab, second) == 0, "no room: the second flow stays on the queue path"
    assert report(a)["received"] == 5 * 100000  # the first closes its socket: room
    assert until(lambda: elements_in_kernel(lab, second), 2) == 2, d.status()["offload"]
    assert report(b)["received"] == 40 * 100000
    exact(d, counters, a.pid, "tcp", first)
    exact(d, counters, b.pid, "tcp", second)
    assert d.stop() == 0


def test_fragments_are_never_offloaded_and_count_exactly(lab, counters, port, procs, daemons, tmp_path):
    """IPv6 datagrams over the veth's MTU reach the input hook in fragments (IPv4 ones are
    reassembled before it). Only the first carries the ports, so none may be counted by an
    element: the rest would reach the daemon without their ports, or pass uncounted."""
    d = Daemon(lab.acct, tmp_path)
    daemons.append(d)
    p = port()
    counters.add(f"frag{p}", "in", f"ip6 saddr {PEER_V6} ip6 daddr {ACCT_V6} exthdr frag exists")
    sink = lab.role(lab.acct, "sink", "--bind", "::", "--port", str(p), "--count", "60", "--hold")
    procs.append(sink)
    assert json.loads(sink.stdout.readline())["ready"]
    argv = ["python3", "-m", "lab.roles", "sender", "--connect", ACCT_V6, "--port", str(p)]
    lab.run(lab.peer, [*argv, "--count", "60", "--size", "4000", "--rate", "100"])
    assert json.loads(sink.stdout.readline())["received"] == 60 * 4000
    fragments = counters.read()[f"frag{p}"]
    assert fragments[0] == 60 * 3, "each 4000-byte datagram arrives in three fragments"
    got = until(lambda: (totals(d, sink.pid) or {}).get("udprcvpacks"), fragments[0])
    assert got == fragments[0] and totals(d, sink.pid)["udprcvbytes"] == fragments[1]
    assert d.status()["engine"]["unattributed_fragments"] == 0
    assert d.stop() == 0


def test_queue_mode_takes_back_the_elements_it_finds(lab, counters, port, procs, daemons, tmp_path, echo):
    d = Daemon(lab.acct, tmp_path, "--checkpoint-interval", "0.5")
    daemons.append(d)
    sport = port()
    count_port(counters, "tcp", sport)
    c = client(lab, PEER_V4, echo, sport, "--size", "200000", "--rounds", "30", "--pause", "0.1", "--hold")
    procs.append(c)
    assert until(lambda: elements_in_kernel(lab, sport), 2) == 2
    time.sleep(1.0)  # checkpointed: the packets it counted itself are written
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    assert elements_in_kernel(lab, sport) == 2, "a dead daemon's elements go on counting"
    d = Daemon(lab.acct, tmp_path, "--mode", "queue", db=d.db)
    daemons.append(d)
    assert elements_in_kernel(lab) == 0, "queue mode: every packet through the queue"  # all flows
    assert report(c)["received"] == 30 * 200000
    exact(d, counters, c.pid, "tcp", sport)
    status = d.status()
    assert status["coverage"]["unaccounted"] == 0
    offload = status["offload"]
    assert offload["mode"] == "queue" and offload["added"] == 0 and offload["removed"] >= 1
    assert d.stop() == 0


def test_a_receive_only_udp_socket_is_offloaded_too(lab, counters, port, procs, daemons, tmp_path):
    d = Daemon(lab.acct, tmp_path)
    daemons.append(d)
    p = port()
    count_port(counters, "udp", p)
    sink = lab.role(lab.acct, "sink", "--port", str(p), "--count", "2000", "--hold")
    procs.append(sink)
    assert json.loads(sink.stdout.readline())["ready"]
    lab.run(lab.peer, ["python3", "-m", "lab.roles", "sender", "--connect", ACCT_V4, "--port", str(p),
                       "--count", "2000", "--rate", "2000"])  # fmt: skip
    assert json.loads(sink.stdout.readline())["received"] == 2000 * 200
    exact(d, counters, sink.pid, "udp", p)
    assert d.status()["engine"]["packets"] < 1000
    assert d.stop() == 0


def test_status_says_how_offload_goes(lab, rules, daemons, tmp_path):
    d = Daemon(lab.acct, tmp_path)
    daemons.append(d)
    offload = d.status()["offload"]
    assert set(offload) >= {
        "mode",
        "flows",
        "limit",
        "added",
        "removed",
        "overflow",
        "counter_age",
        "refused",
    }
    assert offload["mode"] == "offload" and offload["limit"] == 262_144
    shown = d.cli("status")
    assert "offload" in shown and "flows counted by the kernel now" in shown and "(at most 262144)" in shown
    assert d.stop() == 0


def test_a_ruleset_without_flow_sets_means_queue_mode_said_once(
    lab, rules, counters, port, procs, daemons, tmp_path, echo
):
    """An nfacct before offload installed no sets: the daemon still counts every packet, through
    the queue, and says why; `rules install` puts the sets in."""
    if rules.show().backend != "iptables-nft":
        pytest.skip("the native backend's sets live in the same table as its queue rules")
    lab.run(lab.acct, ["nft", "delete", "table", "inet", "nfacct"])
    try:
        d = Daemon(lab.acct, tmp_path)
        daemons.append(d)
        offload = d.status()["offload"]
        assert offload["mode"] == "queue" and "nfacct rules install" in offload["problem"]
        assert "flow offload off" in d.log.read_text()
        sport = port()
        count_port(counters, "tcp", sport)
        c = client(lab, PEER_V4, echo, sport, "--size", "100000", "--rounds", "3", "--hold")
        procs.append(c)
        assert report(c)["received"] == 300000
        exact(d, counters, c.pid, "tcp", sport)
        assert d.stop() == 0
    finally:
        rules.install()
    assert rules.has_flow_sets()


def test_a_daemon_with_another_database_claims_nothing_elements_counted_before(
    lab, counters, port, procs, daemons, tmp_path, echo
):
    """Elements a daemon leaves count on; a daemon writing a different database (or the first one
    ever) must not credit what they counted before it started: another database holds that."""
    first = Daemon(lab.acct, tmp_path / "first")
    daemons.append(first)
    sport = port()
    count_port(counters, "tcp", sport)
    c = client(lab, PEER_V4, echo, sport, "--size", "100000", "--rounds", "30", "--pause", "0.1", "--hold")
    procs.append(c)
    assert until(lambda: elements_in_kernel(lab, sport), 2) == 2
    assert first.stop() == 0
    before = kernel(counters, "tcp", sport)
    assert elements_in_kernel(lab, sport) == 2, "a stopped daemon leaves its elements counting"
    second = Daemon(lab.acct, tmp_path / "second")
    daemons.append(second)
    assert report(c)["received"] == 30 * 100000
    after = kernel(counters, "tcp", sport)
    ours = until(lambda: (totals(second, c.pid) or {}).get("tcpsndpacks", 0) > 0, True)
    assert ours, "the flow is adopted and counted from the second daemon's start"
    time.sleep(1.2)  # a fresh reading
    got = totals(second, c.pid)
    assert 0 < got["tcpsndpacks"] <= after["tcpsndpacks"] - before["tcpsndpacks"], (got, before, after)
    assert second.stop() == 0


def test_a_flow_removed_and_added_again_during_a_reading_is_not_counted_twice(lab, rules):
    """A reading's next datagram is filled before we read it: a flow whose element is removed
    (its last count credited) and added again meanwhile would find the old element's count in
    it, and count it twice. The engine, the offloader and the sets are real; so are the packets
    (UDP on the namespace's loopback, counted by the element)."""
    lab.run(lab.acct, ["ip", "link", "set", "lo", "up"])
    engine = Engine()
    offloader = Offloader(FlowSets(lab.acct), engine, Faults(), limit=100, netns=lab.acct)

    def flush() -> None:
        offloader.flush(engine.take_withdrawals(100), engine.take_offloadable())

    try:
        lo = bytes([127, 0, 0, 1])
        sport, dport = free_port(), free_port()
        flow = (17, lo, sport, lo, dport, lab.acct)
        engine.tables.add_sock(flow, time.monotonic())
        engine.apply_answers([Answer(flow, facts(4242))])
        flush()
        assert offloader.flows == 1
        send = (
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
            f" s.bind(('127.0.0.1', {sport}));"
            f" [s.sendto(b'x' * 72, ('127.0.0.1', {dport})) for _ in range(100)]"
        )
        lab.run(lab.acct, ["python3", "-c", send])
        offloader.refresh()  # a reading begins, and reads what it can at once
        assert not offloader.reading
        task = engine.tables.running[4242]
        assert task.counters[4:6] == [100, 100 * 100], "the element counted the 100 datagrams"
        offloader.refresh(at_once=0)  # another reading: its first datagram is filled now
        assert offloader.reading
        offloader.withdraw([flow])  # the element goes, its last count credited (none new)
        engine.apply_answers([Answer(flow, facts(4242))])
        flush()  # a new element, counting from zero
        while offloader.reading:
            offloader.step()
        assert task.counters[4:6] == [100, 100 * 100], "the old element's count came back from the dump"
    finally:
        offloader.sets.close()
