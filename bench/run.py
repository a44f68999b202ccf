"""`make bench`: iperf3 throughput in a throwaway namespace pair, without and with nfacct.

The iperf3 server runs in the lab's peer namespace, the client in the accounted one. Each test
runs twice in the same lab: with no queue rules, then with nfacct's rules and a running daemon.
Prints a table and writes bench/results.json. The root namespace is never touched: rules,
daemon sockets and traffic all live in namespaces created and removed by this run.
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
from typing import Any

import psutil

from nfacct import control
from nfacct.lab import PEER_V4, Counters, Lab
from nfacct.rules import Rules

SECONDS = 3
PORT = 5201
RESULTS = Path(__file__).with_name("results.json")


def wait_for(what: str, ready: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


def iperf3(lab: Lab, *args: str) -> tuple[int, dict]:
    """Run one bounded iperf3 client in the accounted namespace; (its pid, its -J report)."""
    argv = ["iperf3", "-c", PEER_V4, "-p", str(PORT), "-t", str(SECONDS), "-J", "--connect-timeout", "3000"]
    # `ip netns exec` execs iperf3 itself, so the Popen pid is the client's pid.
    proc = subprocess.Popen(lab.cmd(lab.acct, [*argv, *args]), stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=SECONDS + 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    report = json.loads(out)
    if proc.returncode != 0 or "error" in report:
        raise RuntimeError(f"iperf3 {' '.join(args)} failed: {report.get('error', proc.returncode)}")
    return proc.pid, report


def tcp_test(lab: Lab) -> dict:
    pid, r = iperf3(lab)
    end = r["end"]
    return {
        "pid": pid,
        "sent_bytes": end["sum_sent"]["bytes"],
        "gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
        "retransmits": end["sum_sent"].get("retransmits", 0),
    }


def udp_test(lab: Lab) -> dict:
    pid, r = iperf3(lab, "-u", "-l", "64", "-b", "0")
    s = r["end"]["sum"]  # the server's figures, as reported back to the client
    received = s["packets"] - s["lost_packets"]
    return {
        "pid": pid,
        "sent_packets": s["packets"],
        "received_packets": received,
        "kpps": received / s["seconds"] / 1e3,
        "loss_pct": s["lost_percent"],
    }


def measured(counters: Counters, test: Callable[[Lab], dict]) -> dict:
    """Run `test` and add what the kernel's own nft counters saw the client send meanwhile."""
    before = counters.read()
    res = test(counters.lab)
    time.sleep(0.3)  # the last ACKs of a closing connection
    after = counters.read()
    res["kernel"] = {k: [a - b for a, b in zip(after[k], before[k], strict=True)] for k in after}
    return res


def start_daemon(lab: Lab, tmp: str, started: list[subprocess.Popen]) -> tuple[subprocess.Popen, str]:
    ctl = f"{tmp}/c.sock"
    argv = [sys.executable, "-m", "nfacct", "run", "--netns", lab.acct, "--control", ctl]
    usage = subprocess.run([*argv[:4], "--help"], capture_output=True, text=True, timeout=30).stdout
    if "--db" in usage:  # keep the daemon's database in our temporary directory, not /var/lib
        argv += ["--db", f"{tmp}/nfacct.db"]
    with open(f"{tmp}/daemon.log", "w") as log:
        daemon = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
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


def task_of(tasks: list[dict], pid: int) -> dict:
    """The daemon's record of the iperf3 client with this pid (empty if it has none)."""
    return next((t for t in tasks if t["comm"] == "iperf3" and t["pid"] == pid), {})


