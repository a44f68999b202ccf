"""`make bench`: iperf3 in a throwaway namespace pair, without and with nfacct, side by side.

The iperf3 server runs in the lab's peer namespace, the client in the accounted one. Every test
runs twice in the same lab: with no queue rules, then with nfacct's rules and a running daemon.
nft counter rules in the accounted namespace (present in both runs) give the kernel's own count
of each test's packets, to check what nfacct attributed to the iperf3 client. Prints a table and
writes bench/results.json. The root namespace is never touched: rules, the daemon's sockets and
all traffic live in namespaces created and removed by this run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from nfacct import control
from nfacct.lab import PEER_V4, Counters, Lab, stop_all
from nfacct.rules import Rules

SECONDS = 3
PORT = 5201
UDP_SIZE = 64
RESULTS = Path(__file__).with_name("results.json")


class Test(NamedTuple):
    title: str
    args: tuple[str, ...]  # iperf3 client arguments
    chain: str  # where the kernel counts the test's data packets in the accounted namespace
    match: str
    field: str  # the nfacct per-process counter that must equal the kernel's count


UDP = ("-u", "-l", str(UDP_SIZE), "-b", "0")
TESTS = {
    "tcp": Test("TCP bulk, acct -> peer", (), "out", f"ip daddr {PEER_V4} tcp dport {PORT}", "tcpsnd"),
    "udp_out": Test("UDP 64 B, acct -> peer", UDP, "out", f"ip daddr {PEER_V4} udp dport {PORT}", "udpsnd"),
    "udp_in": Test(
        "UDP 64 B, peer -> acct", (*UDP, "-R"), "in", f"ip saddr {PEER_V4} udp sport {PORT}", "udprcv"
    ),
}


def wait_for(what: str, ready: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


def run_test(lab: Lab, counters: Counters, name: str) -> dict:
    """One bounded iperf3 client in the accounted namespace, summarised, with the kernel's count."""
    test = TESTS[name]
    argv = ["iperf3", "-c", PEER_V4, "-p", str(PORT), "-t", str(SECONDS), "-J", "--connect-timeout", "3000"]
    before = counters.read()[name]
    # `ip netns exec` execs iperf3 itself, so the Popen pid is the client's pid.
    proc = subprocess.Popen(lab.cmd(lab.acct, [*argv, *test.args]), stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=SECONDS + 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.3)  # the last packets of a closing connection
    after = counters.read()[name]
    report = json.loads(out)
    if proc.returncode != 0 or "error" in report:
        raise RuntimeError(f"iperf3 {name} failed: {report.get('error', proc.returncode)}")
    sent, received = report["end"]["sum_sent"], report["end"]["sum_received"]
    res: dict[str, Any] = {"pid": proc.pid, "kernel": [after[0] - before[0], after[1] - before[1]]}
    if name == "tcp":
        res["gbit_s"] = received["bits_per_second"] / 1e9
        res["sent_mb"] = sent["bytes"] / 1e6
        res["retransmits"] = sent.get("retransmits", 0)
    else:
        res["sent_kpackets"] = sent["packets"] / 1e3
        res["received_kpps"] = received["bytes"] / UDP_SIZE / received["seconds"] / 1e3
        res["loss_pct"] = received["lost_percent"]
    return res


def start_daemon(lab: Lab, tmp: str, started: list[subprocess.Popen]) -> tuple[subprocess.Popen, str]:
    ctl = f"{tmp}/c.sock"
    argv = [sys.executable, "-m", "nfacct", "run", "--netns", lab.acct, "--control", ctl]
    usage = subprocess.run([*argv[:4], "--help"], capture_output=True, text=True, timeout=30).stdout
    if "--db" in usage:  # keep the daemon's database in our temporary directory, not /var/lib
        argv += ["--db", f"{tmp}/nfacct.db"]
    with open(f"{tmp}/daemon.log", "w") as log:
        daemon = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    started.append(daemon)

    def pong() -> bool:
        if daemon.poll() is not None:
            raise RuntimeError(f"daemon exited early: {Path(tmp, 'daemon.log').read_text()}")
        try:
            control.request(ctl, "ping", timeout=1)
        except control.ControlError:
            return False
        return True

    wait_for("the nfacct daemon", pong, timeout=15)
    return daemon, ctl


