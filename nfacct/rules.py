"""The ruleset that feeds NFQUEUE: render, detect the backend, install, remove, show.

Two backends do the same job. `nft` is the native `queue` statement in table inet nfacct.
Kernels built without nft_queue (CONFIG_NFT_QUEUE unset) reject it, so `iptables-nft` installs
the xtables NFQUEUE target through nft_compat instead, in chains NFACCT_OUT/NFACCT_IN of the
ip and ip6 filter tables. Both skip packets carrying the daemon's own mark.

Each chain is: mark → return, a counting rule, the queue rule. The counting rule is the kernel's
own count of every packet sent towards the queue; the daemon compares it with what it received
to report packets that passed unaccounted (fail-open or no daemon bound). It is a rule of its
own so that a takeover can repoint the queue rule without resetting the count.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources

from . import netns

DEFAULT_QUEUE = 0
DAEMON_MARK = 0x6E666163  # "nfac": packets from the daemon's own sockets are not queued
NFT_TABLE = "nfacct"
IPT_CHAINS = (("OUTPUT", "NFACCT_OUT"), ("INPUT", "NFACCT_IN"))
IPT_TOOLS = ("iptables-nft", "ip6tables-nft")
IPT_FAMILIES = {"iptables-nft": "ip", "ip6tables-nft": "ip6"}
IPT_TOOL_OF = {family: tool for tool, family in IPT_FAMILIES.items()}
COUNT_COMMENT = "nfacct-queued"
IPT_QUEUE_RULENUM = 3  # mark → RETURN, count, NFQUEUE (the first queue rule)


class RulesError(Exception):
    """Installing, removing or showing the ruleset failed; the message is one line for the user."""


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


def render_nft(queue: int) -> str:
    template = resources.files("nfacct.data").joinpath("nfacct.nft").read_text()
    return template.replace("@QUEUE@", str(queue)).replace("@MARK@", hex(DAEMON_MARK))


def iptables_commands(tool: str, queue: int) -> list[list[str]]:
    """The commands that (re)build one family's compat chains, jumps excluded."""
    cmds = []
    for _builtin, chain in IPT_CHAINS:
        cmds += [
            [tool, "-w", "-A", chain, "-m", "mark", "--mark", hex(DAEMON_MARK), "-j", "RETURN"],
            [tool, "-w", "-A", chain, "-m", "comment", "--comment", COUNT_COMMENT],
            [tool, "-w", "-A", chain, *ipt_queue_target(queue)],
        ]
    return cmds


def takeover_pair(queue: int) -> tuple[int, int]:
    """The two queues a daemon configured for `queue` uses in turn, one per takeover."""
    return (queue, queue + 1) if queue < 65535 else (queue, queue - 1)


def ipt_queue_target(queue: int) -> list[str]:
    return ["-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"]


def _is_ours(rule: dict) -> bool:
    if rule["family"] == "inet":
        return rule["table"] == NFT_TABLE
    return rule["table"] == "filter" and rule["chain"] in {c for _b, c in IPT_CHAINS}


def _is_count_rule(rule: dict) -> bool:
    verdicts = ("queue", "accept", "return", "drop", "jump", "goto")
    return not any(
        any(v in e for v in verdicts) or e.get("xt", {}).get("type") == "target" for e in rule["expr"]
    ) and any("counter" in e for e in rule["expr"])


