"""The ruleset that feeds NFQUEUE: render, detect the backend, install, remove, show.

Two backends do the same job. `nft` is the native `queue` statement in table inet nfacct.
Kernels built without nft_queue (CONFIG_NFT_QUEUE unset) reject it, so `iptables-nft` installs
the xtables NFQUEUE target through nft_compat instead, in chains NFACCT_OUT/NFACCT_IN of the
ip and ip6 filter tables. Both skip packets carrying the daemon's own mark.
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
            [tool, "-w", "-A", chain, "-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"],
        ]
    return cmds


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
        """Ask the kernel, without changing anything, whether it accepts `queue` (nft -c)."""
        with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
            f.write(render_nft(DEFAULT_QUEUE).replace(f"table inet {NFT_TABLE}", "table inet nfacct_probe"))
            f.flush()
            return self._run(["nft", "-c", "-f", f.name], check=False).returncode == 0

    def install(self, queue: int = DEFAULT_QUEUE, backend: str = "auto") -> str:
        """Install (or replace) the ruleset; idempotent. Returns the backend used."""
        if not 0 <= queue <= 65535:
            raise RulesError(f"queue number {queue} is out of range 0-65535")
        if backend == "auto":
            backend = "nft" if self.native_queue_supported() else "iptables-nft"
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

    def _queue_of(self, text: str) -> int | None:
        for line in text.splitlines():
            words = line.split()
            if "queue" in words and "num" in words:
                return int(words[words.index("num") + 1].split("-")[0])
        return None

    def show(self) -> RulesState:
        supported = self.native_queue_supported()
        native = self._run(["nft", "list", "table", "inet", NFT_TABLE], check=False)
        if native.returncode == 0:
            return RulesState("nft", self._queue_of(native.stdout), supported, native.stdout)
        listings = []
        for tool in IPT_TOOLS:
            family = IPT_FAMILIES[tool]
            for _builtin, chain in IPT_CHAINS:
                out = self._run(["nft", "list", "chain", family, "filter", chain], check=False)
                if out.returncode == 0:
                    listings.append(out.stdout)
        if listings:
            text = "".join(listings)
            return RulesState("iptables-nft", self._queue_of(text), supported, text)
        return RulesState("none", None, supported, "")
