"""Takeover: a new daemon replaces a running one without losing a packet.

The successor checks that the daemon answering at the control path is the one that accounts the
namespace and that it hands its tables over in a format this version reads, picks the other
queue of the pair, binds it and puts its queue rule in front (the service does those two), then
asks for the handover: the predecessor drains its queue, flushes everything to the database,
sends its tables and exits. Only then does the successor read its own queue, so every packet is
counted exactly once, and flows keep their owners even if an owner exited in between.
"""

from __future__ import annotations

import os
import time

from . import claim, control
from .rules import Rules, takeover_pair
from .tables import HandoverError, check_handover_format


class TakeoverError(Exception):
    """The takeover cannot go ahead; one line for the user."""


def successor_queue(
    control_path: str, netns: str | None, rules: Rules | None, rules_problem: str, queue: int
) -> int:
    """The queue the successor binds: the one of the pair the predecessor does not read.
    Checked before anything changes."""
    answer = control.request(control_path, "ping")  # ControlError names the path if nobody answers
    held = claim.holder(netns)
    if held is None or held.get("control") != os.path.abspath(control_path):
        accounted = f"accounted by pid {held['pid']} at {held['control']}" if held else "not accounted"
        raise TakeoverError(
            f"--takeover replaces the daemon of {netns or 'this namespace'}, but the namespace is"
            f" {accounted}, not by the daemon at {control_path}"
        )
    try:
        check_handover_format(answer.get("handover_format", 1))  # before 2, ping said only "ok"
    except HandoverError as e:
        raise TakeoverError(str(e)) from None
    queues = rules.queue_rules() if rules is not None else []
    if not queues:
        raise TakeoverError(f"--takeover needs the nfacct rules installed ({rules_problem})")
    first, second = takeover_pair(queue)
    return second if queues[0][-1] == first else first


def request_handover(control_path: str) -> dict:
    """Ask the predecessor to hand over and wait until it has exited; returns its tables."""
    answer = control.request(control_path, "handover", timeout=60)
    deadline = time.monotonic() + 10
    while os.path.exists(control_path) and time.monotonic() < deadline:
        time.sleep(0.01)  # the predecessor removes its control socket last, as it exits
    if os.path.exists(control_path):
        pid = answer.get("pid")
        raise TakeoverError(f"the daemon at {control_path} (pid {pid}) did not exit after handover")
    return answer["tables"]
