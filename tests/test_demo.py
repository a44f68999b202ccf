"""`make demo`: programs a reader knows, each in the table with its traffic, in under a minute,
and nothing left behind (no namespace, no process)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from lab.hosts import lab_env

pytestmark = pytest.mark.root


def marked(mark: bytes) -> list[int]:
    """Processes whose environment holds `mark`: everything the demo started inherits it."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark in f.read():
                    found.append(int(pid))
        except OSError:  # gone meanwhile, or a kernel thread
            pass
    return found


def test_the_demo_shows_who_did_what_and_leaves_nothing_behind():
    mark = f"NFACCT_DEMO_MARK={uuid.uuid4()}"
    env = {**lab_env(), "NFACCT_DEMO_MARK": mark.split("=")[1], "COLUMNS": "160"}
    started = time.monotonic()
    demo = subprocess.run(
        [sys.executable, "-m", "lab.demo"], env=env, capture_output=True, text=True, timeout=120
    )
    took = time.monotonic() - started
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert took < 60
    out = demo.stdout
    acct, peer = re.match(r"namespaces (\S+) \(accounted.*and (\S+) \(", out).groups()

    def row(command: str) -> list[list[str]]:
        """Rows of the table for `command`: [pid, command, uid, tcp snd, tcp rcv, udp snd, udp rcv]."""
        cells = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if "│" in line]
        return [r for r in cells if len(r) == 8 and r[1] == command]

    # curl received each 1 MiB file; http.server (python3) sent them; iperf3 sent 2 s at 50 Mbit/s
    # (12.5 MB); socat sent and received its 20 datagrams of 512 bytes (540 on the wire).
    assert [r[4].endswith("/1.0M") for r in row("curl")] == [True] * 3
    [http] = row("python3")
    assert http[3].endswith("/3.0M") and "-m http." in http[7]
    [iperf] = row("iperf3")
    assert 6.0 <= float(iperf[3].split("/")[1].rstrip("M")) <= 12.5  # paced: less on a busy machine
    assert [r[5:7] for r in row("socat")] == [["20/10.5K", "20/10.5K"]]
    assert re.search(r"icmp out +│ +4 pk / 336B", out)  # ping: per protocol
    assert re.search(r"passed unaccounted +│ +0 ", out)

    assert marked(mark.encode()) == []  # the daemon, servers and clients: all gone
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not {acct, peer} & {line.split()[0] for line in namespaces.splitlines()}
