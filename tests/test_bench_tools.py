"""The benchmark's own tools (bench/loadgen.c, bench/nfq_consumer.c, bench/summary.py) do what
bench/modes.py reports they did: each claim is checked against the kernel's nft counters or its
socket table. Functional only: no timing is asserted here (speed lives in `make bench`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import modes, summary
from lab.hosts import ACCT_V4, PEER_V4, Counters, stop_all
from nfacct.rules import Rules

ROOT = Path(__file__).resolve().parent.parent

ECHO, SINK = 7000, 9000
UDP_OVERHEAD = 28  # IPv4 + UDP headers: nft counts the IP length


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    return modes.build(tmp_path_factory.mktemp("tools"))


@pytest.fixture(scope="module")
def servers(lab, tools):
    started = []
    for role, port in (("echo", ECHO), ("sink", SINK)):
        argv = lab.cmd(lab.peer, [str(tools / "loadgen"), role, str(port)])
        started.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
        assert json.loads(started[-1].stdout.readline()) == {"ready": True}
    yield
    stop_all(started)


@pytest.fixture(scope="module")
def kernel(lab, servers):
    counters = Counters(lab, lab.acct)
    counters.add("udp", "out", f"ip daddr {PEER_V4} udp dport {SINK}")
    counters.add("syn", "out", f"ip daddr {PEER_V4} tcp dport {ECHO} tcp flags syn")
    return counters


def loadgen(lab, tools, *args) -> dict:
    return json.loads(lab.run(lab.acct, [str(tools / "loadgen"), *map(str, args)]).stdout)


def delta(counters, name, run):
    before = counters.read()[name]
    out = run()
    after = counters.read()[name]
    return out, (after[0] - before[0], after[1] - before[1])


def test_udp_flood_sends_what_the_kernel_counts(lab, tools, kernel):
    out, counted = delta(kernel, "udp", lambda: loadgen(lab, tools, "udp", PEER_V4, SINK, 10, 0.3, 64))
    assert out["failed"] == 0 and out["sent"] > 0
    assert counted == (out["sent"], out["sent"] * (64 + UDP_OVERHEAD))


def test_connections_one_process_each(lab, tools, kernel):
    out, (syns, _) = delta(
        kernel, "syn", lambda: loadgen(lab, tools, "connections", PEER_V4, ECHO, 0.3, 4, 32)
    )
    assert out["failed"] == 0 and out["connections"] > 0
    children = out["children"]
    assert len(set(children)) == len(children) == out["connections"]
    assert out["pid"] not in children
    assert syns == out["connections"]  # one SYN per connection: no retry, no connection missed


def test_dry_connections_send_nothing(lab, tools, kernel):
    out, (syns, _) = delta(
        kernel, "syn", lambda: loadgen(lab, tools, "connections", PEER_V4, ECHO, 0.2, 4, 32, "dry")
    )
    assert out["connections"] == len(out["children"]) > 0
    assert syns == 0


def test_latency_times_every_connection(lab, tools, kernel):
    out, (syns, _) = delta(kernel, "syn", lambda: loadgen(lab, tools, "latency", PEER_V4, ECHO, 5, 3))
    assert len(out["long_lived_ms"]) == 5 and len(out["fresh_ms"]) == 3
    assert all(ms > 0 for ms in out["long_lived_ms"] + out["fresh_ms"])  # a failure is negative
    assert len(set(out["children"])) == 3 and out["pid"] not in out["children"]
    assert syns == 8


def test_hold_keeps_its_sockets_until_stdin_closes(lab, tools, kernel):
    argv = [str(tools / "loadgen"), "hold", PEER_V4, str(SINK), "50", "1000", ACCT_V4, "30000"]
    before = kernel.read()["udp"]
    proc = subprocess.Popen(lab.cmd(lab.acct, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        out = json.loads(proc.stdout.readline())
        assert (out["sockets"], out["sent"]) == (50, 50)
        assert kernel.read()["udp"][0] - before[0] == 50
        held = lab.run(lab.acct, ["ss", "-uanH", f"dport = :{SINK}"]).stdout.splitlines()
        assert len(held) == 50 and all(f"{ACCT_V4}:" in line for line in held)
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
        assert lab.run(lab.acct, ["ss", "-uanH", f"dport = :{SINK}"]).stdout == ""
    finally:
        stop_all([proc])


def test_consumer_accepts_every_queued_packet(lab, tools, kernel):
    rules = Rules(lab.acct)
    rules.install()
    consumer = subprocess.Popen(
        lab.cmd(lab.acct, [str(tools / "nfq_consumer"), "0"]), stdout=subprocess.PIPE, text=True
    )
    try:
        assert json.loads(consumer.stdout.readline()) == {"ready": True}
        out, (counted, _) = delta(
            kernel, "udp", lambda: loadgen(lab, tools, "udp", PEER_V4, SINK, 1, 0.3, 64)
        )
        queued = rules.queued_packets()
        consumer.terminate()
        seen = json.loads(consumer.communicate(timeout=10)[0].splitlines()[-1])
        # Every datagram went through the queue and out (accepted), and nothing else was queued.
        assert counted == out["sent"] == seen["packets"] == queued
    finally:
        stop_all([consumer])
        rules.remove()


def test_split_spreads_flows_over_holders():
    parts = modes.split(100_000)
    assert sum(parts) == 100_000 and len(parts) == 6 and max(parts) <= modes.PER_HOLDER
    assert max(parts) - min(parts) <= 1


def _runs(workload: str, key: str, values: dict[str, float]) -> dict:
    return {workload: {config: [{key: v, "cpu_s": 0.0}] for config, v in values.items()}}


def test_targets_hold_figures_to_the_issues_bounds():
    runs = _runs("tcp", "gbit_s", {"kernel": 10.0, "consumer": 8.0, "queue": 7.5, "offload": 9.4})
    runs |= _runs("udp1", "kpps", {"kernel": 200.0, "consumer": 100.0, "queue": 91.0, "offload": 190.0})
    met = {t.text: t.measure({"runs": runs}) for t in summary.TARGETS}
    assert met["offload >= 0.95x kernel, TCP bulk"] == ("0.940", False)
    assert met["offload >= 0.95x kernel, UDP 64 B 1 flow"] == ("0.950", True)
    assert met["queue >= 0.95x C consumer, TCP bulk"] == ("0.938", False)
    assert met["queue >= 0.90x C consumer, UDP 1 flow"] == ("0.910", True)
    assert met["connections/s offload >= 0.8x kernel"] == ("-", None)  # not measured: no verdict


def test_exactness_names_the_largest_gap():
    exact = {"check": {"diff": {}}}
    short = {"check": {"diff": {"udpsndpacks": -3, "udpsndbytes": -276}}}
    longer = {"check": {"diff": {"tcprcvbytes": 1500}}}  # a length miscounted, no packet missing
    assert summary.exactness([exact, exact]) == "exact"
    assert summary.exactness([exact, short]) == "-3 packets udpsnd (1/2 runs)"
    assert summary.exactness([longer, exact]) == "+1,500 bytes tcprcv (1/2 runs)"
    assert summary.exactness([{"kpps": 1.0}]) == "-"  # no daemon, nothing to compare


def test_the_metrics_scrape_bench_runs():
    """bench/metrics_scrape.py drives Metrics with an engine of its own: it had fallen behind a
    change of the daemon once and crashed only in `make bench`."""
    argv = [sys.executable, "bench/metrics_scrape.py", "--tasks", "300", "--scrapes", "1"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("100", "813"), ("300", "2,413")]  # commands, series


@pytest.mark.root
def test_the_floors_bench_runs(tmp_path):
    """bench/floors.py rebuilds nfacct's ruleset in parts and binds the queue four ways; a short
    run of each must carry traffic (no figure is judged here)."""
    out = tmp_path / "floors.json"
    argv = [sys.executable, "bench/floors.py", "--runs", "1", "--seconds", "0.3", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    res = json.loads(out.read_text())
    assert set(res["chains"]) == {"kernel", "as installed", "mark only", "lookup only"}
    assert len(res["consumers"]) == 4
    assert all(runs[0] > 0 for group in ("chains", "consumers") for runs in res[group].values())
