"""`make bench`: iperf3 in a throwaway namespace pair, without and with nfacct, side by side;
then the daemon's memory under 50,000 short TCP flows.

The iperf3 server runs in the lab's peer namespace, the client in the accounted one. Every test
runs twice in the same lab: with no queue rules, then with nfacct's rules and a daemon of its own
(a fresh database each, so that its `unaccounted` table holds that test's gaps alone). nft
counter rules in the accounted namespace (present in both runs) give the kernel's own count of
each test's packets, to check what nfacct attributed to the iperf3 client: attributed +
unidentified + unaccounted against the kernel's count. `unaccounted` (the database's sum, written
when SIGTERM flushes; `status` coverage is kept too) covers every packet queued in the namespace,
not only the test's, so the check is reported, not asserted. Prints a table and writes
bench/results.json. The root namespace is never touched: rules, the daemon's sockets and
all traffic live in namespaces created and removed by this run.

`short_flows` (issue: GC removes the sockinfo of closed connections within its cycle and keeps
memory bounded) runs a fresh daemon with the default GC settings while one client process in
the accounted namespace makes 50,000 short connections to echo servers in the peer namespace
(and one in the peer namespace makes 10,000 the other way). It samples the daemon's RSS and
table sizes every 0.5 s until one GC cycle after the traffic, and checks the clients' counts
against nft counters, with the packets unaccounted meanwhile. `--only iperf3|short_flows` runs
one scenario and keeps the other's results in bench/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from nfacct import control
from nfacct.rules import Rules

# Run as a script (`python bench/run.py`, from any directory): the checkout's `lab`, which is
# not installed with nfacct, is found next to bench/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lab.daemon import Daemon
from lab.hosts import ACCT_V4, PEER_V4, Counters, Lab, stop_all

SECONDS = 3
PORT = 5201
UDP_SIZE = 64
RESULTS = Path(__file__).with_name("results.json")
SCENARIOS = ("iperf3", "short_flows")


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


def start_daemon(lab: Lab, tmp: str, started: list[subprocess.Popen], name: str = "nfacct") -> Daemon:
    """A daemon with its own control socket, database and log in TMP/NAME (not /run, /var/lib),
    added to `started` (the caller's `finally` stops them all)."""
    daemon = Daemon(lab.acct, f"{tmp}/{name}")
    started.append(daemon.proc)
    return daemon


def stop_daemon(d: Daemon) -> dict:
    """SIGTERM (the daemon drains its queue and writes its last checkpoint), then what its
    database recorded as unaccounted."""
    res: dict[str, Any] = {"exit_status": d.stop()}
    res["left_control_socket"] = os.path.exists(d.control)
    with contextlib.closing(sqlite3.connect(d.db)) as db:
        gaps = db.execute("SELECT reason, COUNT(*), SUM(packets) FROM unaccounted GROUP BY reason").fetchall()
    res["unaccounted"] = sum(packets for _, _, packets in gaps)
    res["unaccounted_gaps"] = {reason: {"gaps": n, "packets": packets} for reason, n, packets in gaps}
    return res


def coverage_check(kernel: int, attributed: int, unidentified: int, unaccounted: int | None) -> dict:
    """attributed + unidentified + unaccounted against the kernel's count (residual 0: it holds)."""
    residual = None if unaccounted is None else kernel - attributed - unidentified - unaccounted
    return {
        "kernel": kernel,
        "attributed": attributed,
        "unidentified": unidentified,
        "unaccounted": unaccounted,
        "residual": residual,
    }


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
    rules = Rules(lab.acct)
    res["backend"] = rules.install()
    for key in ("nfacct", "daemon", "attribution", "coverage", "check", "status"):
        res[key] = {}
    for name, test in TESTS.items():  # one daemon, and database, per test
        daemon = start_daemon(lab, tmp, started, name)
        queued_before = rules.queued_packets()
        run = res["nfacct"][name] = run_test(lab, counters, name)
        status = control.request(daemon.control, "status")
        tasks = control.request(daemon.control, "top")["tasks"]
        res["daemon"][name] = {
            "packets": status["engine"]["packets"],
            **{k: status["queue"].get(k) for k in ("missed", "queue_dropped", "user_dropped")},
            "errors": status["engine"]["errors"],
            "rss_mib": psutil.Process(daemon.proc.pid).memory_info().rss / 2**20,
        }
        task = next((t for t in tasks if t["comm"] == "iperf3" and t["pid"] == run["pid"]), None)
        res["attribution"][name] = task
        coverage = status["coverage"]
        if queued_before is not None and coverage.get("queued_by_kernel") is not None:
            coverage["queued_during_test"] = coverage["queued_by_kernel"] - queued_before
        res["status"][name] = status
        res["daemon"][name].update(stop_daemon(daemon))
        coverage["unaccounted_db"] = res["daemon"][name]["unaccounted"]
        res["coverage"][name] = coverage
        res["check"][name] = coverage_check(
            run["kernel"][0],
            0 if task is None else task[test.field + "packs"],
            status["engine"]["unidentified"][test.field + "packs"],
            coverage["unaccounted_db"],
        )
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

    print("\nattributed + unidentified + unaccounted == kernel (packets; unaccounted: the database's")
    print("sum after SIGTERM, `status` coverage just before in brackets; it counts every packet queued")
    print("in the namespace, the test's or not, so a negative residual is other traffic):")
    heads = ("kernel", 10), ("attributed", 12), ("unident.", 10), ("unaccounted", 12), ("(status)", 10)
    print(f"  {'':<24}" + "".join(f"{h:>{w}}" for h, w in (*heads, ("residual", 10))))
    for name, test in TESTS.items():
        c, cov = res["check"][name], res["coverage"][name]
        unacc = "-" if c["unaccounted"] is None else f"{c['unaccounted']:,}"
        snap = cov.get("unaccounted")
        snap = "-" if snap is None else f"({snap:,})"
        resid = "-" if c["residual"] is None else f"{c['residual']:,}"
        print(
            f"  {test.title:<24}{c['kernel']:>10,}{c['attributed']:>12,}{c['unidentified']:>10,}"
            f"{unacc:>12}{snap:>10}{resid:>10}"
        )

    print(f"\none daemon per test (queue rules via {res['backend']}):")
    for name, test in TESTS.items():
        d, cov = res["daemon"][name], res["coverage"][name]
        counts = ", ".join(
            f"{k} {d[k]:,}" for k in ("packets", "missed", "queue_dropped", "user_dropped", "errors")
        )
        queued = cov.get("queued_during_test")
        print(f"  {test.title:<24}{counts}" + ("" if queued is None else f", queued by kernel {queued:,}"))
        print(f"  {'':<24}RSS {d['rss_mib']:.1f} MiB, exit status {d['exit_status']}", end="")
        print(", left its control socket behind" if d["left_control_socket"] else "")


# ---- short_flows: memory under 50,000 short TCP flows ----------------------------------------

FLOWS_OUT = 50_000  # acct -> peer, by one client process: the figure
FLOWS_IN = 10_000  # peer -> acct at the same time: an echo server in the accounted namespace
FLOWS_BASELINE = 10_000  # acct -> peer without nfacct, for the flow rate
FLOWS_SECONDS = 120  # each client stops by then, however far it got (the baseline: 30 s)
FLOW_SIZE = 32  # bytes sent and echoed per connection
# acct -> peer goes to 8 echo servers in turn: with one, connect() itself slows down as TIME_WAIT
# entries pile up (see the `flows` role); 6,250 per server stay within the default port range.
OUT_PORT, OUT_SERVERS, IN_PORT = 7001, 8, 7100
SAMPLE = 0.5
ENGINE_KEYS = (
    "packets", "sockinfo", "sockinfo_closed", "taskinfo", "taskinfo_exited", "sockinfo_overflow",
    "taskinfo_overflow", "gc_runs", "gc_removed_sockinfo", "gc_removed_taskinfo", "errors",
)  # fmt: skip


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (the peak resident size so far) of a process, in MiB."""
    mem = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                mem[key] = int(value.split()[0]) / 1024
    return {"rss_mib": mem["VmRSS"], "hwm_mib": mem["VmHWM"]}


def snapshot(daemon: subprocess.Popen, ctl: str, t0: float) -> dict:
    """The daemon's memory and table sizes now (`nfacct status --json`, abridged)."""
    mem = memory_mib(daemon.pid)
    status = control.request(ctl, "status", timeout=10)
    engine, queue, resolver = status["engine"], status["queue"], status["resolver"]
    return {
        "t": round(time.monotonic() - t0, 2),
        **mem,
        **{k: engine[k] for k in ENGINE_KEYS},
        "by_state": engine["sockinfo_by_state"],
        "unidentified_tcp_packets": engine["unidentified"]["tcpsndpacks"]
        + engine["unidentified"]["tcprcvpacks"],
        "missed": queue.get("missed"),
        "resolver_in_flight": resolver["in_flight"],
        "resolver_gave_up": resolver["gave_up"],
        "socket_index": resolver["socket_index"],  # inode -> process entries learned from /proc
        "destroy_overruns": status["events"]["destroy_overruns"],
        "queued_by_kernel": status["coverage"].get("queued_by_kernel"),
        "unaccounted": status["coverage"].get("unaccounted"),  # a snapshot, settled at checkpoints
    }


def read_report(proc: subprocess.Popen, timeout: float) -> dict:
    """The JSON line a traffic role prints (its readiness or its final report)."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"traffic role {proc.args[-6:]} gave no report within {timeout:.0f} s")
    return json.loads(line)


def flows_role(
    lab: Lab, ns: str, to: str, port: int, ports: int, count: int, procs: list, seconds: float = FLOWS_SECONDS
) -> subprocess.Popen:
    argv = ["flows", "--connect", to, "--port", str(port), "--ports", str(ports), "--count", str(count)]
    argv += ["--size", str(FLOW_SIZE), "--seconds", str(seconds), "--hold"]
    proc = lab.role(ns, *argv)
    procs.append(proc)
    return proc


def flow_rate(report: dict) -> float:
    return report["flows"] / report["seconds"] if report["seconds"] else 0.0


def short_flows(lab: Lab, tmp: str, started: list[subprocess.Popen]) -> dict:
    os.makedirs(tmp, exist_ok=True)
    counters = Counters(lab, lab.acct)
    out = f"{OUT_PORT}-{OUT_PORT + OUT_SERVERS - 1}"
    # The kernel's count of each direction's packets, as seen by the accounted namespace.
    counters.add("flows_out_snd", "out", f"ip daddr {PEER_V4} tcp dport {out}")
    counters.add("flows_out_rcv", "in", f"ip saddr {PEER_V4} tcp sport {out}")
    counters.add("flows_in_snd", "out", f"ip daddr {PEER_V4} tcp sport {IN_PORT}")
    counters.add("flows_in_rcv", "in", f"ip saddr {PEER_V4} tcp dport {IN_PORT}")
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "loadavg_before": os.getloadavg(),
        "flows_requested": {"out": FLOWS_OUT, "in": FLOWS_IN},
        "flow_bytes": FLOW_SIZE,
        "time_limit_s": FLOWS_SECONDS,
    }
    procs = started  # the caller's `finally` stops them all
    servers = [
        lab.role(lab.peer, "echo-server", "--bind", PEER_V4, "--port", str(OUT_PORT + i))
        for i in range(OUT_SERVERS)
    ]
    acct_server = lab.role(lab.acct, "echo-server", "--bind", ACCT_V4, "--port", str(IN_PORT))
    servers.append(acct_server)
    procs.extend(servers)
    for server in servers:
        read_report(server, 10)

    # Baseline: the same client, no queue rules, no daemon.
    rules = Rules(lab.acct)
    rules.remove()
    base = flows_role(lab, lab.acct, PEER_V4, OUT_PORT, OUT_SERVERS, FLOWS_BASELINE, procs, 30)
    res["baseline"] = read_report(base, 40)
    res["baseline"]["flows_per_s"] = flow_rate(res["baseline"])
    stop_all([base])

    res["backend"] = rules.install()
    dmn = start_daemon(lab, tmp, procs)
    daemon, ctl = dmn.proc, dmn.control
    t0 = time.monotonic()
    timeline: list[dict] = []

    def sample_until(done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            timeline.append(snapshot(daemon, ctl, t0))
            if done():
                return True
            time.sleep(SAMPLE)
        return False

    time.sleep(1.0)  # settle: imports done, tables empty
    points = {"before": snapshot(daemon, ctl, t0)}
    before_kernel = counters.read()
    clients = {
        "out": flows_role(lab, lab.acct, PEER_V4, OUT_PORT, OUT_SERVERS, FLOWS_OUT, procs),
        "in": flows_role(lab, lab.peer, ACCT_V4, IN_PORT, 1, FLOWS_IN, procs),
    }
    reports: dict[str, dict] = {}

    def clients_done() -> bool:
        for name, proc in clients.items():
            if name not in reports and select.select([proc.stdout], [], [], 0)[0]:
                reports[name] = read_report(proc, 1)
        return len(reports) == len(clients)

    if not sample_until(clients_done, FLOWS_SECONDS + 15):
        raise RuntimeError(f"flow clients still running after {FLOWS_SECONDS + 15} s")
    t_end = time.monotonic()
    points["end_of_traffic"] = timeline[-1]
    res["clients"] = reports
    res["traffic_s"] = max(r["seconds"] for r in reports.values())  # the clients start together
    res["flows_per_s"] = {name: flow_rate(r) for name, r in reports.items()}
    res["flows_per_s"]["both"] = sum(r["flows"] for r in reports.values()) / res["traffic_s"]

    # Exactness: each side's counters (`nfacct top --json`) against the kernel's, while the
    # clients still run, once the last lookups are settled (retries take up to ~4 s).
    sample_until(lambda: timeline[-1]["resolver_in_flight"] == 0, 10)
    time.sleep(0.5)  # the last ACKs and FINs
    after_kernel = counters.read()
    tasks = control.request(ctl, "top", timeout=10)["tasks"]
    settled = snapshot(daemon, ctl, t0)
    check: dict[str, Any] = {}
    # `ip netns exec` execs python itself, so the echo server's pid is the Popen's (as for iperf3).
    for name, proc_pid in (("out", reports["out"]["pid"]), ("in", acct_server.pid)):
        task = next((t for t in tasks if t["pid"] == proc_pid and t["exit_time"] is None), None)
        kernel = {
            d: after_kernel[f"flows_{name}_{d}"][0] - before_kernel[f"flows_{name}_{d}"][0]
            for d in ("snd", "rcv")
        }
        check[name] = {
            "pid": proc_pid,
            "kernel_packets": kernel,
            "nfacct_packets": None if task is None else {d: task[f"tcp{d}packs"] for d in ("snd", "rcv")},
        }
    # Every packet of these flows is some process's, `unidentified` or unaccounted (passed the
    # queue unseen); the rest is counted nowhere. Unaccounted over the same window, from
    # `status` (traffic has paused, so its snapshot is exact); the database's total below.
    kernel_total = sum(sum(c["kernel_packets"].values()) for c in check.values())
    attributed = sum(sum((c["nfacct_packets"] or {}).values()) for c in check.values())
    unidentified = settled["unidentified_tcp_packets"] - points["before"]["unidentified_tcp_packets"]
    window = (settled["unaccounted"], points["before"]["unaccounted"])
    unaccounted = None if None in window else window[0] - window[1]
    check["total"] = {
        "kernel_packets": kernel_total,
        "attributed": attributed,
        "unidentified": unidentified,
        "unaccounted": unaccounted,
        "counted_nowhere": kernel_total - attributed - unidentified - (unaccounted or 0),
        "resolver_gave_up": settled["resolver_gave_up"],
        "settled_after_s": round(time.monotonic() - t_end, 2),
    }
    check["coverage"] = coverage_check(kernel_total, attributed, unidentified, unaccounted)
    res["attribution"] = check

    # Let the clients exit, then wait for the first GC cycle that starts once every closed flow
    # has been idle for --closed-idle.
    stop_all(list(clients.values()))
    gc = control.request(ctl, "status")["gc"]
    time.sleep(max(0.0, t_end + gc["closed_idle"] + 0.5 - time.monotonic()))
    runs = snapshot(daemon, ctl, t0)["gc_runs"]
    sample_until(lambda: timeline[-1]["gc_runs"] > runs, gc["cycle"] + 5)
    points["after_gc"] = timeline[-1]
    points["after_gc"]["seconds_after_traffic"] = round(time.monotonic() - t_end, 2)
    peak = max(timeline, key=lambda s: s["rss_mib"])
    res["peak"] = {
        "rss_mib": peak["rss_mib"],
        "hwm_mib": max(s["hwm_mib"] for s in timeline),  # VmHWM can read lower later on
        "sockinfo": max(s["sockinfo"] for s in timeline),
        "taskinfo": max(s["taskinfo"] for s in timeline),
        "at_s": peak["t"],
    }
    res["points"] = points
    res["gc"] = gc
    res["timeline"] = timeline
    res["coverage"] = control.request(ctl, "status", timeout=10)["coverage"]  # just before SIGTERM
    stopped = stop_daemon(dmn)
    res["daemon_exit_status"] = stopped.pop("exit_status")
    res["daemon"] = stopped  # the database's unaccounted total: the daemon's whole run
    return res


def report_short_flows(r: dict) -> None:
    rc = r["clients"]
    print(f"\nshort flows ({r['flow_bytes']} B echoed per connection), GC defaults", end="")
    print(f" (cycle {r['gc']['cycle']:g} s, closed-idle {r['gc']['closed_idle']:g} s), {r['date']}")
    print(
        f"  baseline, no nfacct:  {r['baseline']['flows']:>7,} flows  {r['baseline']['flows_per_s']:>7,.0f}/s"
    )
    for name, title in (("out", "acct -> peer client"), ("in", "peer -> acct client")):
        c = rc[name]
        errors = f"  failed {c['failed']:,} {c['errors']}" if c["failed"] else ""
        print(f"  {title + ':':<22}{c['flows']:>7,} flows  {r['flows_per_s'][name]:>7,.0f}/s{errors}")
    print(f"  both directions:      {r['traffic_s']:.1f} s, {r['flows_per_s']['both']:,.0f} flows/s")

    print(f"\n{'daemon':<34}{'RSS MiB':>9}{'sockinfo':>10}{'closed':>8}{'taskinfo':>10}{'gc runs':>9}")
    pts = r["points"]
    rows = [
        ("before traffic", pts["before"]),
        (f"peak ({len(r['timeline'])} samples, 0.5 s apart)", None),
        ("end of traffic", pts["end_of_traffic"]),
        (f"after GC ({pts['after_gc']['seconds_after_traffic']:.1f} s later)", pts["after_gc"]),
    ]
    for title, p in rows:
        if p is None:
            pk = r["peak"]
            print(f"  {title:<32}{pk['rss_mib']:>9.1f}{pk['sockinfo']:>10,}{'':>8}{pk['taskinfo']:>10,}")
            continue
        print(
            f"  {title:<32}{p['rss_mib']:>9.1f}{p['sockinfo']:>10,}{p['sockinfo_closed']:>8,}"
            f"{p['taskinfo']:>10,}{p['gc_runs']:>9}"
        )
    a = pts["after_gc"]
    held = ", ".join(f"{k} {v:,}" for k, v in a["by_state"].items() if v) or "none"
    print(f"  peak RSS (VmHWM) {r['peak']['hwm_mib']:.1f} MiB; sockinfo held after GC: {held}")
    print(
        f"  GC removed {a['gc_removed_sockinfo']:,} sockinfo, {a['gc_removed_taskinfo']:,} taskinfo", end=""
    )
    print(f"; overflow: sockinfo {a['sockinfo_overflow']:,}, taskinfo {a['taskinfo_overflow']:,}")
    print(
        f"  queue missed {a['missed']}, errors {a['errors']}, resolver gave up {a['resolver_gave_up']:,}",
        end="",
    )
    print(f", unidentified tcp packets {a['unidentified_tcp_packets']:,}", end="")
    print(f", destroy overruns {a['destroy_overruns']}")

    print("\nnfacct top for each side's process vs the kernel's nft counters (tcp packets):")
    for name, title in (("out", "acct client (out)"), ("in", "acct echo server (in)")):
        c = r["attribution"][name]
        k = c["kernel_packets"]
        n = c["nfacct_packets"]
        print(f"  {title:<24} kernel snd {k['snd']:>9,} rcv {k['rcv']:>9,}", end="")
        if n is None:
            print(f"   nfacct: NO TASK for pid {c['pid']}")
            continue
        verdict = "exact" if n == k else f"{k['snd'] + k['rcv'] - n['snd'] - n['rcv']:,} not attributed"
        print(f"\n  {'':<24} nfacct snd {n['snd']:>9,} rcv {n['rcv']:>9,}   {verdict}")
    t = r["attribution"]["total"]
    unacc = "-" if t["unaccounted"] is None else f"{t['unaccounted']:,}"
    print(
        f"  all {t['kernel_packets']:,} packets: {t['attributed']:,} attributed, {t['unidentified']:,} "
        f"unidentified ({t['resolver_gave_up']:,} flows given up), {unacc} unaccounted, "
        f"{t['counted_nowhere']:,} counted nowhere"
    )
    c = r["attribution"]["coverage"]
    holds = "holds" if c["residual"] == 0 else f"residual {c['residual']}"
    print(f"  attributed + unidentified + unaccounted == kernel: {holds}")
    dd, cov = r["daemon"], r["coverage"]
    snap, queued = (cov.get(k) for k in ("unaccounted", "queued_by_kernel"))
    print(
        f"  unaccounted over the daemon's run: {dd['unaccounted']:,} in the database after SIGTERM "
        f"({'-' if snap is None else f'{snap:,}'} in `status` just before; queued by kernel "
        f"{'-' if queued is None else f'{queued:,}'}); daemon exit status {r['daemon_exit_status']}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/run.py", description="iperf3 and short-flow benchmarks")
    p.add_argument("--only", choices=SCENARIOS, help="run one scenario (default: all)")
    args = p.parse_args(argv)
    chosen = [args.only] if args.only else list(SCENARIOS)
    if os.geteuid() != 0:
        sys.exit("bench/run.py needs root: it creates network namespaces and queue rules")
    res: dict[str, Any] = {}
    if args.only and RESULTS.exists():  # keep the other scenario's latest results
        try:
            res = json.loads(RESULTS.read_text())
        except ValueError:
            res = {}
    started: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="nfacct-bench-") as tmp, Lab("nfbench") as lab:
        rules = Rules(lab.acct)
        try:
            if "iperf3" in chosen:
                res.update(bench(lab, tmp, started))
            if "short_flows" in chosen:
                res["short_flows"] = short_flows(lab, f"{tmp}/short_flows", started)
        finally:
            stop_all(started)
            rules.remove()
    res["host"] = {"kernel": platform.release(), "cpus": os.cpu_count(), "seconds_per_run": SECONDS}
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    if "iperf3" in chosen:
        report(res)
    if "short_flows" in chosen:
        report_short_flows(res["short_flows"])
    print(f"\nwritten to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
