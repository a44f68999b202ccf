"""The queue reader against the real kernel: what each packet message says about its packet."""

from __future__ import annotations

import json
import subprocess
import time

from lab.hosts import ACCT_V4, PEER_V4
from nfacct.queue import HOOK_LOCAL_IN, HOOK_LOCAL_OUT, Queue, QueuedPacket
from nfacct.rules import Rules


def test_each_packet_comes_with_its_hook_device_and_length(lab):
    """A ping each way through a bound queue: the device indexes are the veth's, as `ip link`
    says, and the lengths are the IP packets' (84 bytes for a default ping)."""
    rules = Rules(lab.acct)
    rules.install(queue=9)
    seen: list[QueuedPacket] = []

    def keep(pkt: QueuedPacket) -> None:
        seen.append(pkt)
        pkt.accept()

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
