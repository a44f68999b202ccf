"""The queue reader against the real kernel: what each packet message says about its packet."""

from __future__ import annotations

import json
import subprocess
import time

from conftest import until

from lab.daemon import Daemon
from lab.hosts import ACCT_V4, PEER_V4, Counters, Lab
from nfacct.queue import HOOK_LOCAL_IN, HOOK_LOCAL_OUT, Queue, QueuedPacket
from nfacct.rules import Rules


def test_each_packet_comes_with_its_hook_device_and_length(lab):
    """A ping each way through a bound queue: the device indexes are the veth's, as `ip link`
    says, and the lengths are the IP packets' (84 bytes for a default ping)."""
    rules = Rules(lab.acct)
    rules.install(queue=9)
    seen: list[QueuedPacket] = []

    def keep(pkt: QueuedPacket) -> bool:
        seen.append(pkt)
        return True

    queue = Queue(9, keep, lab.acct)
    try:
        veth = json.loads(lab.run(lab.acct, ["ip", "-j", "link", "show", "veth0"]).stdout)[0]["ifindex"]
        for ns, to in ((lab.acct, PEER_V4), (lab.peer, ACCT_V4)):
            argv = lab.cmd(ns, ["ping", "-c", "1", "-W", "5", to])
            ping = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
            deadline = time.monotonic() + 5
            while ping.poll() is None and time.monotonic() < deadline:
                queue.dispatch()  # the test is the daemon here: every packet needs its verdict
                time.sleep(0.005)
            assert ping.wait(timeout=5) == 0
    finally:
        queue.close()
        rules.remove()
    pings = [p for p in seen if len(p.payload) >= 20 and p.payload[9] == 1]  # ICMP
    out = [(p.hook, p.indev, p.outdev, p.length) for p in pings if p.hook == HOOK_LOCAL_OUT]
    into = [(p.hook, p.indev, p.outdev, p.length) for p in pings if p.hook == HOOK_LOCAL_IN]
    # Out: our echo request, then our reply to the peer's request; in: the reverse.
    assert out == [(HOOK_LOCAL_OUT, 0, veth, 84)] * 2
    assert into == [(HOOK_LOCAL_IN, veth, 0, 84)] * 2
    assert queue.verdict_messages >= 1


def test_unidentified_traffic_is_bucketed_by_the_sockets_uid(tmp_path):
    """With the flow table full (`--max-sockinfo 1`), packets cannot be attributed; the queue
    still says whose socket sent them, so they land in that uid's bucket: five datagrams sent
    as uid 65534 are user 65534's unidentified traffic, as nft counts them."""
    with Lab("nfuid") as lab:
        rules = Rules(lab.acct)
        rules.install()
        counters = Counters(lab, lab.acct)
        counters.add("nobody", "out", "udp dport 9")
        daemon = Daemon(lab.acct, tmp_path, "--max-sockinfo", "1")
        try:
            lab.run(lab.acct, ["bash", "-c", f"echo x > /dev/udp/{PEER_V4}/8"])  # fills the table
            as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", "-c"]
            lab.run(lab.acct, [*as_nobody, f"for i in 1 2 3 4 5; do echo x > /dev/udp/{PEER_V4}/9; done"])

            def nobodys() -> int:
                return daemon.status()["engine"]["unidentified_by_uid"].get("65534", {}).get("udpsndpacks")

            assert until(nobodys, 5, 5) == counters.read()["nobody"][0] == 5
            engine = daemon.status()["engine"]
            assert engine["sockinfo_overflow"] >= 5
            assert engine["unidentified_by_uid"]["65534"]["udpsndbytes"] == counters.read()["nobody"][1]
        finally:
            daemon.stop()
            rules.remove()
