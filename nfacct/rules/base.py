"""What both backends share: running commands in the namespace, nft's JSON view of its rules, and
the small interface a backend implements.

Each chain a backend installs is: mark → return, a counting rule, the queue rule. The counting
rule is the kernel's own count of every packet sent towards the queue; the daemon compares it with
what it received to report packets that passed unaccounted (fail-open or no daemon bound). It is a
rule of its own so that a takeover can repoint the queue rule without resetting the count.
"""

from __future__ import annotations

import json
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable
from importlib import resources
from typing import NamedTuple

from .. import netns

DAEMON_MARK = 0x6E666163  # "nfac": packets from the daemon's own sockets are not queued
COUNT_COMMENT = "nfacct-queued"
TABLE = "nfacct"  # table inet nfacct: the flow sets, and the native backend's chains
FLOW_SETS = ("out4", "in4", "out6", "in6")
# Elements per set: 262,144 flows of a family at once. With `flags dynamic` the kernel grows the
# hash as they come (100 KiB for an empty set, measured on 6.18).
FLOW_SET_SIZE = 262_144
# The mark bit the iptables-nft backend gives packets of offloaded flows (its NFQUEUE chains skip
# them); one bit, masked, so that other users of the mark keep theirs. `--offload-mark` moves it.
OFFLOAD_MARK = 0x10000000
VERDICTS = ("queue", "accept", "return", "drop", "jump", "goto")


class RulesError(Exception):
    """Installing, removing or showing the ruleset failed; the message is one line for the user."""


class QueueRule(NamedTuple):
    family: str
    chain: str
    handle: int | None  # None for iptables-nft, which addresses its rules by position
    queue: int


def _reason(proc: subprocess.CompletedProcess) -> str:
    """The line that says what went wrong: nft ends its report with the rule and a caret line
    (`^^^^^`) under the culprit, so its `Error:` line is the one to show (without the
    `/dev/stdin:3:2-6:` position, which names no file the user has)."""
    lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
    errors = [line.split("Error:", 1)[1].strip() for line in lines if "Error:" in line]
    return (errors or lines or [f"exit status {proc.returncode}"])[-1]


class Namespace:
    """Runs commands in one network namespace (None: the namespace we run in)."""

    def __init__(self, name: str | None, path: str | None = None):
        self.name = name
        self.path = path  # a file that enters the namespace (nfacct.netns.Held), used instead of the name

    def run(
        self, argv: list[str], check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            netns.command(argv, self.name, self.path),
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RulesError(f"{' '.join(argv[:3])} failed: {_reason(proc)}")
        return proc

    def succeeds(self, argv: list[str]) -> bool:
        return self.run(argv, check=False).returncode == 0

    def nft(self, script: str) -> None:
        """Apply an nft script, given on stdin, as one transaction; an empty one is nothing to do."""
        if script:
            self.run(["nft", "-f", "-"], stdin=script)

    def items(self) -> list[dict]:
        """The namespace's ruleset as `nft -j list ruleset` describes it, without set elements
        (`-t`): 100,000 flows would make it 10.8 MB and 1.84 s (FACTS.md)."""
        return json.loads(self.run(["nft", "-t", "-j", "list", "ruleset"]).stdout)["nftables"]

    def rules(self) -> list[dict]:
        """Every rule in the namespace."""
        return [item["rule"] for item in self.items() if "rule" in item]

    def table_listing(self) -> str:
        """table inet nfacct as `nft list` prints it, without set elements; empty if absent."""
        shown = self.run(["nft", "-t", "list", "table", "inet", TABLE], check=False)
        return shown.stdout if shown.returncode == 0 else ""

    def has_flow_sets(self) -> bool:
        sets = {
            item["set"]["name"]
            for item in self.items()
            if "set" in item and item["set"]["family"] == "inet" and item["set"]["table"] == TABLE
        }
        return sets >= set(FLOW_SETS)


def render(template: str, **values: int) -> str:
    """A ruleset file of rules/ (the package data nfacct.data) with its @NAME@ placeholders
    filled (marks in hex); @SETS@ is flowsets.nft, the flow sets both backends install.
    rules/install.sh fills the same files the same way, for hosts without Python."""
    data = resources.files("nfacct.data")
    text = data.joinpath(template).read_text()
    text = text.replace("@SETS@", data.joinpath("flowsets.nft").read_text().rstrip("\n"))
    for name, value in {"SIZE": FLOW_SET_SIZE, **values}.items():
        text = text.replace(f"@{name}@", str(value) if name in ("SIZE", "QUEUE") else hex(value))
    return text


def check_offload_mark(bit: int) -> None:
    if bit <= 0 or bit > 0xFFFFFFFF or bit & (bit - 1):
        raise RulesError(f"offload mark {bit:#x} must be a single bit of the 32-bit mark, such as 0x10000000")
    if bit & DAEMON_MARK:
        raise RulesError(f"offload mark {bit:#x} overlaps the daemon's own mark {DAEMON_MARK:#x}")


def is_count_rule(rule: dict) -> bool:
    """A rule that counts and decides nothing (an xt target, such as NFQUEUE, is a verdict too)."""
    return not any(
        any(v in e for v in VERDICTS) or e.get("xt", {}).get("type") == "target" for e in rule["expr"]
    ) and any("counter" in e for e in rule["expr"])


def first_per_chain(rules: list[QueueRule]) -> list[QueueRule]:
    """The queue rule each chain reaches first, the one that takes its packets."""
    firsts: dict[tuple[str, str], QueueRule] = {}
    for rule in rules:
        firsts.setdefault((rule.family, rule.chain), rule)
    return list(firsts.values())


class Backend(ABC):
    """One way of installing the queue rules; the face (`Rules`) picks one and moves queues."""

    name: str  # as `--backend` and `rules show` call it
    chains: int  # how many chains a complete install has, each with one counting and one queue rule

    def __init__(self, ns: Namespace):
        self.ns = ns

    @abstractmethod
    def owns(self, rule: dict) -> bool:
        """Whether a rule of `Namespace.rules()` is in one of this backend's chains."""

    @abstractmethod
    def install(self, queue: int, offload_mark: int) -> None:
        """Build the chains and flow sets afresh, sending to `queue`; the caller has removed the
        other backend."""

    @abstractmethod
    def remove(self) -> None:
        """Remove this backend's rules and chains; absent ones are not an error."""

    @abstractmethod
    def listing(self) -> str:
        """This backend's chains as `nft list` prints them; empty when none is installed."""

    @abstractmethod
    def queue_rules(self) -> list[QueueRule]:
        """Every queue rule, in chain order."""

    @abstractmethod
    def add_queue(self, queue: int) -> None:
        """Put a rule for `queue` in front of each chain's queue rules, unless it is there already."""

    @abstractmethod
    def drop_queues(self, doomed: Callable[[int], bool]) -> None:
        """Delete the queue rules whose queue number is doomed."""

    def count_rules(self, rules: list[dict]) -> list[dict]:
        """This backend's counting rules among `rules` (read once by the caller)."""
        return [rule for rule in rules if self.owns(rule) and is_count_rule(rule)]

    def complete(self, queue: int) -> bool:
        """Every chain holds a counting rule and exactly one queue rule, and it sends to `queue`."""
        counted = {(rule["family"], rule["chain"]) for rule in self.count_rules(self.ns.rules())}
        queues = self.queue_rules()
        return (
            self.ns.has_flow_sets()
            and len(counted) == self.chains
            and len(queues) == self.chains
            and all(rule.queue == queue for rule in queues)
            and {(rule.family, rule.chain) for rule in queues} == counted
        )
