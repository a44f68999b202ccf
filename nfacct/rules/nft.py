"""The native backend: table inet nfacct (rules/nfacct.nft) with the flow sets and nft's own
`queue` statement. Kernels built without nft_queue (CONFIG_NFT_QUEUE unset) reject that statement.

Every change is an nft script on stdin, one transaction each.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import DAEMON_MARK, TABLE, Backend, QueueRule, first_per_chain, render

CHAINS = ("output", "input")
PROBE = "table inet nfacct_probe {\n\tchain probe {\n\t\tqueue num 0 bypass\n\t}\n}\n"


class NftBackend(Backend):
    name = "nft"
    chains = 2  # output, input

    def supported(self) -> bool:
        """Ask the kernel, without changing anything, whether it accepts `queue` (nft -c).

        The probe rule sits in a regular chain, not a base chain: even a check-only (-c)
        transaction registers a base chain's hooks until it aborts, and a hook list that
        changes under packets awaiting a verdict makes the kernel resume them at the wrong
        hook (measured on 6.18: a packet skipped a later chain's counter, another was queued
        twice). A running daemon must never see that because someone ran `rules show`.
        """
        return self.ns.run(["nft", "-c", "-f", "-"], check=False, stdin=PROBE).returncode == 0

    def owns(self, rule: dict) -> bool:
        return rule["family"] == "inet" and rule["table"] == TABLE and rule["chain"] in CHAINS

    def install(self, queue: int, offload_mark: int) -> None:
        # The mark bit is the iptables-nft backend's bridge; here one chain does both jobs.
        self.ns.nft(render("nfacct.nft", QUEUE=queue, MARK=DAEMON_MARK))

    def _installed(self) -> bool:
        return any(self.owns(rule) for rule in self.ns.rules())

    def remove(self) -> None:
        if self._installed():  # the table may be the iptables-nft backend's (its flow sets)
            self.ns.run(["nft", "delete", "table", "inet", TABLE])

    def listing(self) -> str:
        return self.ns.table_listing() if self._installed() else ""

    def queue_rules(self) -> list[QueueRule]:
        return [
            QueueRule(rule["family"], rule["chain"], rule["handle"], int(e["queue"]["num"]))
            for rule in self.ns.rules()
            if self.owns(rule)
            for e in rule["expr"]
            if "queue" in e
        ]

    def add_queue(self, queue: int) -> None:
        self.ns.nft(
            "".join(
                f"insert rule inet {TABLE} {first.chain} position {first.handle} queue num {queue} bypass\n"
                for first in first_per_chain(self.queue_rules())
                if first.queue != queue
            )
        )

    def drop_queues(self, doomed: Callable[[int], bool]) -> None:
        self.ns.nft(
            "".join(
                f"delete rule inet {TABLE} {rule.chain} handle {rule.handle}\n"
                for rule in self.queue_rules()
                if doomed(rule.queue)
            )
        )
