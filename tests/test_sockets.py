"""`nfacct sockets` against the real kernel: processes set options on their own sockets (TCP and
UDP, IPv4 and IPv6, listening and connected) and say what their own getsockopt reads
(tests/socket_owner.py); nfacct must report exactly that. knetstat's diagnostics come from real
stuck connections, counters from a real daemon equal nft counter rules for the same ports,
an exited process's sockets are gone, and a user other than root gets one clear line.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import PROFILE, SYSTEM_PYTHON, count_port, kernel, until
from hypothesis import given
from hypothesis import strategies as st

from lab.daemon import Daemon
from lab.hosts import ACCT_V4, PEER_V4, PEER_V6
from nfacct import cli, netns, sockopts, sockview, text
from nfacct.sockdiag import (
    INET_DIAG_CONG,
    INET_DIAG_INFO,
    INET_DIAG_MARK,
    INET_DIAG_SKMEMINFO,
    INET_DIAG_SKV6ONLY,
    INET_DIAG_SOCKOPT,
    INET_DIAG_TOS,
    TCP_INFO_FIELDS,
    SockDetail,
    SockEntry,
    decode_detail,
    decode_message,
)

OWNER = str(Path(__file__).with_name("socket_owner.py"))
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def owner(
    lab, ns: str, spec: list[dict], procs: list, comm: bytes | None = None, shared: Path | None = None
) -> dict:
    """Start tests/socket_owner.py in `ns` (as uid 65534, from a copy in `shared`, if given); its
    report."""
    user = shared is not None
    argv = [sys.executable, OWNER, json.dumps(spec)]
    if user:
        argv = [SYSTEM_PYTHON, shutil.copy(OWNER, shared), json.dumps(spec)]
    env = {**os.environ, "COMM": os.fsdecode(comm)} if comm else None
    p = subprocess.Popen(
        lab.cmd(ns, [*AS_NOBODY, *argv] if user else argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    procs.append(p)
    line = p.stdout.readline()
    assert line, f"socket_owner.py failed (status {p.wait()})"
    return json.loads(line)


def nfacct(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nfacct", "sockets", *args], capture_output=True)


def listing(ns: str, *args: str) -> list[dict]:
    r = nfacct("--netns", ns, "--json", *args)
    assert r.returncode == 0 and not r.stderr, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def by_ports(records: list[dict]) -> dict[tuple, dict]:
    return {(r["proto"], r["ip"], r["local_port"], r["remote_port"]): r for r in records}


def row(table: str, local: str) -> str:
    """The one line of a table whose local address is `local`."""
    found = [line for line in table.splitlines() if line.split()[3:4] == [local]]
    assert len(found) == 1, table
    return found[0]


# ---- options ------------------------------------------------------------------------------


def scenario(port: Callable[[], int]) -> tuple[list[dict], dict[str, dict]]:
    """Sockets of every kind with options set, and what getsockopt must then read of each
    (as the kernel keeps them: it doubles a buffer size asked for)."""
    p = [port() for _ in range(8)]
    spec = [
        {"name": "l4", "proto": "tcp", "ip": 4, "bind": ["0.0.0.0", p[0]], "listen": True,
         "set": {"SO_REUSEADDR": 1, "SO_REUSEPORT": 1, "TCP_FASTOPEN": 5, "TCP_DEFER_ACCEPT": 3,
                 "SO_RCVBUF": 65536, "SO_MARK": 42, "IP_TOS": 0x10}},
        # TCP_DEFER_ACCEPT: the listener hands the connection over once data came, hence `send`.
        {"name": "c4", "proto": "tcp", "ip": 4, "connect": ["127.0.0.1", p[0]], "send": 1, "accept": "l4",
         "set": {"SO_KEEPALIVE": 1, "TCP_KEEPIDLE": 77, "TCP_KEEPINTVL": 9, "TCP_KEEPCNT": 4,
                 "TCP_NODELAY": 1, "SO_LINGER": [1, 0], "SO_SNDTIMEO": 1.5, "TCP_USER_TIMEOUT": 3000,
                 "IP_TOS": 0x20, "TCP_CONGESTION": "reno"}},
        {"name": "l6", "proto": "tcp", "ip": 6, "bind": ["::", p[1]], "listen": True,
         "set": {"IPV6_V6ONLY": 1, "SO_SNDBUF": 32768, "SO_RCVTIMEO": 2.5, "SO_LINGER": [1, 7],
                 "TCP_NODELAY": 1}},
        {"name": "c6", "proto": "tcp", "ip": 6, "connect": ["::1", p[1]], "accept": "l6",
         "set": {"IPV6_TCLASS": 0x28, "SO_REUSEADDR": 1}},
        {"name": "u4", "proto": "udp", "ip": 4, "bind": ["0.0.0.0", p[2]],
         "set": {"SO_BROADCAST": 1, "SO_BINDTODEVICE": "veth0", "SO_RCVBUF": 50000, "IP_TOS": 0x08,
                 "SO_REUSEADDR": 1}},
        {"name": "u4c", "proto": "udp", "ip": 4, "bind": [ACCT_V4, p[3]], "connect": [PEER_V4, p[4]],
         "set": {"SO_MARK": 7, "SO_RCVTIMEO": 0.5}},
        {"name": "u6", "proto": "udp", "ip": 6, "bind": ["::", p[5]], "connect": [PEER_V6, p[6]],
         "set": {"IPV6_V6ONLY": 1, "SO_REUSEPORT": 1, "SO_SNDTIMEO": 0.5, "IPV6_TCLASS": 4}},
        {"name": "u6u", "proto": "udp", "ip": 6, "bind": ["::", p[7]],
         "set": {"IPV6_V6ONLY": 0, "SO_LINGER": [1, 3]}},
    ]  # fmt: skip
    kept = {"SO_RCVBUF": lambda v: 2 * v, "SO_SNDBUF": lambda v: 2 * v, "SO_LINGER": lambda v: v[1]}
    expected = {
        s["name"]: {
            n: kept.get(n, lambda v: v)(v) for n, v in s["set"].items() if n not in sockview.SOCK_DIAG_ONLY
        }
        for s in spec
    }
    return spec, expected


def test_every_option_a_process_set_is_reported_as_its_getsockopt_reads_it(lab, port, procs):
    spec, expected = scenario(port)
    report = owner(lab, lab.acct, spec, procs, comm=b"sockowner")
    records = listing(lab.acct, "--pid", str(report["pid"]))
    assert len(records) == len(report["sockets"]) == len(spec) + 2  # and the two accepted ones
    found = by_ports(records)
    sets = {s["name"]: s["set"] for s in spec}
    for s in report["sockets"]:
        kind = next(x for x in spec if x["name"] == s["name"].removesuffix("-accepted"))
        r = found[(kind["proto"], kind["ip"], s["local_port"], s["remote_port"])]
        assert r["pid"] == report["pid"] and r["pids"] == [report["pid"]]
        assert r["options_error"] is None
        # What the process set reads back as set (the scenario is what it means to be)...
        for name, value in expected.get(s["name"], {}).items():
            assert s["got"][name] == value, (s["name"], name)
        # ...and nfacct reads exactly what the process's own getsockopt reads, for every option.
        for name, value in s["got"].items():
            assert (r["options"][name], r["option_sources"][name]) == (value, "getsockopt"), (s["name"], name)
        # IP_TOS, IPV6_TCLASS and the congestion control come from sock_diag.
        for name, value in s["also"].items():
            assert (r["options"][name], r["option_sources"][name]) == (value, "sock_diag"), (s["name"], name)
            assert value == sets.get(s["name"], {}).get(name, value), (s["name"], name)
    c4 = next(s for s in report["sockets"] if s["name"] == "c4")
    u4 = next(s for s in report["sockets"] if s["name"] == "u4")
    table = nfacct("--netns", lab.acct, "--pid", str(report["pid"])).stdout.decode()
    assert table.splitlines()[0].split() == [
        "Proto", "Recv-Q", "Send-Q", "Local", "Address", "Foreign", "Address", "State", "Diag",
        "PID/Program", "name", "Options",
    ]  # fmt: skip
    got = c4["got"]
    assert row(table, f"127.0.0.1:{c4['local_port']}").split()[5:] == [
        "ESTABLISHED",
        f"{report['pid']}/sockowner",
        "SO_REUSEADDR=0,SO_REUSEPORT=0,SO_KEEPALIVE=1,TCP_KEEPIDLE=77,TCP_KEEPINTVL=9,TCP_KEEPCNT=4,"
        f"TCP_USER_TIMEOUT=3000,TCP_NODELAY=1,SO_LINGER=0s,SO_RCVBUF={got['SO_RCVBUF']},"
        f"SO_SNDBUF={got['SO_SNDBUF']},SO_SNDTIMEO=1500ms,IP_TOS=0x20,TCP_CONGESTION=reno",
    ]
    assert row(table, f"0.0.0.0:{u4['local_port']}").split()[1:] == [
        "0", "0", f"0.0.0.0:{u4['local_port']}", "0.0.0.0:*", "UNCONN", f"{report['pid']}/sockowner",
        "SO_REUSEADDR=1,SO_REUSEPORT=0,SO_RCVBUF=100000,SO_SNDBUF=212992,SO_BROADCAST=1,SO_BINDTODEVICE=veth0,IP_TOS=0x8",
    ]  # fmt: skip


def test_tcp_and_udp_alone(lab, port, procs):
    spec, _ = scenario(port)
    report = owner(lab, lab.acct, spec, procs)
    proto_of = {s["name"]: s["proto"] for s in spec}
    for flag, proto in (("--tcp", "tcp"), ("--udp", "udp")):
        records = listing(lab.acct, "--pid", str(report["pid"]), flag)
        assert {r["proto"] for r in records} == {proto}
        assert len(records) == sum(
            proto_of[s["name"].removesuffix("-accepted")] == proto for s in report["sockets"]
        )


def test_a_hostile_process_name_is_escaped_in_the_table_and_exact_in_json(lab, port, procs):
    name = b"ev\x1b[2Jil\xff"
    p = port()
    report = owner(
        lab, lab.acct, [{"name": "u", "proto": "udp", "ip": 4, "bind": ["0.0.0.0", p]}], procs, comm=name
    )
    table = nfacct("--netns", lab.acct, "--pid", str(report["pid"])).stdout
    assert b"\x1b" not in table and b"\xff" not in table
    assert f" {report['pid']}/ev\\x1b[2Jil\\xff " in row(table.decode(), f"0.0.0.0:{p}")
    (r,) = listing(lab.acct, "--pid", str(report["pid"]))
    assert text.encode(r["command"]) == name


def test_the_sockets_of_an_exited_process_are_gone(lab, port, procs):
    p = [port(), port()]
    spec = [
        {"name": "l", "proto": "tcp", "ip": 6, "bind": ["::", p[0]], "listen": True},
        {"name": "u", "proto": "udp", "ip": 4, "bind": ["0.0.0.0", p[1]]},
    ]
    report = owner(lab, lab.acct, spec, procs)
    mine = [r for r in listing(lab.acct) if r["local_port"] in p]
    assert [r["pid"] for r in mine] == [report["pid"]] * 2
    procs[-1].stdin.close()
    procs[-1].wait()
    records = listing(lab.acct)
    assert [r for r in records if r["local_port"] in p or r["pid"] == report["pid"]] == []
    r = nfacct("--netns", lab.acct, "--pid", str(report["pid"]))
    assert (r.returncode, r.stderr) == (1, f"nfacct: error: no process with pid {report['pid']}\n".encode())


# ---- knetstat's Diag column ---------------------------------------------------------------

FLOOD = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.setblocking(False)
end = time.monotonic() + 1
while time.monotonic() < end:  # until the receiver's window is shut: it never reads
    try:
        s.send(b"x" * 65536)
    except BlockingIOError:
        time.sleep(0.01)
print(s.getsockname()[1], flush=True)
sys.stdin.read()
"""

