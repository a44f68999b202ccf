"""`make bench`, issue 9's missed targets: how far the parts nfacct is made of can go, measured
apart, on the workload where the gap is widest (64-byte UDP from one connected socket, to a
sink that never reads; bench/loadgen.c, as in bench/modes.py).

The ruleset's parts (iptables-nft backend, this kernel's only queue backend; no daemon: the
flow's element is put in by hand, so every packet takes the offloaded path):
- **kernel**: no nfacct rules (the lab's counter rules only, as in every column of modes.py);
- **as installed**: nfacct's ruleset with the flow's two elements, what `--mode offload` leaves;
- **mark only**: the offload chain without its set lookup, every packet marked and skipped by
  the iptables chain: what one more base chain and the iptables mark check cost;
- **lookup only**: the offload chain as installed, the iptables chain unhooked: what the set
  lookup and the mark cost without the iptables side.

The queue consumer's parts (nfacct's rules, no element: every packet queued):
- **C consumer**: bench/nfq_consumer.c, as in modes.py;
- **Python, bare**: the tightest Python loop: read a message, take the packet id at its fixed
  offset, one batch verdict per 64 packets; no parsing, nothing counted;
- **nfacct reader**: nfacct.queue.Queue, its callback accepting every packet unparsed;
- **nfacct reader + parse**: the same with nfacct.packet.parse on each packet.

Configurations alternate, `--runs` rounds; the table gives medians and each one's ratio to the
first of its group. Results go to bench/floors.json.

    .venv/bin/python bench/floors.py [--runs 3] [--seconds 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's lab and bench

from bench.modes import build, read_line
from lab.hosts import ACCT_V4, PEER_V4, Counters, Lab
from nfacct.packet import parse
from nfacct.queue import Queue, verdict_message
from nfacct.rules import OFFLOAD_MARK, Rules

RESULTS = Path(__file__).with_name("floors.json")
SINK_PORT, SPORT = 9000, 40000  # one fixed source port: the element is known before the flood
QUEUE = 0
BATCH = 64
_packet_id = struct.Struct("!I")
ID_OFFSET = 16 + 4 + 4  # netlink header, nfgenmsg, the first attribute's header: NFQA_PACKET_HDR


def nft(lab: Lab, *args: str) -> None:
    lab.run(lab.acct, ["nft", *args])


def offloaded(lab: Lab, rules: Rules) -> None:
    """nfacct's rules, with the flood's flow in the out4 set: every packet counted there."""
    rules.remove()
    rules.install(QUEUE)
    nft(
        lab,
        "add",
        "element",
        "inet",
        "nfacct",
        "out4",
        "{",
        f"udp . {ACCT_V4} . {SPORT} . {PEER_V4} . {SINK_PORT}",
        "}",
    )


def mark_only(lab: Lab, rules: Rules) -> None:
    offloaded(lab, rules)
    nft(lab, "flush", "chain", "inet", "nfacct", "offload_output")
    bit = f"{OFFLOAD_MARK:#x}"
    nft(
        lab,
        "add",
        "rule",
        "inet",
        "nfacct",
        "offload_output",
        "meta",
        "mark",
        "set",
        "meta",
        "mark",
        "|",
        bit,
        "accept",
    )


def lookup_only(lab: Lab, rules: Rules) -> None:
    offloaded(lab, rules)
    lab.run(lab.acct, ["iptables-nft", "-D", "OUTPUT", "-j", "NFACCT_OUT"])


def no_rules(_lab: Lab, rules: Rules) -> None:
    rules.remove()


CHAINS: dict[str, Callable[[Lab, Rules], None]] = {
    "kernel": no_rules,
    "as installed": offloaded,
    "mark only": mark_only,
    "lookup only": lookup_only,
}


def bare(lab: Lab, stop: threading.Event) -> int:
    """The tightest Python consumer: no parsing, nothing counted (nfacct's Queue binds it, with
    its flags, then steps aside)."""
    q = Queue(QUEUE, lambda _pkt: True, lab.acct)
    sock, buf, read = q._sock, bytearray(1 << 16), 0
    try:
        while not stop.is_set():
            select.select([sock], [], [], 0.1)
            newest, pending = None, 0
            while True:
                try:
                    sock.recv_into(buf)
                except BlockingIOError:
                    break
                (newest,) = _packet_id.unpack_from(buf, ID_OFFSET)
                read, pending = read + 1, pending + 1
                if pending == BATCH:
                    sock.send(verdict_message(QUEUE, newest, batch=True))
                    newest, pending = None, 0
            if newest is not None:
                sock.send(verdict_message(QUEUE, newest, batch=True))
    finally:
        q.close()
    return read


def reader(parsing: bool) -> Callable[[Lab, threading.Event], int]:
    def on_packet(pkt) -> bool:
        if parsing:
            parse(pkt.payload, pkt.length)
        return True

    def run(lab: Lab, stop: threading.Event) -> int:
        q = Queue(QUEUE, on_packet, lab.acct)
        try:
            while not stop.is_set():
                select.select([q], [], [], 0.1)
                q.dispatch(4 * BATCH)
            return q.received
        finally:
            q.close()

    return run


CONSUMERS: dict[str, Callable[[Lab, threading.Event], int] | None] = {
    "C consumer": None,
    "Python, bare": bare,
    "nfacct reader": reader(parsing=False),
    "nfacct reader + parse": reader(parsing=True),
}


def flood(lab: Lab, tools: Path, seconds: float) -> float:
    argv = [str(tools / "loadgen"), "udp", PEER_V4, str(SINK_PORT), "1", str(seconds), "64"]
    out = json.loads(lab.run(lab.acct, argv).stdout)
    return out["sent"] / out["seconds"] / 1e3


def with_consumer(lab: Lab, tools: Path, seconds: float, consumer) -> float:
    if consumer is None:
        c = subprocess.Popen(
            lab.cmd(lab.acct, [str(tools / "nfq_consumer"), str(QUEUE)]), stdout=subprocess.PIPE, text=True
        )
        try:
            read_line(c, 10)
            return flood(lab, tools, seconds)
        finally:
            c.send_signal(signal.SIGTERM)
            c.wait(timeout=10)
    stop, box = threading.Event(), []
    t = threading.Thread(target=lambda: box.append(consumer(lab, stop)))
    t.start()
    try:
        time.sleep(0.3)  # bound and configured
        return flood(lab, tools, seconds)
    finally:
        stop.set()
        t.join()


def table(title: str, results: dict[str, list[float]]) -> list[str]:
    first = statistics.median(next(iter(results.values())))
    lines = [f"| {title} | kpps, median (runs) | ratio |", "| --- | --- | --- |"]
    for name, runs in results.items():
        m = statistics.median(runs)
        lines.append(f"| {name} | {m:.1f} ({', '.join(f'{r:.0f}' for r in runs)}) | {m / first:.3f} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=RESULTS, help="where the results go (JSON)")
    args = p.parse_args()
    chains: dict[str, list[float]] = {name: [] for name in CHAINS}
    consumers: dict[str, list[float]] = {name: [] for name in CONSUMERS}
    with tempfile.TemporaryDirectory(prefix="nfacct-floors-") as tmp, Lab("nffloor") as lab:
        tools = build(Path(tmp))
        rules = Rules(lab.acct)
        lab.run(lab.acct, ["sh", "-c", f"echo '{SPORT} {SPORT}' > /proc/sys/net/ipv4/ip_local_port_range"])
        Counters(lab, lab.acct).add("sink-out", "out", f"udp dport {SINK_PORT}")
        sink = subprocess.Popen(
            lab.cmd(lab.peer, [str(tools / "loadgen"), "sink", str(SINK_PORT)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            read_line(sink, 10)
            for _ in range(args.runs):
                for name, setup in CHAINS.items():
                    setup(lab, rules)
                    chains[name].append(flood(lab, tools, args.seconds))
                rules.remove()
                rules.install(QUEUE)
                for name, consumer in CONSUMERS.items():
                    consumers[name].append(with_consumer(lab, tools, args.seconds, consumer))
        finally:
            sink.kill()
            sink.wait()
            rules.remove()
    res = {"seconds_per_run": args.seconds, "chains": chains, "consumers": consumers}
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print("\n".join(table("64-byte UDP, one flow: the ruleset", chains)))
    print()
    print("\n".join(table("64-byte UDP, one flow: the queue consumer", consumers)))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
