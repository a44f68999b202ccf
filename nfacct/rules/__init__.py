"""The ruleset that feeds NFQUEUE, as callers see it: `Rules` of one namespace detects the
backend, installs, removes, shows, reads the counting rules and moves the queue rules for a
takeover.

Two backends do the same job. `nft` (rules/nft.py) is the native `queue` statement in table inet
nfacct. Kernels built without nft_queue (CONFIG_NFT_QUEUE unset) reject it, so `iptables-nft`
(rules/iptables.py) installs the xtables NFQUEUE target through nft_compat instead. Both skip
packets carrying the daemon's own mark; what they share is in rules/base.py.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from .. import netns
from .base import (
    DAEMON_MARK,
    FLOW_SET_SIZE,
    OFFLOAD_MARK,
    Backend,
    Namespace,
    QueueRule,
    RulesError,
    check_offload_mark,
)
from .iptables import IptablesBackend
from .nft import NftBackend

__all__ = [
    "DAEMON_MARK",
    "DEFAULT_QUEUE",
    "FLOW_SET_SIZE",
    "OFFLOAD_MARK",
    "QueueRule",
    "Rules",
    "RulesError",
    "RulesState",
    "takeover_pair",
]

DEFAULT_QUEUE = 0
PACKAGE_OF = {"nft": "nftables", "iptables-nft": "iptables", "ip6tables-nft": "iptables"}


def takeover_pair(queue: int) -> tuple[int, int]:
    """The two queues a daemon configured for `queue` uses in turn, one per takeover."""
    return (queue, queue + 1) if queue < 65535 else (queue, queue - 1)


@dataclass
class RulesState:
    backend: str  # "nft", "iptables-nft" or "none"
    queue: int | None
    native_queue_supported: bool
    ruleset: str  # the installed rules as `nft list` prints them

    def as_dict(self) -> dict:
        return {
            "backend": self.backend,
            "queue": self.queue,
            "native_queue_supported": self.native_queue_supported,
            "ruleset": self.ruleset,
        }


class Rules:
    """The nfacct ruleset of one network namespace (None: the namespace we run in); `path`, a
    file that enters it (nfacct.netns.Held), reaches it even once its name is gone."""

    def __init__(self, netns_name: str | None = None, path: str | None = None):
        self.netns = netns_name
        if os.geteuid() != 0:
            raise RulesError("managing nftables rules needs root (CAP_NET_ADMIN); run with sudo")
        for tool, package in PACKAGE_OF.items():
            if shutil.which(tool) is None:
                raise RulesError(f"{tool} not found: install the {package} package")
        if netns_name is not None:
            netns.netns_path(netns_name)  # raises NetnsError with a clear message
        self._ns = Namespace(netns_name, path)
        self._native = NftBackend(self._ns)
        # The native backend first: `show` and `queue_rules` look at it first, as they always have.
        self._backends: dict[str, Backend] = {b.name: b for b in (self._native, IptablesBackend(self._ns))}

    def has_flow_sets(self) -> bool:
        """Whether the installed ruleset has the flow sets (an nfacct before offload had none)."""
        return self._ns.has_flow_sets()

    def native_queue_supported(self) -> bool:
        """Whether the kernel accepts nft's `queue` statement; checked without changing anything."""
        return self._native.supported()

    def install(
        self, queue: int = DEFAULT_QUEUE, backend: str = "auto", offload_mark: int = OFFLOAD_MARK
    ) -> str:
        """Install (or replace) the ruleset; idempotent. Returns the backend used. `offload_mark`
        is the mark bit the iptables-nft backend needs (the native one needs none)."""
        if not 0 <= queue <= 65535:
            raise RulesError(f"queue number {queue} is out of range 0-65535")
        check_offload_mark(offload_mark)
        if backend == "auto":
            backend = "nft" if self.native_queue_supported() else "iptables-nft"
        chosen = self._backends.get(backend)
        if chosen is None:
            raise RulesError(f"unknown backend {backend!r}: use auto, nft or iptables-nft")
        if chosen.complete(queue):
            # Leave complete rules alone: rebuilding would reset the counting rule and delete
            # the queue rule under packets a running daemon has not yet given a verdict.
            return backend
        for other in self._backends.values():
            if other is not chosen:
                other.remove()
        chosen.install(queue, offload_mark)
        return backend

    def remove(self) -> None:
        """Remove every nfacct rule, chain and table we created; absent rules are not an error."""
        for backend in self._backends.values():
            backend.remove()

    def show(self) -> RulesState:
        supported = self.native_queue_supported()
        for backend in self._backends.values():
            listing = backend.listing()
            if listing:
                return RulesState(backend.name, self._first_queue(), supported, listing)
        return RulesState("none", None, supported, "")

    def queued_packets(self) -> int | None:
        """The kernel's count of packets sent towards the queue since the rules were installed."""
        rules = self._ns.rules()  # one reading for both backends
        counts = [
            e["counter"]["packets"]
            for backend in self._backends.values()
            for rule in backend.count_rules(rules)
            for e in rule["expr"]
            if "counter" in e
        ]
        return sum(counts) if counts else None

    def _first_queue(self) -> int | None:
        rules = self.queue_rules()
        return rules[0].queue if rules else None

    def queue_rules(self) -> list[QueueRule]:
        """(family, chain, handle, queue) of every queue rule, in chain order; the handle is None
        for iptables-nft rules."""
        return [rule for backend in self._backends.values() for rule in backend.queue_rules()]

    def add_queue(self, queue: int) -> None:
        """Put a rule for `queue` in front of the installed queue rules (no-op if already there).

        From then on every packet goes to `queue`; the rules behind it stay until
        `drop_queues_except`, so packets they queued earlier keep a live rule. Measured on
        kernel 6.18: deleting or replacing a queue rule while packets it queued await their
        verdict makes the kernel drop those packets on reinject, so a takeover inserts first
        and deletes only once the old queue is drained.
        """
        if not self.queue_rules():
            raise RulesError("no nfacct rules are installed: run `nfacct rules install` first")
        for backend in self._backends.values():
            backend.add_queue(queue)

    def drop_queues_except(self, queue: int) -> None:
        """Delete the queue rules that send to any queue but `queue`."""
        for backend in self._backends.values():
            backend.drop_queues(lambda num: num != queue)

    def drop_queue(self, queue: int) -> None:
        """Delete the queue rules that send to `queue` (undoes `add_queue`)."""
        for backend in self._backends.values():
            backend.drop_queues(lambda num: num == queue)