def bench(lab: Lab, tmp: str, started: list[subprocess.Popen]) -> dict:
    server = subprocess.Popen(
        lab.cmd(lab.peer, ["iperf3", "-s", "-B", PEER_V4, "-p", str(PORT)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started.append(server)
    listening = ["ss", "-Hltn", f"sport = :{PORT}"]
    wait_for("the iperf3 server", lambda: bool(lab.run(lab.peer, listening).stdout.strip()))

    # The kernel's own count of what the client sends, in both setups, to check attribution.
    counters = Counters(lab, lab.acct)
    for proto in ("tcp", "udp"):
        counters.add(proto, "out", f"ip daddr {PEER_V4} {proto} dport {PORT}")
    res: dict[str, Any] = {
        "baseline": {"tcp": measured(counters, tcp_test), "udp": measured(counters, udp_test)}
    }
    res["backend"] = Rules(lab.acct).install()
    daemon, ctl = start_daemon(lab, tmp, started)
    res["nfacct"] = {"tcp": measured(counters, tcp_test), "udp": measured(counters, udp_test)}
    status = control.request(ctl, "status")
    tasks = control.request(ctl, "top")["tasks"]
    q = status["queue"]
    res["daemon"] = {
        "packets": status["engine"]["packets"],
        "missed": q.get("missed"),
        "queue_dropped": q.get("queue_dropped"),
        "user_dropped": q.get("user_dropped"),
        "errors": status["engine"]["errors"],
        "unidentified": status["engine"]["unidentified"],
        "rss_mib": psutil.Process(daemon.pid).memory_info().rss / 2**20,
    }
    res["attribution"] = {
        "tcp": task_of(tasks, res["nfacct"]["tcp"]["pid"]),
        "udp": task_of(tasks, res["nfacct"]["udp"]["pid"]),
    }
    res["status"] = status
    daemon.terminate()
    res["daemon"]["exit_status"] = daemon.wait(timeout=10)
    res["daemon"]["left_control_socket"] = os.path.exists(ctl)
    return res


def report(res: dict) -> None:
    base, nfa, at = res["baseline"], res["nfacct"], res["attribution"]

    def row(name: str, b: float, n: float) -> None:
        ratio = f"{n / b:8.3f}" if b else "       -"
        print(f"{name:<28}{b:>14,.2f}{n:>14,.2f}{ratio}")

    print(f"\n{'iperf3, ' + str(SECONDS) + ' s each':<28}{'no rules':>14}{'nfacct':>14}{'ratio':>8}")
    row("TCP Gbit/s", base["tcp"]["gbit_s"], nfa["tcp"]["gbit_s"])
    row("TCP MB sent", base["tcp"]["sent_bytes"] / 1e6, nfa["tcp"]["sent_bytes"] / 1e6)
    if at["tcp"]:
        print(f"{'  nfacct tcpsndbytes, MB':<28}{'':>14}{at['tcp']['tcpsndbytes'] / 1e6:>14,.2f}")
    row("TCP retransmits", base["tcp"]["retransmits"], nfa["tcp"]["retransmits"])
    row("UDP 64 B kpps received", base["udp"]["kpps"], nfa["udp"]["kpps"])
    row("UDP kpackets sent", base["udp"]["sent_packets"] / 1e3, nfa["udp"]["sent_packets"] / 1e3)
    row("UDP loss %", base["udp"]["loss_pct"], nfa["udp"]["loss_pct"])

    print("\nattribution of the iperf3 clients' output (nfacct top vs the kernel's nft counters):")
    for test, field, kind in (("tcp", "tcpsnd", "tcp"), ("udp", "udpsnd", "udp")):
        packets, size = nfa[test]["kernel"][kind]
        task = at[test]
        if not task:
            print(f"  {test} client pid {nfa[test]['pid']}: NOT ATTRIBUTED (no iperf3 task in nfacct top)")
            continue
        got = task[field + "packs"], task[field + "bytes"]
        verdict = "exact" if got == (packets, size) else "MISMATCH"
        print(
            f"  {test} client pid {task['pid']}: {field}bytes {got[1]:,} ({got[0]:,} packets), "
            f"kernel {size:,} ({packets:,} packets): {verdict}"
        )

    d = res["daemon"]
    print(f"\ndaemon (queue rules via {res['backend']}):")
    for k in ("packets", "missed", "queue_dropped", "user_dropped", "errors"):
        print(f"  {k:<14}{d[k]:>14,}")
    print(f"  {'rss':<14}{d['rss_mib']:>10,.1f} MiB")
    print(
        f"  {'exit status':<14}{d['exit_status']:>14}"
        + ("  (left its control socket)" * d["left_control_socket"])
    )
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
            for p in reversed(started):
                if p.poll() is None:
                    p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            rules.remove()
    res["host"] = {"kernel": platform.release(), "cpus": os.cpu_count(), "seconds_per_test": SECONDS}
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
