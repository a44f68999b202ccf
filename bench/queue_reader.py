"""The queue reader, side by side: nfacct's own (netlink core, batch verdicts, the packet's real
length) against netfilterqueue 1.1 (one verdict message per packet), on the same load.

Each reader binds the queue in a throwaway namespace pair with the same flags (GSO, FAIL_OPEN,
128-byte copy, 8192 packets), parses every packet with `packet.parse` and accepts it, while
iperf3 sends 64-byte UDP datagrams (the per-packet cost) or TCP bulk (GSO super-packets) through
it. Runs alternate A, B, A, B...; the table gives medians. `make bench` runs it after run.py.

    .venv/bin/python bench/queue_reader.py [--runs 3] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's lab

from netfilterqueue import COPY_PACKET, NetfilterQueue

from lab.hosts import PEER_V4, Lab
from nfacct import netlink, netns
from nfacct.packet import parse
from nfacct.queue import (
    COPY_RANGE,
    NETLINK_NETFILTER,
    NFNL_SUBSYS_QUEUE,
    NFQA_CFG_F_FAIL_OPEN,
    NFQA_CFG_F_GSO,
    NFQA_CFG_FLAGS,
    NFQA_CFG_MASK,
    NFQNL_MSG_CONFIG,
    QUEUE_MAXLEN,
    RCVBUF,
    Queue,
)
from nfacct.rules import Rules

QUEUE = 0
PORT = 5201
LOADS = {"UDP 64 B": ["-u", "-b", "0", "-l", "64"], "TCP bulk": []}


def run_ours(netns_name: str, stop: threading.Event, counted: list[int]) -> None:
    def on_packet(pkt) -> bool:
        parse(pkt.payload, pkt.length)
        return True

    q = Queue(QUEUE, on_packet, netns_name)
    try:
        while not stop.is_set():
            q.dispatch()
            time.sleep(0)
        q.dispatch()
    finally:
        counted.append(q.received)
        q.close()


def run_nfq(netns_name: str, stop: threading.Event, counted: list[int]) -> None:
    n = [0]

    def on_packet(pkt) -> None:
        parse(pkt.get_payload())
        n[0] += 1
        pkt.accept()

    with netns.entered(netns_name):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    nfq = NetfilterQueue(sockfd=sock.fileno())
    sock.close()
    nfq.bind(QUEUE, on_packet, max_len=QUEUE_MAXLEN, mode=COPY_PACKET, range=COPY_RANGE, sock_len=RCVBUF)
    # The same flags as ours, without asking for an acknowledgement (netfilterqueue would read it).
    flags = NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, QUEUE)
    body += netlink.pack_attr(NFQA_CFG_MASK, struct.pack("!I", flags))
    body += netlink.pack_attr(NFQA_CFG_FLAGS, struct.pack("!I", flags))
    with socket.socket(fileno=os.dup(nfq.get_fd())) as config:
        config.send(
            netlink.pack_message((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG, body, netlink.NLM_F_REQUEST)
        )
    try:
        while not stop.is_set():
            nfq.run(block=False)
            time.sleep(0)
        nfq.run(block=False)
    finally:
        counted.append(n[0])
        nfq.unbind()


def measure(lab: Lab, reader, load: list[str], seconds: int) -> dict:
    stop, counted = threading.Event(), []
    consumer = threading.Thread(target=reader, args=(lab.acct, stop, counted))
    consumer.start()
    time.sleep(0.3)
    client = ["iperf3", "-c", PEER_V4, "-p", str(PORT), "-t", str(seconds), "-J", *load]
    out = lab.run(lab.acct, client).stdout
    stop.set()
    consumer.join()
    end = json.loads(out)["end"]
    if "sum_received" in end and "lost_packets" not in end.get("sum", {}):
        return {"Gbit/s": end["sum_received"]["bits_per_second"] / 1e9, "handled": counted[0]}
    udp = end["sum"]
    received = udp["packets"] - udp["lost_packets"]
    return {"kpps received": received / udp["seconds"] / 1e3, "handled": counted[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=int, default=3)
    args = p.parse_args()
    readers = {"netfilterqueue": run_nfq, "nfacct": run_ours}
    results: dict[tuple[str, str], list[dict]] = {}
    with Lab("nfqr") as lab:
        rules = Rules(lab.acct)
        rules.install(QUEUE)
        server = subprocess.Popen(
            lab.cmd(lab.peer, ["iperf3", "-s", "-p", str(PORT)]), stdout=subprocess.DEVNULL
        )
        try:
            time.sleep(0.5)
            for load_name, load in LOADS.items():
                for _ in range(args.runs):
                    for name, reader in readers.items():
                        results.setdefault((load_name, name), []).append(
                            measure(lab, reader, load, args.seconds)
                        )
        finally:
            server.kill()
            server.wait()
            rules.remove()
    print(f"\nqueue reader, {args.runs} alternating runs of {args.seconds} s, medians")
    print(f"{'load':<12}{'figure':<16}{'netfilterqueue':>16}{'nfacct':>10}{'ratio':>8}")
    for load_name in LOADS:
        a, b = results[(load_name, "netfilterqueue")], results[(load_name, "nfacct")]
        for figure in (f for f in a[0] if f != "handled"):
            ma, mb = statistics.median(r[figure] for r in a), statistics.median(r[figure] for r in b)
            print(f"{load_name:<12}{figure:<16}{ma:>16.2f}{mb:>10.2f}{mb / ma:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
