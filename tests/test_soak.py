"""Long soaks, run by `make soak` (pytest --soak), not by `make test`: loads at the sizes where the
kernel starts dropping what it tells us.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import until

from lab.daemon import Daemon
from lab.hosts import PEER_V4

pytestmark = pytest.mark.soak

SOCKETS = 15_000  # RLIMIT_NOFILE's hard limit here is 20,000
# Opens SOCKETS UDP sockets, each sending one datagram to the peer's port, at a rate the daemon
# attributes them all (3,000 new flows a second: bench/modes.py), says so, and exits when its
# stdin closes: every socket closes at once.
OPENER = f"""
import json, os, resource, socket, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, ({SOCKETS + 100}, {SOCKETS + 100}))
port, n = int(sys.argv[1]), int(sys.argv[2])
socks = []
start = time.monotonic()
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", ("{PEER_V4}", port))
    socks.append(s)
    time.sleep(max(0.0, start + i / 3000 - time.monotonic()))
print(json.dumps({{"pid": os.getpid(), "sockets": len(socks)}}), flush=True)
sys.stdin.read()
"""


def test_closes_lost_to_an_overrun_are_found_by_the_next_gc(lab, rules, counters, port, procs, tmp_path):
    """15,000 sockets closing while the daemon is stopped overrun its destroy events: the next GC
    dumps the sockets left, so the flows are gone within two GC cycles, not --unreferenced-idle."""
    p = port()
    counters.add(f"soak{p}", "out", f"meta l4proto udp udp dport {p}")
    sink = lab.role(lab.peer, "sink", "--port", str(p), "--count", str(SOCKETS), "--hold")
    procs.append(sink)
    assert json.loads(sink.stdout.readline())["ready"]
    d = Daemon(lab.acct, tmp_path, "--gc-cycle", "2", "--udp-idle", "600")
    try:
        idle = d.status()["engine"]["sockinfo"]
        argv = lab.cmd(lab.acct, ["python3", "-c", OPENER, str(p), str(SOCKETS)])
        opener = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(opener)
        pid = json.loads(opener.stdout.readline())["pid"]

        def ours() -> int:
            return next((t["udpsndpacks"] for t in d.top() if t["pid"] == pid), 0)

        assert until(ours, SOCKETS, 30) == SOCKETS, "every datagram counted for its sender"
        assert counters.read()[f"soak{p}"][0] == SOCKETS  # the kernel's count (once all have left)
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            opener.stdin.close()
            opener.wait(timeout=30)
            time.sleep(1.0)  # the kernel's destroy events pile up in the stopped daemon's buffer
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)

        assert d.status()["events"]["destroy_overruns"] >= 1, "the test must overrun the events"

        def left() -> int:
            return d.status()["engine"]["sockinfo"] - idle

        assert until(left, 0, 10) == 0, "closed flows still in the tables"
        assert d.status()["offload"].get("flows", 0) == 0, "their elements are gone too"
    finally:
        assert d.stop() == 0