def bench(lab: Lab, tmp: str, started: list[subprocess.Popen]) -> dict:
    server = ["iperf3", "-s", "-B", PEER_V4, "-p", str(PORT)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    started.append(subprocess.Popen(lab.cmd(lab.peer, server), **quiet))
    listening = ["ss", "-Hltn", f"sport = :{PORT}"]
    wait_for("the iperf3 server", lambda: bool(lab.run(lab.peer, listening).stdout.strip()))
    counters = Counters(lab, lab.acct)
    for name, test in TESTS.items():
        counters.add(name, test.chain, test.match)

    res: dict[str, Any] = {"baseline": {name: run_test(lab, counters, name) for name in TESTS}}
    res["backend"] = Rules(lab.acct).install()
    daemon, ctl = start_daemon(lab, tmp, started)
    res["nfacct"] = {name: run_test(lab, counters, name) for name in TESTS}
    status = control.request(ctl, "status")
    tasks = control.request(ctl, "top")["tasks"]
    res["daemon"] = {
        "packets": status["engine"]["packets"],
        **{k: status["queue"].get(k) for k in ("missed", "queue_dropped", "user_dropped")},
        "errors": status["engine"]["errors"],
        "rss_mib": psutil.Process(daemon.pid).memory_info().rss / 2**20,
    }
    res["attribution"] = {}
    for name, run in res["nfacct"].items():
        task = next((t for t in tasks if t["comm"] == "iperf3" and t["pid"] == run["pid"]), None)
        res["attribution"][name] = task
    res["status"] = status
    daemon.terminate()
    res["daemon"]["exit_status"] = daemon.wait(timeout=10)
    res["daemon"]["left_control_socket"] = os.path.exists(ctl)
    return res


def report(res: dict) -> None:
    base, nfa = res["baseline"], res["nfacct"]

    def row(name: str, key: str, unit: str) -> None:
        b, n = base[name][key], nfa[name][key]
        ratio = f"{n / b:8.3f}" if b else "       -"
        print(f"{TESTS[name].title + ', ' + unit:<36}{b:>12,.2f}{n:>12,.2f}{ratio}")

    print(f"\n{f'iperf3, {SECONDS} s per run':<36}{'no rules':>12}{'nfacct':>12}{'ratio':>8}")
    row("tcp", "gbit_s", "Gbit/s")
    row("tcp", "sent_mb", "MB sent")
    row("tcp", "retransmits", "retransmits")
    for name in ("udp_out", "udp_in"):
        row(name, "received_kpps", "kpps received")
        row(name, "sent_kpackets", "kpackets sent")
        row(name, "loss_pct", "loss %")

    print("\nnfacct top for each iperf3 client vs the kernel's nft counter of the same packets:")
    for name, test in TESTS.items():
        k_packets, k_bytes = nfa[name]["kernel"]
        task = res["attribution"][name]
        print(f"  {test.title:<24} kernel {k_packets:>9,} packets {k_bytes:>15,} bytes")
        if task is None:
            print(f"  {'':<24} nfacct: NO TASK for iperf3 pid {nfa[name]['pid']}")
            continue
        packets, size = task[test.field + "packs"], task[test.field + "bytes"]
        verdict = "exact" if (packets, size) == (k_packets, k_bytes) else f"{k_packets - packets:,} uncounted"
        print(f"  {test.field + 'packs/bytes':<24} nfacct {packets:>9,} packets {size:>15,} bytes  {verdict}")

    d = res["daemon"]
    print(f"\ndaemon (queue rules via {res['backend']}): ", end="")
    print(
        ", ".join(f"{k} {d[k]:,}" for k in ("packets", "missed", "queue_dropped", "user_dropped", "errors"))
    )
    print(f"  RSS {d['rss_mib']:.1f} MiB, exit status {d['exit_status']}", end="")
    print(", left its control socket behind" if d["left_control_socket"] else "")
    print(f"\nwritten to {RESULTS}")


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("bench/run.py needs root: it creates network namespaces and queue rules")
    started: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="nfacct-bench-") as tmp, Lab("nfbench") as lab:
        rules = Rules(lab.acct)
        try:
            res = bench(lab, tmp, started)
        finally:
            stop_all(started)
            rules.remove()
    res["host"] = {"kernel": platform.release(), "cpus": os.cpu_count(), "seconds_per_run": SECONDS}
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
