"""The iptables-nft backend, for kernels built without nft_queue: the xtables NFQUEUE target
through nft_compat, in chains NFACCT_OUT/NFACCT_IN of the ip and ip6 filter tables, jumped to
from OUTPUT/INPUT. Changes go through iptables-nft and ip6tables-nft, one rule at a time.

The flow sets live in table inet nfacct (rules/offload.nft), whose chains run just before
these and mark the packets they count with one bit; the NFACCT chains return on that bit.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

from .base import COUNT_COMMENT, DAEMON_MARK, TABLE, Backend, QueueRule, first_per_chain, render

TOOLS = {"ip": "iptables-nft", "ip6": "ip6tables-nft"}  # by nft family
CHAINS = (("OUTPUT", "NFACCT_OUT"), ("INPUT", "NFACCT_IN"))
OURS = {chain for _builtin, chain in CHAINS}
OFFLOAD_CHAINS = ("offload_output", "offload_input")  # in table inet nfacct
QUEUE_RULENUM = 4  # daemon's mark → RETURN, offload bit → RETURN, count, NFQUEUE (the first queue rule)


def queue_target(queue: int) -> list[str]:
    return ["-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"]


class IptablesBackend(Backend):
    name = "iptables-nft"
    chains = 4  # NFACCT_OUT and NFACCT_IN, in ip and in ip6

    def _run(self, family: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.ns.run([TOOLS[family], "-w", *args], check=check)

    def _succeeds(self, family: str, *args: str) -> bool:
        return self._run(family, *args, check=False).returncode == 0

    def owns(self, rule: dict) -> bool:
        return rule["family"] in TOOLS and rule["table"] == "filter" and rule["chain"] in OURS

    def install(self, queue: int, offload_mark: int) -> None:
        self.ns.nft(render("offload.nft", BIT=offload_mark, CLEAR=0xFFFFFFFF & ~offload_mark))
        bit = f"{offload_mark:#x}/{offload_mark:#x}"
        for family in TOOLS:
            for _builtin, chain in CHAINS:
                self._run(family, "-F" if self._succeeds(family, "-S", chain) else "-N", chain)
            for _builtin, chain in CHAINS:
                self._run(family, "-A", chain, "-m", "mark", "--mark", hex(DAEMON_MARK), "-j", "RETURN")
                self._run(family, "-A", chain, "-m", "mark", "--mark", bit, "-j", "RETURN")
                self._run(family, "-A", chain, "-m", "comment", "--comment", COUNT_COMMENT)
                self._run(family, "-A", chain, *queue_target(queue))
            for builtin, chain in CHAINS:
                if not self._succeeds(family, "-C", builtin, "-j", chain):
                    self._run(family, "-I", builtin, "1", "-j", chain)

    def remove(self) -> None:
        for family in TOOLS:
            for builtin, chain in CHAINS:
                while self._succeeds(family, "-C", builtin, "-j", chain):
                    self._run(family, "-D", builtin, "-j", chain)
                if self._succeeds(family, "-S", chain):
                    self._run(family, "-F", chain)
                    self._run(family, "-X", chain)
            self._drop_table_if_empty(family)
        if self._offload_installed():  # the table may be the native backend's
            self.ns.run(["nft", "delete", "table", "inet", TABLE])

    def _offload_installed(self) -> bool:
        return any(
            item["chain"]["table"] == TABLE and item["chain"]["name"] in OFFLOAD_CHAINS
            for item in self.ns.items()
            if "chain" in item and item["chain"]["family"] == "inet"
        )

    def _drop_table_if_empty(self, family: str) -> None:
        """iptables-nft leaves its table and base chains behind; drop them if they hold nothing."""
        listing = self.ns.run(["nft", "-j", "list", "table", family, "filter"], check=False)
        if listing.returncode != 0:
            return
        items = json.loads(listing.stdout)["nftables"]
        if any("rule" in item for item in items):
            return
        if any(item["chain"].get("policy", "accept") != "accept" for item in items if "chain" in item):
            return
        self.ns.run(["nft", "delete", "table", family, "filter"])

    def listing(self) -> str:
        shown = [
            self.ns.run(["nft", "list", "chain", family, "filter", chain], check=False)
            for family in TOOLS
            for _builtin, chain in CHAINS
        ]
        if not any(out.returncode == 0 for out in shown):
            return ""
        offload = self.ns.table_listing() if self._offload_installed() else ""
        return offload + "".join(out.stdout for out in shown if out.returncode == 0)

    def queue_rules(self) -> list[QueueRule]:
        """iptables-nft's JSON does not show the xt target's queue number, so this reads `-S`."""
        found = []
        for family in TOOLS:
            for _builtin, chain in CHAINS:
                for line in self._run(family, "-S", chain, check=False).stdout.splitlines():
                    words = line.split()
                    if "NFQUEUE" in words and "--queue-num" in words:
                        num = int(words[words.index("--queue-num") + 1])
                        found.append(QueueRule(family, chain, None, num))
        return found

    def add_queue(self, queue: int) -> None:
        for first in first_per_chain(self.queue_rules()):
            if first.queue != queue:
                self._run(first.family, "-I", first.chain, str(QUEUE_RULENUM), *queue_target(queue))

    def drop_queues(self, doomed: Callable[[int], bool]) -> None:
        for rule in self.queue_rules():
            if doomed(rule.queue):
                self._run(rule.family, "-D", rule.chain, *queue_target(rule.queue))