class Rules:
    """The nfacct ruleset of one network namespace (None: the namespace we run in)."""

    def __init__(self, netns_name: str | None = None):
        self.netns = netns_name
        if os.geteuid() != 0:
            raise RulesError("managing nftables rules needs root (CAP_NET_ADMIN); run with sudo")
        for tool in ("nft", *IPT_TOOLS):
            if shutil.which(tool) is None:
                package = "nftables" if tool == "nft" else "iptables"
                raise RulesError(f"{tool} not found: install the {package} package")
        if netns_name is not None:
            netns.netns_path(netns_name)  # raises NetnsError with a clear message

    def _run(
        self, argv: list[str], check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            netns.command(argv, self.netns), input=stdin, capture_output=True, text=True, check=False
        )
        if check and proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise RulesError(f"{' '.join(argv[:3])} failed: {detail[-1] if detail else proc.returncode}")
        return proc

    def native_queue_supported(self) -> bool:
        """Ask the kernel, without changing anything, whether it accepts `queue` (nft -c).

        The probe rule sits in a regular chain, not a base chain: even a check-only (-c)
        transaction registers a base chain's hooks until it aborts, and a hook list that
        changes under packets awaiting a verdict makes the kernel resume them at the wrong
        hook (measured on 6.18: a packet skipped a later chain's counter, another was queued
        twice). A running daemon must never see that because someone ran `rules show`.
        """
        probe = "table inet nfacct_probe {\n\tchain probe {\n\t\tqueue num 0 bypass\n\t}\n}\n"
        with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
            f.write(probe)
            f.flush()
            return self._run(["nft", "-c", "-f", f.name], check=False).returncode == 0

    def install(self, queue: int = DEFAULT_QUEUE, backend: str = "auto") -> str:
        """Install (or replace) the ruleset; idempotent. Returns the backend used."""
        if not 0 <= queue <= 65535:
            raise RulesError(f"queue number {queue} is out of range 0-65535")
        if backend == "auto":
            backend = "nft" if self.native_queue_supported() else "iptables-nft"
        if self._installed_as(backend, queue):
            # Leave complete rules alone: rebuilding would reset the counting rule and delete
            # the queue rule under packets a running daemon has not yet given a verdict.
            return backend
        if backend == "nft":
            self._remove_iptables()
            with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
                f.write(render_nft(queue))
                f.flush()
                self._run(["nft", "-f", f.name])
        elif backend == "iptables-nft":
            self._remove_native()
            self._install_iptables(queue)
        else:
            raise RulesError(f"unknown backend {backend!r}: use auto, nft or iptables-nft")
        return backend

    def _installed_as(self, backend: str, queue: int) -> bool:
        rules = self._our_rules()
        family_ok = (lambda f: f == "inet") if backend == "nft" else (lambda f: f in ("ip", "ip6"))
        chains = {(r["family"], r["chain"]) for r in rules if family_ok(r["family"]) and _is_count_rule(r)}
        queues = [(f, c, q) for f, c, _h, q in self.queue_rules() if family_ok(f)]
        expected = 2 if backend == "nft" else 4
        return (
            len(chains) == expected
            and len(queues) == expected
            and all(q == queue for *_fc, q in queues)
            and {(f, c) for f, c, _q in queues} == chains
        )

    def _install_iptables(self, queue: int) -> None:
        for tool in IPT_TOOLS:
            for _builtin, chain in IPT_CHAINS:
                if self._run([tool, "-w", "-S", chain], check=False).returncode == 0:
                    self._run([tool, "-w", "-F", chain])
                else:
                    self._run([tool, "-w", "-N", chain])
            for cmd in iptables_commands(tool, queue):
                self._run(cmd)
            for builtin, chain in IPT_CHAINS:
                if self._run([tool, "-w", "-C", builtin, "-j", chain], check=False).returncode != 0:
                    self._run([tool, "-w", "-I", builtin, "1", "-j", chain])

    def remove(self) -> None:
        """Remove every nfacct rule, chain and table we created; absent rules are not an error."""
        self._remove_native()
        self._remove_iptables()

    def _remove_native(self) -> None:
        if self._run(["nft", "list", "table", "inet", NFT_TABLE], check=False).returncode == 0:
            self._run(["nft", "delete", "table", "inet", NFT_TABLE])

    def _remove_iptables(self) -> None:
        for tool in IPT_TOOLS:
            for builtin, chain in IPT_CHAINS:
                while self._run([tool, "-w", "-C", builtin, "-j", chain], check=False).returncode == 0:
                    self._run([tool, "-w", "-D", builtin, "-j", chain])
                if self._run([tool, "-w", "-S", chain], check=False).returncode == 0:
                    self._run([tool, "-w", "-F", chain])
                    self._run([tool, "-w", "-X", chain])
            self._drop_table_if_empty(IPT_FAMILIES[tool], "filter")

    def _drop_table_if_empty(self, family: str, table: str) -> None:
        """iptables-nft leaves its table and base chains behind; drop them if they hold nothing."""
        listing = self._run(["nft", "-j", "list", "table", family, table], check=False)
        if listing.returncode != 0:
            return
        items = json.loads(listing.stdout)["nftables"]
        if any("rule" in item for item in items):
            return
        if any(item["chain"].get("policy", "accept") != "accept" for item in items if "chain" in item):
            return
        self._run(["nft", "delete", "table", family, table])

    def show(self) -> RulesState:
        supported = self.native_queue_supported()
        native = self._run(["nft", "list", "table", "inet", NFT_TABLE], check=False)
        if native.returncode == 0:
            return RulesState("nft", self._first_queue(), supported, native.stdout)
        listings = []
        for tool in IPT_TOOLS:
            family = IPT_FAMILIES[tool]
            for _builtin, chain in IPT_CHAINS:
                out = self._run(["nft", "list", "chain", family, "filter", chain], check=False)
                if out.returncode == 0:
                    listings.append(out.stdout)
        if listings:
            text = "".join(listings)
            return RulesState("iptables-nft", self._first_queue(), supported, text)
        return RulesState("none", None, supported, "")

    def _our_rules(self) -> list[dict]:
        listing = self._run(["nft", "-j", "list", "ruleset"])
        items = json.loads(listing.stdout)["nftables"]
        return [item["rule"] for item in items if "rule" in item and _is_ours(item["rule"])]

    def queued_packets(self) -> int | None:
        """The kernel's count of packets sent towards the queue since the rules were installed."""
        counts = [
            e["counter"]["packets"]
            for rule in self._our_rules()
            if _is_count_rule(rule)
            for e in rule["expr"]
            if "counter" in e
        ]
        return sum(counts) if counts else None

    def _first_queue(self) -> int | None:
        rules = self.queue_rules()
        return rules[0][-1] if rules else None

    def queue_rules(self) -> list[tuple[str, str, int | None, int]]:
        """(family, chain, handle, queue) of every queue rule, in chain order. iptables-nft's
        JSON does not show the xt target's queue number, so that backend reads `-S` instead
        (its handle is None)."""
        found = []
        for rule in self._our_rules():
            for e in rule["expr"]:
                if "queue" in e:
                    found.append((rule["family"], rule["chain"], rule["handle"], int(e["queue"]["num"])))
        for tool in IPT_TOOLS:
            for _builtin, chain in IPT_CHAINS:
                listing = self._run([tool, "-w", "-S", chain], check=False)
                for line in listing.stdout.splitlines():
                    words = line.split()
                    if "NFQUEUE" in words and "--queue-num" in words:
                        num = int(words[words.index("--queue-num") + 1])
                        found.append((IPT_FAMILIES[tool], chain, None, num))
        return found

    def add_queue(self, queue: int) -> None:
        """Put a rule for `queue` in front of the installed queue rules (no-op if already there).

        From then on every packet goes to `queue`; the rules behind it stay until
        `drop_queues_except`, so packets they queued earlier keep a live rule. Measured on
        kernel 6.18: deleting or replacing a queue rule while packets it queued await their
        verdict makes the kernel drop those packets on reinject, so a takeover inserts first
        and deletes only once the old queue is drained.
        """
        rules = self.queue_rules()
        if not rules:
            raise RulesError("no nfacct rules are installed: run `nfacct rules install` first")
        firsts: dict[tuple[str, str], tuple[int | None, int]] = {}
        for family, chain, handle, num in rules:
            firsts.setdefault((family, chain), (handle, num))
        script = ""
        for (family, chain), (handle, num) in firsts.items():
            if num == queue:
                continue
            if handle is None:
                self._run(
                    [IPT_TOOL_OF[family], "-w", "-I", chain, str(IPT_QUEUE_RULENUM), *ipt_queue_target(queue)]
                )
            else:
                script += f"insert rule inet {NFT_TABLE} {chain} position {handle} queue num {queue} bypass\n"
        self._nft_script(script)

    def drop_queues_except(self, queue: int) -> None:
        """Delete the queue rules that send to any queue but `queue`."""
        self._drop_queues(lambda num: num != queue)

    def drop_queue(self, queue: int) -> None:
        """Delete the queue rules that send to `queue` (undoes `add_queue`)."""
        self._drop_queues(lambda num: num == queue)

    def _drop_queues(self, doomed) -> None:
        script = ""
        for family, chain, handle, num in self.queue_rules():
            if not doomed(num):
                continue
            if handle is None:
                self._run([IPT_TOOL_OF[family], "-w", "-D", chain, *ipt_queue_target(num)])
            else:
                script += f"delete rule inet {NFT_TABLE} {chain} handle {handle}\n"
        self._nft_script(script)

    def _nft_script(self, script: str) -> None:
        if script:  # one transaction
            with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
                f.write(script)
                f.flush()
                self._run(["nft", "-f", f.name])
