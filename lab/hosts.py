"""Throwaway test hosts: two network namespaces joined by a veth pair.

Used by the tests, the demo and the benchmark so that queue rules never touch the root
namespace. `acct` is the accounted host (10.77.0.1, fd77::1), `peer` the far end (10.77.0.2,
fd77::2). Names are unique per run; `close()` removes both namespaces and everything in them.

Traffic roles (lab/roles.py) run as real processes inside either namespace: `Lab.role`.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ACCT_V4, PEER_V4 = "10.77.0.1", "10.77.0.2"
ACCT_V6, PEER_V6 = "fd77::1", "fd77::2"
# The checkout holding `lab/`: on the PYTHONPATH of every process a Lab runs, so that
# `python3 -m lab.roles ROLE` works from any directory (lab is not installed with nfacct).
ROOT = str(Path(__file__).resolve().parent.parent)
_serial = itertools.count()


class NeedsRoot(PermissionError):
    """A lab needs root: it creates network namespaces (the tests turn this into a skip)."""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def lab_env() -> dict[str, str]:
    """Our environment with the checkout first on PYTHONPATH."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": ROOT if not path else ROOT + os.pathsep + path}


class Lab:
    def __init__(self, prefix: str = "nfa") -> None:
        if os.geteuid() != 0:
            raise NeedsRoot("a lab needs root: it creates network namespaces")
        tag = f"{prefix}{os.getpid() % 100000}x{next(_serial)}"
        self.acct, self.peer = f"{tag}a", f"{tag}p"
        self._made: list[str] = []
        try:
            for ns in (self.acct, self.peer):
                _ip("netns", "add", ns)
                self._made.append(ns)
                # No router solicitations: the only traffic in a lab is the traffic a test makes.
                # No DAD delay and MLD reports within a millisecond: link-up chatter ends at once.
                knobs = ("router_solicitations 0", "accept_dad 0", "mldv1_unsolicited_report_interval 1")
                knobs += ("mldv2_unsolicited_report_interval 1",)
                script = "; ".join(
                    f"echo {value} > /proc/sys/net/ipv6/conf/{conf}/{knob}"
                    for conf in ("default", "all")
                    for knob, value in (k.split() for k in knobs)
                )
                _ip("netns", "exec", ns, "sh", "-c", script)
                _ip("-n", ns, "link", "set", "lo", "up")
            # veth names are per namespace once moved, so they need not be unique.
            _ip(
                "-n",
                self.acct,
                "link",
                "add",
                "veth0",
                "type",
                "veth",
                "peer",
                "name",
                "veth1",
                "netns",
                self.peer,
            )
            for ns, dev, v4, v6 in (
                (self.acct, "veth0", ACCT_V4, ACCT_V6),
                (self.peer, "veth1", PEER_V4, PEER_V6),
            ):
                _ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
                _ip("-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
                _ip("-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        while self._made:
            subprocess.run(["ip", "netns", "del", self._made.pop()], capture_output=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def cmd(self, ns: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run `argv` inside namespace `ns` to completion (`python3 -m lab.roles ...` works)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("env", lab_env())
        return subprocess.run(self.cmd(ns, argv), check=True, **kw)

    def wait_listening(self, ns: str, proto: str, port: int, within: float = 10.0) -> None:
        """Until a socket listens on `port` in `ns` (`ss`): a client started earlier is refused."""
        flag = "-tln" if proto == "tcp" else "-uln"
        deadline = time.monotonic() + within
        while not self.run(ns, ["ss", "-H", flag, f"sport = :{port}"]).stdout.strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {proto} port {port} in {ns} after {within:g} s")
            time.sleep(0.05)

    def role(self, ns: str, *args: str, **kw) -> subprocess.Popen:
        """Start a traffic role (lab/roles.py) as a process inside namespace `ns`."""
        kw.setdefault("stdin", subprocess.PIPE)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("text", True)
        kw.setdefault("env", lab_env())
        return subprocess.Popen(self.cmd(ns, [sys.executable, "-m", "lab.roles", *args]), **kw)


def stop_all(procs: Sequence[subprocess.Popen]) -> None:
    """End processes newest first: SIGTERM, then SIGKILL after 5 s."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class Counters:
    """nft counter rules in one namespace: the kernel's own, independent count of chosen flows."""

    TABLE = "nfacct_test"

    def __init__(self, lab: Lab, ns: str) -> None:
        self.lab, self.ns = lab, ns
        script = (
            f"table inet {self.TABLE} {{\n"
            "  chain out { type filter hook output priority 10; policy accept; }\n"
            "  chain in { type filter hook input priority 10; policy accept; }\n"
            "}\n"
        )
        lab.run(ns, ["nft", "-f", "-"], input=script)

    def add(self, name: str, chain: str, match: str) -> None:
        """Count packets matching `match` (nft syntax) in chain `out` or `in` under `name`."""
        lab_rule = f'add rule inet {self.TABLE} {chain} {match} counter comment "{name}"\n'
        self.lab.run(self.ns, ["nft", "-f", "-"], input=lab_rule)

    def read(self) -> dict[str, tuple[int, int]]:
        out = self.lab.run(self.ns, ["nft", "-j", "list", "table", "inet", self.TABLE]).stdout
        result = {}
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if rule and "comment" in rule:
                c = next(e["counter"] for e in rule["expr"] if "counter" in e)
                result[rule["comment"]] = (c["packets"], c["bytes"])
        return result
