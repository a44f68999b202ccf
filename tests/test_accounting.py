"""End to end: real nftables, NFQUEUE, sock_diag and processes in a throwaway namespace.

Every per-process counter reported by `nfacct top --json` must equal the kernel's own nft
counters for that process's flows, packets and bytes, both directions.
"""

from __future__ import annotations

import json
import time

import pytest

from lab.hosts import ACCT_V4, ACCT_V6, PEER_V4, PEER_V6
from nfacct.tables import COUNTER_NAMES


def expect_flows(counters, proto: str, port: int, local_port_is: str = "sport") -> dict[str, str]:
    """Count a process's packets by its local port: sent ones leave with it, received arrive to it."""
    tag = f"{proto}{port}"
    counters.add(f"{tag}-snd", "out", f"meta l4proto {proto} th sport {port}")
    counters.add(f"{tag}-rcv", "in", f"meta l4proto {proto} th dport {port}")
    return {"snd": f"{tag}-snd", "rcv": f"{tag}-rcv"}


def kernel_view(counters, proto: str, names: dict[str, str]) -> dict[str, int]:
    read = counters.read()
    view = dict.fromkeys(COUNTER_NAMES, 0)
    for d in ("snd", "rcv"):
        view[f"{proto}{d}packs"], view[f"{proto}{d}bytes"] = read[names[d]]
    return view


def nfacct_view(daemon, pid: int) -> dict[str, int] | None:
    for task in daemon.top():
        if task["pid"] == pid:
            return {k: task[k] for k in COUNTER_NAMES}
    return None


def assert_equal_to_kernel(daemon, counters, pid: int, proto: str, names: dict[str, str]) -> None:
    """Poll until the engine has caught up (lookups are asynchronous), then require equality."""
    deadline = time.monotonic() + 10
    while True:
        kernel = kernel_view(counters, proto, names)
        ours = nfacct_view(daemon, pid)
        if ours == kernel or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert kernel[f"{proto}sndpacks"] > 0 or kernel[f"{proto}rcvpacks"] > 0, "no traffic was counted"
    assert ours == kernel, json.dumps(daemon.status())


def start(lab, procs, ns, *args):
    p = lab.role(ns, *args)
    procs.append(p)
    return p, json.loads(p.stdout.readline())


@pytest.mark.parametrize("server", [PEER_V4, PEER_V6], ids=["ipv4", "ipv6"])
def test_tcp_client_matches_kernel_counters(lab, counters, daemon, procs, port, server):
    sport, port = port(), port()
    names = expect_flows(counters, "tcp", sport)
    start(
        lab,
        procs,
        lab.peer,
        "echo-server",
        "--bind",
        "::" if ":" in server else "0.0.0.0",
        "--port",
        str(port),
    )
    client, report = start(
        lab,
        procs,
        lab.acct,
        "client",
        "--connect",
        server,
        "--port",
        str(port),
        "--sport",
        str(sport),
        "--size",
        "200000",
        "--rounds",
        "10",
        "--hold",
    )
    assert report["received"] == 2_000_000
    assert_equal_to_kernel(daemon, counters, client.pid, "tcp", names)


@pytest.mark.parametrize("server", [PEER_V4, PEER_V6], ids=["ipv4", "ipv6"])
def test_udp_client_matches_kernel_counters(lab, counters, daemon, procs, port, server):
    sport, port = port(), port()
    names = expect_flows(counters, "udp", sport)
    start(
        lab,
        procs,
        lab.peer,
        "echo-server",
        "--proto",
        "udp",
        "--bind",
        "::" if ":" in server else "0.0.0.0",
        "--port",
        str(port),
    )
    client, _ = start(
        lab,
        procs,
        lab.acct,
        "client",
        "--proto",
        "udp",
        "--connect",
        server,
        "--port",
        str(port),
        "--sport",
        str(sport),
        "--size",
        "1200",
        "--rounds",
        "50",
        "--hold",
    )
    assert_equal_to_kernel(daemon, counters, client.pid, "udp", names)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_udp_server_that_only_receives_is_identified(lab, counters, daemon, procs, port, family):
    port = port()
    names = expect_flows(counters, "udp", port)
    bind, target = ("0.0.0.0", ACCT_V4) if family == "ipv4" else ("::", ACCT_V6)
    sink = lab.role(lab.acct, "sink", "--bind", bind, "--port", str(port), "--count", "40", "--hold")
    procs.append(sink)
    assert json.loads(sink.stdout.readline())["ready"]
    start(
        lab,
        procs,
        lab.peer,
        "sender",
        "--connect",
        target,
        "--port",
        str(port),
        "--count",
        "40",
        "--size",
        "300",
        "--hold",
    )
    assert json.loads(sink.stdout.readline())["received"] == 40 * 300
    assert_equal_to_kernel(daemon, counters, sink.pid, "udp", names)
    kernel = kernel_view(counters, "udp", names)
    assert kernel["udpsndpacks"] == 0 and kernel["udprcvpacks"] == 40


@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize(("size", "rounds"), [("50000", "20"), ("2000000", "3")], ids=["50k", "2M"])
def test_loopback_tcp_counts_for_both_ends(lab, counters, daemon, procs, port, addr, size, rounds):
    """Loopback sends TCP super-packets over 64 KiB (IPv4 total length 0): a 2 MB write makes
    them, and they count with the length the kernel counts (found as a defect: 50,000-byte
    writes hid a miscount of every such packet)."""
    sport, port = port(), port()
    client_names = expect_flows(counters, "tcp", sport)
    server_names = expect_flows(counters, "tcp", port)
    counters.add(f"big{port}", "out", f"meta l4proto tcp th sport {sport} meta length > 65535")
    server, _ = start(lab, procs, lab.acct, "echo-server", "--bind", addr, "--port", str(port))
    client, _ = start(
        lab,
        procs,
        lab.acct,
        "client",
        "--connect",
        addr,
        "--port",
        str(port),
        "--sport",
        str(sport),
        "--size",
        size,
        "--rounds",
        rounds,
        "--hold",
    )
    assert_equal_to_kernel(daemon, counters, client.pid, "tcp", client_names)
    assert_equal_to_kernel(daemon, counters, server.pid, "tcp", server_names)
    big = counters.read()[f"big{port}"][0]
    assert (big > 0) == (size == "2000000"), f"{big} packets over 64 KiB"


def test_status_reports_engine_and_kernel_queue(daemon):
    status = daemon.status()
    assert status["queue"]["flags"] == 13  # GSO | FAIL_OPEN | UID_GID
    assert status["queue"]["copy_range"] == 128
    assert status["queue"]["id_sequence"] > 0
    assert status["queue"]["missed"] == 0
    engine = status["engine"]
    by_proto = engine["by_protocol"]
    total = sum(v[0] for d in by_proto.values() for v in d.values())
    assert total + engine["malformed_total"] == engine["packets"] == status["queue"]["id_sequence"]
    assert engine["errors"] == 0