QUIET = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
s.send(b"y" * 1000)
print("sent", flush=True)
sys.stdin.read()
"""


def script(lab, ns: str, code: str, procs: list, *args: str) -> subprocess.Popen:
    p = subprocess.Popen(
        lab.cmd(ns, [sys.executable, "-c", code, *args]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(p)
    return p


def test_knetstat_diagnostics_of_stuck_connections(lab, port, procs):
    full, quiet = port(), port()
    spec = [
        {
            "name": "full",
            "proto": "tcp",
            "ip": 4,
            "bind": [PEER_V4, full],
            "listen": True,
            "set": {"SO_RCVBUF": 4096},
        },
        {"name": "quiet", "proto": "tcp", "ip": 4, "bind": [PEER_V4, quiet], "listen": True},
    ]
    owner(lab, lab.peer, spec, procs)
    # A receiver that never reads: its window shuts (|<), and so does its sender's (>|).
    sender = int(script(lab, lab.acct, FLOOD, procs, PEER_V4, str(full)).stdout.readline())

    def diag(ns: str, local: int, remote: int) -> list[str]:
        return by_ports(listing(ns, "--tcp"))[("tcp", 4, local, remote)]["diag"]

    assert until(lambda: diag(lab.acct, sender, full), ["zero_send_window"]) == ["zero_send_window"]
    assert diag(lab.peer, full, sender) == ["zero_receive_window"]
    table = nfacct("--netns", lab.acct, "--tcp").stdout.decode()
    assert row(table, f"{ACCT_V4}:{sender}").split()[5:7] == ["ESTABLISHED", ">|"]
    # A peer gone silent: data unacknowledged, and no ACK for over a second (>#; the last ACK
    # may be the handshake's, so this can show less than a second after the data left).
    client = script(lab, lab.acct, QUIET, procs, PEER_V4, str(quiet))
    local = int(client.stdout.readline())
    assert diag(lab.acct, local, quiet) == []
    drop = "table inet sockets_test { chain input { type filter hook input priority 0; "
    drop += f"tcp dport {quiet} drop; }}; }}\n"
    lab.run(lab.peer, ["nft", "-f", "-"], input=drop)
    try:
        client.stdin.write("send\n")
        client.stdin.flush()
        assert client.stdout.readline() == "sent\n"
        assert until(lambda: diag(lab.acct, local, quiet), ["unacked_over_1s"]) == ["unacked_over_1s"]
        table = nfacct("--netns", lab.acct, "--tcp").stdout.decode()
        assert row(table, f"{ACCT_V4}:{local}").split()[5:7] == ["ESTABLISHED", ">#"]
    finally:
        lab.run(lab.peer, ["nft", "delete", "table", "inet", "sockets_test"])


# ---- counters from a running daemon -------------------------------------------------------


@pytest.mark.parametrize("mode", ["offload", "queue"])
def test_counters_of_a_running_daemon_are_each_flows_whole_count(
    lab, rules, counters, port, procs, tmp_path, mode
):
    echo, sport, udp = port(), port(), port()
    count_port(counters, "tcp", sport)
    count_port(counters, "udp", udp)
    server = lab.role(lab.peer, "echo-server", "--bind", "::", "--port", str(echo))
    procs.append(server)
    server.stdout.readline()
    udp_server = lab.role(lab.acct, "echo-server", "--proto", "udp", "--port", str(udp))
    procs.append(udp_server)
    udp_server.stdout.readline()
    d = Daemon(lab.acct, tmp_path, "--mode", mode)
    try:
        # A TCP connection that stays open, and two flows to one unconnected UDP socket, each
        # from a port of its own.
        argv = ["holder", "--proto", "tcp", "--connect", PEER_V4, "--port", str(echo), "--sport", str(sport)]
        client = lab.role(lab.acct, *argv, "--size", "20000")
        procs.append(client)
        assert json.loads(client.stdout.readline())["ready"]
        client.stdin.write("send 20\n")
        client.stdin.flush()
        assert json.loads(client.stdout.readline())["received"] == 20 * 20000
        sender = ["python3", "-m", "lab.roles", "sender", "--connect", ACCT_V4, "--port", str(udp)]
        for _ in range(2):
            lab.run(lab.peer, [*sender, "--count", "20", "--rate", "100"])

        def ours(local: int) -> dict | None:
            # No --control: the daemon accounting the namespace is found by its claim.
            found = [r for r in listing(lab.acct) if r["local_port"] == local and r["state"] != "LISTEN"]
            return found[0]["counters"] if len(found) == 1 else None

        def truth(proto: str, local: int, flows: int) -> dict[str, int]:
            k = kernel(counters, proto, local)
            return {
                "flows": flows,
                "out_packets": k[f"{proto}sndpacks"],
                "out_bytes": k[f"{proto}sndbytes"],
                "in_packets": k[f"{proto}rcvpacks"],
                "in_bytes": k[f"{proto}rcvbytes"],
            }

        for proto, local, flows in (("tcp", sport, 1), ("udp", udp, 2)):
            assert truth(proto, local, flows)["out_packets"] > 20
            # Both read again each time: a late ACK may still move them between the two readings.
            assert until(lambda p=proto, lo=local, f=flows: ours(lo) == truth(p, lo, f), True), local
        table = nfacct("--netns", lab.acct).stdout.decode()
        assert table.splitlines()[0].split()[-3:] == ["Sent", "Received", "Options"]
        c = ours(sport)
        assert row(table, f"{ACCT_V4}:{sport}").split()[7].startswith(f"{c['out_packets']}/")
        wrong = nfacct("--netns", lab.acct, "--control", str(tmp_path / "nobody.sock"))
        assert wrong.returncode == 1 and wrong.stderr.decode().count("\n") == 1
        assert wrong.stderr.startswith(b"nfacct: error: no nfacct daemon at ")
    finally:
        assert d.stop() == 0
    assert {r["counters"] is None for r in listing(lab.acct)} == {True}, "no daemon, no counters"


# ---- another user -------------------------------------------------------------------------


def as_nobody(work: Callable[[], int], ns: str | None, tmp_path: Path) -> tuple[int, str, str]:
    """`work()` in a child inside namespace `ns` running as uid/gid 65534: (its exit status,
    stdout, stderr). In-process after fork, so it needs no access to the checkout."""
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "w") as o, open(err, "w") as e:
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                sys.stdout, sys.stderr = o, e
                if ns is not None:
                    with open(netns.netns_path(ns)) as f:
                        netns._setns(f.fileno())
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                code = work()
            except BaseException:
                traceback.print_exc()
            finally:
                o.flush()
                e.flush()
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.read_text(), err.read_text()


def test_another_user_sees_its_own_sockets_whole_and_sock_diags_word_on_the_others(
    lab, port, procs, tmp_path, shared_dir
):
    p = [port(), port(), port()]
    rooted = owner(
        lab,
        lab.acct,
        [
            {
                "name": "u",
                "proto": "udp",
                "ip": 4,
                "bind": ["0.0.0.0", p[0]],
                "set": {"SO_RCVBUF": 50000, "SO_REUSEADDR": 1},
            }
        ],
        procs,
    )
    spec = [
        {
            "name": "l",
            "proto": "tcp",
            "ip": 6,
            "bind": ["::", p[1]],
            "listen": True,
            "set": {"SO_REUSEADDR": 1},
        },
        {"name": "u", "proto": "udp", "ip": 4, "bind": ["0.0.0.0", p[2]], "set": {"SO_BROADCAST": 1}},
    ]
    mine = owner(lab, lab.acct, spec, procs, shared=shared_dir)

    code, out, err = as_nobody(lambda: cli.main(["sockets", "--json"]), lab.acct, tmp_path)
    assert code == 0
    assert err.count("\n") == 1 and err.startswith(
        f"nfacct: note: running as uid {NOBODY}, the descriptors of "
    ), err
    found = by_ports([json.loads(line) for line in out.splitlines()])
    for s in mine["sockets"]:
        r = found[("tcp", 6, p[1], 0) if s["name"] == "l" else ("udp", 4, p[2], 0)]
        assert r["pid"] == mine["pid"] and r["uid"] == NOBODY and r["options_error"] is None
        assert {n: r["options"][n] for n in s["got"]} == s["got"]
    theirs = found[("udp", 4, p[0], 0)]
    assert (theirs["pid"], theirs["uid"], theirs["options_error"]) == (None, 0, "owner out of reach")
    assert (theirs["options"]["SO_RCVBUF"], theirs["option_sources"]["SO_RCVBUF"]) == (100_000, "sock_diag")
    assert "SO_REUSEADDR" not in theirs["options"], "only getsockopt knows it"

    # What pidfd_getfd says to it, on a root process's socket.
    def getfd() -> int:
        try:
            sockopts.read(rooted["pid"], rooted["sockets"][0]["fd"], 0, "udp", socket.AF_INET)
        except sockopts.OptionsError as e:
            print(e)
            return 0
        return 1

    assert as_nobody(getfd, None, tmp_path)[:2] == (0, f"{sockopts._REFUSALS[1]}\n")
    # A namespace is for root to enter: one line.
    code, out, err = as_nobody(lambda: cli.main(["sockets", "--netns", lab.acct]), None, tmp_path)
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert err.startswith(
        f"nfacct: error: cannot enter network namespace '{lab.acct}' as uid {NOBODY}: that needs root"
    )


# ---- the pieces, without root -------------------------------------------------------------


def test_a_descriptor_that_now_holds_another_socket_is_not_read():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 40000)
        cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, sockopts.SO_COOKIE, 8), sys.byteorder)
        assert sockopts.read(os.getpid(), s.fileno(), cookie, "udp", socket.AF_INET)["SO_RCVBUF"] == 80000
        with pytest.raises(sockopts.OptionsError, match="descriptor reused by another socket meanwhile"):
            sockopts.read(os.getpid(), s.fileno(), cookie + 1, "udp", socket.AF_INET)
    with pytest.raises(sockopts.OptionsError, match="descriptor closed meanwhile"):
        sockopts.read(os.getpid(), 10_000, cookie, "udp", socket.AF_INET)


def detail(
    proto: int, local: str, lport: int, remote: str = "0.0.0.0", rport: int = 0, v6only=None
) -> SockDetail:
    lo, re_ = ipaddress.ip_address(local).packed, ipaddress.ip_address(remote).packed
    family = socket.AF_INET if len(lo) == 4 else socket.AF_INET6
    state = 10 if proto == 6 and not rport else 1 if rport else 7
    entry = SockEntry(family, state, lo, lport, re_, rport, 0, 1, 0)
    return SockDetail(entry, proto, lo, re_, 0, 0, 0, 0, 0, 0, 0, v6only=v6only)


def flow(proto: int, local: str, lport: int, remote: str, rport: int, *reading: int) -> list:
    return [
        proto,
        ipaddress.ip_address(local).packed.hex(),
        lport,
        ipaddress.ip_address(remote).packed.hex(),
        rport,
        *reading,
    ]


def test_flows_go_to_the_socket_that_receives_them():
    socks = [
        detail(6, "0.0.0.0", 80),  # a listener: its connections are sockets of their own
        detail(6, "10.0.0.1", 80, "10.0.0.2", 5000),
        detail(17, "::", 53, v6only=0),  # dual-stack: takes IPv4 flows too
        detail(17, "10.0.0.1", 53),  # bound to the address: takes its flows before the wildcard
        detail(17, "10.0.0.1", 53, "10.0.0.9", 99),  # connected: its own flow only
        detail(17, "::", 54, v6only=1),
        detail(17, "0.0.0.0", 55),
        detail(17, "0.0.0.0", 55),  # two wildcards on one port (SO_REUSEPORT): cannot tell
    ]
    flows = [
        flow(6, "10.0.0.1", 80, "10.0.0.2", 5000, 1, 10, 2, 20),
        flow(17, "10.0.0.3", 53, "10.0.0.2", 7, 3, 30, 4, 40),
        flow(17, "fd00::1", 53, "fd00::2", 7, 5, 50, 6, 60),
        flow(17, "10.0.0.1", 53, "10.0.0.2", 8, 7, 70, 8, 80),
        flow(17, "10.0.0.1", 53, "10.0.0.9", 99, 9, 90, 10, 100),
        flow(17, "10.0.0.1", 54, "10.0.0.2", 7, 11, 110, 12, 120),  # IPV6_V6ONLY: nobody's
        flow(17, "10.0.0.1", 55, "10.0.0.2", 7, 13, 130, 14, 140),
    ]
    counters, ambiguous = sockview.match_counters(socks, flows)
    got = [(c["flows"], c["out_packets"], c["out_bytes"], c["in_packets"], c["in_bytes"]) for c in counters]
    assert got == [
        (0, 0, 0, 0, 0),
        (1, 1, 10, 2, 20),
        (2, 8, 80, 10, 100),
        (1, 7, 70, 8, 80),
        (1, 9, 90, 10, 100),
        (0, 0, 0, 0, 0),
        (0, 0, 0, 0, 0),
        (0, 0, 0, 0, 0),
    ]
    assert ambiguous == 1


def test_the_daemons_answer_carries_each_flow_and_its_count():
    key = (17, bytes([10, 0, 0, 1]), 53, bytes([10, 0, 0, 2]), 7, None)  # the engine's key: flow, netns
    answer = json.loads(json.dumps(sockview.flows_answer({key: [1, 2, 3, 4]})))
    assert answer == {"flows": [[17, "0a000001", 53, "0a000002", 7, 1, 2, 3, 4]]}


ATTRS = (
    INET_DIAG_INFO,
    INET_DIAG_CONG,
    INET_DIAG_TOS,
    INET_DIAG_SKMEMINFO,
    INET_DIAG_SKV6ONLY,
    INET_DIAG_MARK,
    INET_DIAG_SOCKOPT,
)
GARBAGE = st.lists(
    st.builds(
        lambda nla_len, nla_type, payload: (
            nla_len.to_bytes(2, sys.byteorder) + nla_type.to_bytes(2, sys.byteorder) + payload
        ),
        st.one_of(st.integers(0, 300), st.integers(0, 0xFFFF)),
        st.one_of(st.sampled_from(ATTRS), st.integers(0, 0xFFFF)),
        st.binary(max_size=300),
    ),
    max_size=4,
).map(b"".join)


@PROFILE
@given(st.sampled_from([socket.AF_INET, socket.AF_INET6]), st.binary(min_size=71, max_size=71), GARBAGE)
def test_a_detailed_dump_survives_any_attributes(family: int, fixed: bytes, garbage: bytes) -> None:
    msg = bytes([family]) + fixed + garbage  # 72 bytes of inet_diag_msg, then garbage
    got = decode_detail(msg, 0, len(msg), 6)
    assert got.entry == decode_message(msg, 0, len(msg))
    if got.tcp_info is not None:  # only fields the attribute holds whole
        assert set(got.tcp_info) <= {name for name, *_ in TCP_INFO_FIELDS}


@pytest.mark.parametrize("length", [8, 56, 104, 232, 236, 280])
def test_tcp_info_is_read_as_far_as_the_kernel_sent_it(length: int) -> None:
    payload = bytes(range(256))[:length].ljust(length, b"\0")
    attr = (4 + length).to_bytes(2, sys.byteorder) + INET_DIAG_INFO.to_bytes(2, sys.byteorder) + payload
    msg = bytes([socket.AF_INET]) + bytes(71) + attr
    info = decode_detail(msg, 0, len(msg), 6).tcp_info
    sizes = {"B": 1, "I": 4, "Q": 8}
    assert list(info) == [name for name, off, fmt in TCP_INFO_FIELDS if off + sizes[fmt] <= length]
    for name, off, fmt in TCP_INFO_FIELDS:
        if name in info:
            assert info[name] == int.from_bytes(payload[off : off + sizes[fmt]], sys.byteorder)
