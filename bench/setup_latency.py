"""New-connection setup latency, side by side: connect to first echoed byte, without nfacct and
with it (its first packet waits for the owner lookup), from one long-lived process and from a
process started just before its only connection.

Runs alternate (no rules, nfacct, no rules, ...) in one throwaway namespace pair; the table gives
p50 and p99 over every connection of a setup. `make bench` runs it after the other benchmarks.

    .venv/bin/python bench/setup_latency.py [--connections 300] [--fresh 30] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's lab

from lab.daemon import Daemon
from lab.hosts import PEER_V4, Lab, stop_all
from nfacct.rules import Rules

PORT = 7000
# One process, `count` connections: connect, send a byte, read its echo; seconds each.
CLIENT = r"""
import json, socket, sys, time
took = []
for _ in range(int(sys.argv[3])):
    start = time.perf_counter()
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        s.sendall(b"x")
        s.recv(1)
    took.append(time.perf_counter() - start)
    time.sleep(0.002)
print(json.dumps(took))
"""


def connections(lab: Lab, count: int, fresh: int) -> dict[str, list[float]]:
    argv = ["python3", "-c", CLIENT, PEER_V4, str(PORT)]
    long_lived = json.loads(lab.run(lab.acct, [*argv, str(count)]).stdout)
    new_processes = [json.loads(lab.run(lab.acct, [*argv, "1"]).stdout)[0] for _ in range(fresh)]
    return {"long-lived process": long_lived, "fresh process": new_processes}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=300)
    p.add_argument("--fresh", type=int, default=30)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    results: dict[tuple[str, str], list[float]] = {}
    with Lab("nfsl") as lab, tempfile.TemporaryDirectory(prefix="nfacct-bench-") as tmp:
        server = lab.role(lab.peer, "echo-server", "--port", str(PORT))
        rules = Rules(lab.acct)
        try:
            json.loads(server.stdout.readline())
            for run in range(args.runs):
                for setup in ("no rules", "nfacct"):
                    daemon = None
                    if setup == "nfacct":
                        rules.install()
                        daemon = Daemon(lab.acct, Path(tmp) / f"run{run}")
                    try:
                        for kind, took in connections(lab, args.connections, args.fresh).items():
                            results.setdefault((kind, setup), []).extend(took)
                    finally:
                        if daemon is not None:
                            daemon.stop()
                            rules.remove()
                    time.sleep(0.2)
        finally:
            stop_all([server])
            rules.remove()
    print(f"\nconnect to first echoed byte, {args.runs} alternating runs (ms)")
    print(f"{'':<22}{'no rules p50':>13}{'p99':>8}{'nfacct p50':>12}{'p99':>8}{'+p50':>8}")
    for kind in ("long-lived process", "fresh process"):
        base, ours = results[(kind, "no rules")], results[(kind, "nfacct")]
        b50, b99 = statistics.median(base) * 1e3, percentile(base, 0.99) * 1e3
        o50, o99 = statistics.median(ours) * 1e3, percentile(ours, 0.99) * 1e3
        print(f"{kind:<22}{b50:>13.2f}{b99:>8.2f}{o50:>12.2f}{o99:>8.2f}{o50 - b50:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
