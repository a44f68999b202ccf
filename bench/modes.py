"""`make bench`, issue 9: the kernel without rules, the C consumer (the NFQUEUE mechanism's limit),
`nfacct run --mode queue` and `--mode offload`, side by side in one run.

Workloads, each run in the four configurations in turn, `--runs` times (A B C D A B C D), in one
throwaway namespace pair (traffic from the accounted namespace `acct` to servers in `peer`):
- TCP bulk: iperf3, `--seconds` each;
- 64-byte UDP floods from one connected socket and from 1,000 (bench/loadgen.c `udp`), to a sink
  that never reads (the kernel drops what its buffer cannot take: no ICMP, no reader to wait for);
- new TCP connections per second, each from a process of its own (loadgen `connections`: fork,
  connect, 32 bytes echoed by a C epoll server, exit; 8 at once);
- connect to first echoed byte (loadgen `latency`): 200 connections from one long-lived process,
  then 40 new processes (fork + exec) of one connection each.
Then, once per daemon mode, 100,000 concurrent UDP flows (loadgen `hold` in 6 processes: 100,000
sockets, one datagram each at 3,000 new flows/s, kept open): the daemon's RSS, its tables, the
flow sets' elements, then the time until everything is gone once the sockets close. And the
kernel memory of one set element, measured (`element_cost`).

Every configuration starts from a clean slate: nfacct's rules removed and (except for the kernel
column) installed again, then the C consumer (`ip netns exec acct nfq_consumer 0`) or a fresh
daemon with its own database. The kernel's own counts come from nft counter rules in `acct`
(lab.hosts.Counters, in every column, so every column pays for them); nfacct's from its control
`top`, after a short settle, for exactly the processes the load generator reports. The daemon's
CPU seconds (psutil: itself, its guard and the commands it waited for) are read before the load
and after the settle. Results go to bench/modes.json; the tables (bench/summary.py) to stdout.

    .venv/bin/python bench/modes.py [--runs 2] [--seconds 3] [--only WORKLOAD ...] [--flows 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's lab and bench

from bench import summary
from bench.run import memory_mib
from lab.daemon import Daemon
from lab.hosts import ACCT_V4, PEER_V4, Counters, Lab, stop_all
from nfacct import control, text
from nfacct.flowsets import FlowSets, elements
from nfacct.rules import Rules
from nfacct.tables import COUNTER_NAMES

RESULTS = Path(__file__).with_name("modes.json")
HERE = Path(__file__).resolve().parent
IPERF_PORT, SINK_PORT, ECHO_PORT = 5201, 9000, 7000
UDP_SIZE = 64
ECHO_SIZE = 32
CONCURRENCY = 8  # connection children alive at once: enough to keep both cores busy
LATENCY_LONG, LATENCY_FRESH = 200, 40
# New flows per second of the 100,000: the queue-mode daemon attributed every one of 30,000 at
# 2,000/s and 3,000/s, lost 1,367 at 5,000/s and 16,296 at 10,000/s (2026-11-25).
FLOW_RATE = 3_000
SECOND_V4 = "10.77.0.3"  # a second local address: 100,000 UDP sockets need more than 64k ports
# Sockets per holder process: the hard RLIMIT_NOFILE here is 20,000 and raising it needs
# CAP_SYS_RESOURCE, so 100,000 sockets take 6 processes, 3 per local address (ports 10,000-64,000).
PER_HOLDER = 18_000
SETTLE = 1.5  # after the load: the last packets, exits seen, exited tasks' last counts
ELEMENT_FLOWS = 100_000  # synthetic flows (two elements each) for the per-element memory cost
SETS = ("out4", "in4", "out6", "in6")


def build(directory: Path) -> Path:
    """Compile bench/*.c into `directory` (gcc; libnetfilter-queue-dev for the consumer)."""
    for name, libs in (("loadgen", []), ("nfq_consumer", ["-lnetfilter_queue", "-lnfnetlink"])):
        argv = ["gcc", "-O2", "-Wall", "-o", str(directory / name), str(HERE / f"{name}.c"), *libs]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"compiling bench/{name}.c failed:\n{done.stderr}")
    return directory


class Env(NamedTuple):
    lab: Lab
    rules: Rules
    counters: Counters
    tools: Path

    def loadgen(self, *args: object) -> dict:
        """Run bench/loadgen.c in the accounted namespace to its end; the JSON line it prints."""
        argv = [str(self.tools / "loadgen"), *map(str, args)]
        return json.loads(self.lab.run(self.lab.acct, argv).stdout)


def read_line(proc: subprocess.Popen, timeout: float) -> dict:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"{proc.args[3:5]} said nothing within {timeout:.0f} s")
    return json.loads(line)


def cpu_seconds(pid: int) -> float:
    """User + system seconds of a process, its live descendants and the children it waited for."""
    proc = psutil.Process(pid)
    t = proc.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in proc.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:
            pass  # gone since the listing: its time is in children_* now
    return total


class Setup:
    """One configuration for one run: the rules, and the C consumer or a daemon; `close()` undoes it."""

    def __init__(self, env: Env, config: str, directory: Path, *extra: str):
        self.env, self.config = env, config
        self.daemon: Daemon | None = None
        self.consumer: subprocess.Popen | None = None
        env.rules.remove()  # counters from zero, flow sets empty
        try:
            if config != "kernel":
                env.rules.install()
            if config == "consumer":
                argv = [str(env.tools / "nfq_consumer"), "0"]
                self.consumer = subprocess.Popen(
                    env.lab.cmd(env.lab.acct, argv), stdout=subprocess.PIPE, text=True
                )
                read_line(self.consumer, 10)
            elif config in summary.DAEMONS:
                self.daemon = Daemon(env.lab.acct, directory, "--mode", config, *extra)
        except BaseException:
            self.close()
            raise

    def pid(self) -> int | None:
        proc = self.consumer or (self.daemon and self.daemon.proc)
        return None if proc is None else proc.pid

    def cpu(self) -> float:
        pid = self.pid()
        return 0.0 if pid is None else cpu_seconds(pid)

    def request(self, cmd: str) -> dict:
        return control.request(self.daemon.control, cmd, timeout=30)

    def settled_status(self, within: float = 10.0) -> dict:
        """`status` once no owner lookup is in flight (retries take up to ~4 s)."""
        deadline = time.monotonic() + within
        while True:
            status = self.request("status")
            if status["resolver"]["in_flight"] == 0 or time.monotonic() > deadline:
                return status
            time.sleep(0.1)

    def close(self) -> dict:
        """Stop the consumer or the daemon, remove the rules; what the consumer saw."""
        end: dict[str, Any] = {}
        if self.consumer is not None and self.consumer.poll() is None:
            queued = self.env.rules.queued_packets()
            self.consumer.terminate()
            out, _ = self.consumer.communicate(timeout=10)
            seen = json.loads(out.splitlines()[-1])["packets"]
            end = {"queued": queued, "seen": seen, "unseen": queued - seen}
        if self.daemon is not None:
            end["exit_status"] = self.daemon.stop()
            if end["exit_status"] != 0:  # its log goes with the temporary directory: keep its end
                end["log_tail"] = text.escape(text.decode(self.daemon.log.read_bytes()[-2000:]))
        self.env.rules.remove()
        return end


# ---- workloads: each runs its load and returns (figures, the pids whose traffic it was) --------


def tcp_bulk(env: Env, seconds: float) -> tuple[dict, set[int]]:
    argv = ["iperf3", "-c", PEER_V4, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    argv += ["--connect-timeout", "3000"]
    # `ip netns exec` execs iperf3 itself, so the Popen pid is the client's pid.
    proc = subprocess.Popen(env.lab.cmd(env.lab.acct, argv), stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=seconds + 20)
    report = json.loads(out)
    if proc.returncode != 0 or "error" in report:
        raise RuntimeError(f"iperf3 failed: {report.get('error', proc.returncode)}")
    end = report["end"]
    figures = {
        "gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
        "retransmits": end["sum_sent"].get("retransmits", 0),
    }
    return figures, {proc.pid}


def udp_flood(sockets: int) -> Callable[[Env, float], tuple[dict, set[int]]]:
    def run(env: Env, seconds: float) -> tuple[dict, set[int]]:
        out = env.loadgen("udp", PEER_V4, SINK_PORT, sockets, seconds, UDP_SIZE)
        figures = {"kpps": out["sent"] / out["seconds"] / 1e3, "sent": out["sent"], "failed": out["failed"]}
        return figures, {out["pid"]}

    return run


def connections(env: Env, seconds: float, dry: bool = False) -> tuple[dict, set[int]]:
    args = ["connections", PEER_V4, ECHO_PORT, seconds, CONCURRENCY, ECHO_SIZE, *(["dry"] if dry else [])]
    out = env.loadgen(*args)
    figures = {
        "per_s": out["connections"] / out["seconds"],
        "connections": out["connections"],
        "failed": out["failed"],
    }
    return figures, set(out["children"])


def latency(env: Env, _seconds: float) -> tuple[dict, set[int]]:
    out = env.loadgen("latency", PEER_V4, ECHO_PORT, LATENCY_LONG, LATENCY_FRESH)
    figures: dict[str, Any] = {k: [ms for ms in out[k] if ms >= 0] for k in summary.KINDS}
    figures["failed"] = sum(ms < 0 for k in summary.KINDS for ms in out[k])
    return figures, {out["pid"], *out["children"]}


class Workload(NamedTuple):
    run: Callable[[Env, float], tuple[dict, set[int]]]
    proto: str
    out: str  # the kernel counter of its packets leaving acct
    inn: str | None  # and arriving (None: it receives nothing)


WORKLOADS = {
    "tcp": Workload(tcp_bulk, "tcp", "iperf-out", "iperf-in"),
    "udp1": Workload(udp_flood(1), "udp", "sink-out", None),
    "udp1000": Workload(udp_flood(1000), "udp", "sink-out", None),
    "connections": Workload(connections, "tcp", "echo-out", "echo-in"),
    "latency": Workload(latency, "tcp", "echo-out", "echo-in"),
}


def add_counters(counters: Counters) -> None:
    counters.add("iperf-out", "out", f"ip daddr {PEER_V4} tcp dport {IPERF_PORT}")
    counters.add("iperf-in", "in", f"ip saddr {PEER_V4} tcp sport {IPERF_PORT}")
    counters.add("sink-out", "out", f"ip daddr {PEER_V4} udp dport {SINK_PORT}")
    counters.add("echo-out", "out", f"ip daddr {PEER_V4} tcp dport {ECHO_PORT}")
    counters.add("echo-in", "in", f"ip saddr {PEER_V4} tcp sport {ECHO_PORT}")


def kernel_view(before: dict, after: dict, proto: str, out: str, inn: str | None) -> dict[str, int]:
    """The kernel's count of a workload's packets, shaped like a process's nfacct counters."""
    view = dict.fromkeys((n for n in COUNTER_NAMES if n.startswith(proto)), 0)
    for direction, name in (("snd", out), ("rcv", inn)):
        if name is not None:
            view[f"{proto}{direction}packs"] = after[name][0] - before[name][0]
            view[f"{proto}{direction}bytes"] = after[name][1] - before[name][1]
    return view


def check(setup: Setup, status: dict, pids: set[int], kernel: dict[str, int]) -> dict:
    """nfacct's counts of the processes `pids` (control `top`) against the kernel's."""
    tasks = [t for t in setup.request("top")["tasks"] if t["pid"] in pids]
    counted = {k: sum(t[k] for t in tasks) for k in kernel}
    engine = status["engine"]
    queued = setup.env.rules.queued_packets()
    return {
        "diff": {k: counted[k] - v for k, v in kernel.items() if counted[k] != v},
        "processes": len(pids),
        "attributed": sum(1 for t in tasks if any(t[k] for k in kernel)),
        "unidentified_packets": sum(v for k, v in engine["unidentified"].items() if k.endswith("packs")),
        "offload_added": status["offload"].get("added"),
        "queued": queued,
        "seen": engine["packets"],
        # sent to the queue but never read: FAIL_OPEN let them pass a full queue
        "unseen": queued - engine["packets"],
        "missed": status["queue"].get("missed"),
        "faults": status["faults"],
    }


def run_one(env: Env, workload: str, config: str, seconds: float, directory: Path) -> dict:
    w = WORKLOADS[workload]
    setup = Setup(env, config, directory)
    try:
        before, cpu = env.counters.read(), setup.cpu()
        res, pids = w.run(env, seconds)
        time.sleep(SETTLE)
        status = setup.settled_status() if setup.daemon else None
        res["cpu_s"] = setup.cpu() - cpu
        kernel = kernel_view(before, env.counters.read(), w.proto, w.out, w.inn)
        res["kernel"] = kernel
        if status is not None:
            res["check"] = check(setup, status, pids, kernel)
    finally:
        res_end = setup.close()
    res.update(res_end)
    res["loadavg"] = os.getloadavg()[0]
    return res


# ---- 100,000 concurrent flows ------------------------------------------------------------------


def set_elements(env: Env) -> int:
    """Elements in the flow sets, as `nft -j list set` lists them (not through nfacct)."""
    total = 0
    for name in SETS:
        out = env.lab.run(env.lab.acct, ["nft", "-j", "list", "set", "inet", "nfacct", name]).stdout
        for item in json.loads(out)["nftables"]:
            if "set" in item:
                total += len(item["set"].get("elem", []))
    return total


def split(count: int) -> list[int]:
    """`count` sockets over as few holder processes as PER_HOLDER allows, evenly."""
    n = -(-count // PER_HOLDER)
    if n > 6:
        raise SystemExit(f"at most {6 * PER_HOLDER:,} flows: two local addresses of 3 holders each")
    return [count // n + (i < count % n) for i in range(n)]


def many_flows(env: Env, mode: str, count: int, directory: Path) -> dict:
    # Idle UDP flows go at the next GC after 16 s (netatop's default); these must all be there at
    # once, and sending them takes longer than that.
    setup = Setup(env, mode, directory, "--udp-idle", "600")
    holders: list[subprocess.Popen] = []
    try:
        time.sleep(1.0)  # imports done, tables empty
        idle = setup.request("status")["engine"]["sockinfo"]
        before, kmem = env.counters.read(), kernel_memory()
        for i, n in enumerate(split(count)):
            local, first = (ACCT_V4, SECOND_V4)[i // 3], 10_000 + (i % 3) * PER_HOLDER
            argv = [str(env.tools / "loadgen"), "hold", PEER_V4, str(SINK_PORT), str(n)]
            argv = env.lab.cmd(env.lab.acct, [*argv, str(FLOW_RATE * n / count), local, str(first)])
            holders.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        reports = [read_line(h, count / FLOW_RATE + 60) for h in holders]
        res: dict[str, Any] = {k: sum(r[k] for r in reports) for k in ("sockets", "sent", "ports_in_use")}
        res["processes"] = len(holders)
        # Until every flow is in the tables and no lookup is in flight (bounded).
        deadline, last = time.monotonic() + 60, -1
        while time.monotonic() < deadline:
            status = setup.request("status")
            engine = status["engine"]
            if status["resolver"]["in_flight"] == 0 and engine["sockinfo"] == last:
                break
            last = engine["sockinfo"]
            time.sleep(0.5)
        time.sleep(SETTLE)
        status = setup.settled_status()
        mem = memory_mib(setup.pid())
        rss, hwm = mem["rss_mib"], mem["hwm_mib"]
        engine = status["engine"]
        res["peak"] = {
            "sockinfo": engine["sockinfo"],
            "offloaded": engine["sockinfo_offloaded"],
            "taskinfo": engine["taskinfo"],
            "elements": set_elements(env),
            "rss_mib": rss,
            "hwm_mib": hwm,
            # the whole machine's kernel memory since the start: sockets, sets, anyone else's
            "kernel_mib": (kernel_memory() - kmem) / 2**20,
        }
        kernel = kernel_view(before, env.counters.read(), "udp", "sink-out", None)
        res["check"] = check(setup, status, {r["pid"] for r in reports}, kernel)
        res["read_seconds"] = status["offload"].get("read_seconds")

        for h in holders:
            h.stdin.close()  # the sockets close as the process exits
        for h in holders:
            h.wait(timeout=60)
        closed = time.monotonic()
        res["gone_after_s"] = None
        while time.monotonic() < closed + 60:
            status = setup.request("status")
            if status["engine"]["sockinfo"] <= idle and status["offload"].get("flows", 0) == 0:
                res["gone_after_s"] = time.monotonic() - closed
                break
            time.sleep(0.5)
        res["after_close"] = {
            "sockinfo": status["engine"]["sockinfo"],
            "offloaded_flows": status["offload"].get("flows"),
            "elements": set_elements(env),
            # VmHWM now: the peak of the whole run, the closing of every flow included
            **memory_mib(setup.pid()),
            # close events the kernel could not deliver: those flows wait for the idle GC instead
            "destroy_overruns": status["events"]["destroy_overruns"],
        }
    finally:
        stop_all(holders)
        res_end = setup.close()
    res.update(res_end)
    return res


def kernel_memory() -> int:
    """Bytes of slab, per-CPU and vmalloc memory the whole kernel uses now (/proc/meminfo)."""
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = int(value.split()[0]) * 1024
    return fields["Slab"] + fields["Percpu"] + fields["VmallocUsed"]


def element_cost(env: Env, flows: int = ELEMENT_FLOWS, rounds: int = 3) -> dict:
    """Kernel memory per flow set element: /proc/meminfo before and after adding `flows` synthetic
    flows' elements (two each) with nfacct's own netlink code, then removing them, `rounds` times.
    The machine's other work moves the same figures, hence several rounds and their median."""
    env.rules.remove()
    env.rules.install()
    sets = FlowSets(env.lab.acct)
    try:
        # Distinct flows: local address 10.78.x.y and port 40000 + the rest of i.
        keys = [
            elements(
                (17, bytes((10, 78, i >> 8 & 255, i & 255)), 40000 + (i >> 16), bytes((10, 79, 0, 1)), 53)
            )
            for i in range(flows)
        ]
        els = [el for pair in keys for el in pair]
        per_element, freed = [], []
        for _ in range(rounds):
            m0 = kernel_memory()
            refused = sets.add(els)
            if refused:  # (removing the rules below takes the others with the table)
                raise RuntimeError(f"the kernel refused {len(refused):,} elements: {set(refused.values())}")
            time.sleep(0.5)
            m1 = kernel_memory()
            _, refused = sets.remove(els)
            if refused:
                raise RuntimeError(f"the kernel refused to remove {len(refused):,} elements")
            time.sleep(1.0)  # elements are freed after an RCU grace period
            m2 = kernel_memory()
            per_element.append((m1 - m0) / len(els))
            freed.append((m1 - m2) / len(els))
    finally:
        sets.close()
        env.rules.remove()
    return {"elements": len(els), "bytes_per_element": per_element, "freed_per_element": freed}


# ---- the run ----------------------------------------------------------------------------------


def host() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %z"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "nft": nft,
        "loadavg_before": os.getloadavg(),
    }


def progress(workload: str, config: str, r: dict) -> None:
    fig = summary.FIGURES.get(workload)
    shown = (
        f"{r[fig.key]:,.2f} {fig.unit}"
        if fig
        else f"p50 long-lived {summary.median(r['long_lived_ms']):.2f} ms"
    )
    verdict = "" if "check" not in r else f"  {summary.exactness([r])}, unseen {r['check']['unseen']:,}"
    if r.get("exit_status"):
        verdict += f"  DAEMON EXITED WITH STATUS {r['exit_status']}: {r['log_tail']}"
    print(
        f"  {workload:<12}{summary.HEADS[config]:<17}{shown:>18}  cpu {r['cpu_s']:5.2f} s{verdict}",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/modes.py", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=2, help="rounds of the four configurations per workload")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each throughput run")
    p.add_argument(
        "--only", nargs="+", choices=(*WORKLOADS, "flows", "elements"), help="run these parts only"
    )
    p.add_argument("--flows", type=int, default=100_000, help="concurrent flows of the memory scenario")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench/modes.py needs root: it creates network namespaces and queue rules")
    chosen = args.only or [*WORKLOADS, "flows", "elements"]
    res: dict[str, Any] = {"host": host(), "seconds_per_run": args.seconds, "runs": {}}
    started: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="nfacct-modes-") as tmp, Lab("nfmodes") as lab:
        tools = build(Path(tmp))
        rules = Rules(lab.acct)
        try:
            iperf3 = ["iperf3", "-s", "-B", PEER_V4, "-p", str(IPERF_PORT)]
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
            started.append(subprocess.Popen(lab.cmd(lab.peer, iperf3), **quiet))
            for server in (["echo", str(ECHO_PORT)], ["sink", str(SINK_PORT)]):
                argv = lab.cmd(lab.peer, [str(tools / "loadgen"), *server])
                started.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
                read_line(started[-1], 10)
            lab.run(lab.acct, ["ip", "addr", "add", f"{SECOND_V4}/24", "dev", "veth0"])
            env = Env(lab, rules, Counters(lab, lab.acct), tools)
            add_counters(env.counters)
            time.sleep(0.3)  # iperf3's server is listening by now (it has no ready line)
            n = 0
            for workload in (w for w in WORKLOADS if w in chosen):
                print(f"{workload}:", file=sys.stderr)
                for _ in range(args.runs):
                    for config in summary.CONFIGS:
                        n += 1
                        r = run_one(env, workload, config, args.seconds, Path(tmp) / f"run{n}")
                        res["runs"].setdefault(workload, {}).setdefault(config, []).append(r)
                        progress(workload, config, r)
            if "connections" in chosen:  # no rules since the last run's close: the client alone
                dry, _ = connections(env, args.seconds, dry=True)
                res["harness"] = dry
            if "flows" in chosen:
                res["flows"] = {}
                for mode in summary.DAEMONS:
                    print(f"{args.flows:,} flows, {mode}:", file=sys.stderr)
                    res["flows"][mode] = f = many_flows(env, mode, args.flows, Path(tmp) / f"flows-{mode}")
                    print(f"  {json.dumps(f['peak'])}, gone after {f['gone_after_s']} s", file=sys.stderr)
            if "elements" in chosen:
                res["elements"] = element_cost(env)
                res["element_bytes"] = summary.median(res["elements"]["bytes_per_element"])
        finally:
            stop_all(started)
            rules.remove()
    res["host"]["loadavg_after"] = os.getloadavg()
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    print(summary.report(res))
    print(f"\nwritten to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
