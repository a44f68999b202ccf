"""Malformed packets sent through the real queue are counted by reason and never hurt the engine."""

from __future__ import annotations

import json
import sys
import time

from lab.hosts import PEER_V4

SEND_RAW = r"""
import socket, struct, sys
dst = sys.argv[1]
def ip4(ihl_byte, proto, body):
    # raw IP_HDRINCL: the kernel fills in the length, checksum and source, nothing else
    return bytes([ihl_byte, 0]) + b"\0\0" + b"\0\1\0\0" + bytes([64, proto]) + b"\0\0" + b"\0" * 4 \
        + socket.inet_aton(dst) + body
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
sent = {"truncated-transport": 0, "bad-version": 0}
for _ in range(7):
    s.sendto(ip4(0x45, 6, b"\x01\x02"), (dst, 0)); sent["truncated-transport"] += 1
for _ in range(5):
    s.sendto(ip4(0x75, 17, b"\0" * 8), (dst, 0)); sent["bad-version"] += 1
print(__import__("json").dumps(sent))
"""


def test_malformed_packets_are_counted_not_fatal(lab, counters, daemon):
    counters.add("raw-out", "out", "ip protocol { tcp, udp } ip daddr " + PEER_V4 + " meta length < 40")
    before = daemon.status()["engine"]
    out = lab.run(lab.acct, [sys.executable, "-c", SEND_RAW, PEER_V4]).stdout
    sent = json.loads(out)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status = daemon.status()
        if status["engine"]["packets"] >= before["packets"] + sum(sent.values()):
            break
        time.sleep(0.05)
    engine = status["engine"]
    assert counters.read()["raw-out"][0] == sum(sent.values()), "the kernel saw what we sent"
    for reason, n in sent.items():
        assert engine["malformed"].get(reason, 0) - before["malformed"].get(reason, 0) == n
    assert engine["errors"] == 0
    assert daemon.proc.poll() is None
    assert status["queue"]["missed"] == 0
