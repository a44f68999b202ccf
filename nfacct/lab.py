"""Throwaway test hosts: two network namespaces joined by a veth pair, plus traffic roles.

Used by the tests, the demo and the benchmark so that queue rules never touch the root
namespace. `acct` is the accounted host (10.77.0.1, fd77::1), `peer` the far end (10.77.0.2,
fd77::2). Names are unique per run; `close()` removes both namespaces and everything in them.

Traffic roles run as real processes: `python -m nfacct.lab ROLE ...` (see `roles`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence

ACCT_V4, PEER_V4 = "10.77.0.1", "10.77.0.2"
ACCT_V6, PEER_V6 = "fd77::1", "fd77::2"
_serial = itertools.count()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Lab:
    def __init__(self, prefix: str = "nfa") -> None:
        tag = f"{prefix}{os.getpid() % 100000}x{next(_serial)}"
        self.acct, self.peer = f"{tag}a", f"{tag}p"
        self._made: list[str] = []
        try:
            for ns in (self.acct, self.peer):
                _ip("netns", "add", ns)
                self._made.append(ns)
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
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.cmd(ns, argv), check=True, **kw)

    def role(self, ns: str, *args: str, **kw) -> subprocess.Popen:
        """Start a traffic role (see `roles`) as a process inside namespace `ns`."""
        kw.setdefault("stdin", subprocess.PIPE)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("text", True)
        return subprocess.Popen(self.cmd(ns, [sys.executable, "-m", "nfacct.lab", *args]), **kw)


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


# ---- traffic roles, each a real process -------------------------------------------------------


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _hold(args: argparse.Namespace, report: dict) -> None:
    print(json.dumps(report), flush=True)
    if args.hold:
        sys.stdin.read()  # stay alive until the parent closes our stdin


def role_echo_server(args: argparse.Namespace) -> None:
    fam = _family(args.bind)
    if args.proto == "udp":
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((args.bind, args.port))
        print(json.dumps({"ready": True}), flush=True)
        while True:
            data, addr = s.recvfrom(65535)
            s.sendto(data, addr)
    srv = socket.socket(fam, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.bind, args.port))
    srv.listen(128)
    print(json.dumps({"ready": True}), flush=True)

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def role_client(args: argparse.Namespace) -> None:
    fam = _family(args.connect)
    payload = b"n" * args.size
    if args.proto == "tcp":
        s = socket.socket(fam, socket.SOCK_STREAM)
        if args.sport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", args.sport))
        s.connect((args.connect, args.port))
        got = 0
        for _ in range(args.rounds):
            s.sendall(payload)
            need = len(payload)
            while need:
                chunk = s.recv(need)
                if not chunk:
                    raise SystemExit("server closed early")
                need -= len(chunk)
                got += len(chunk)
        s.close()
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM)
        if args.sport:
            s.bind(("", args.sport))
        s.settimeout(5)
        got = 0
        for _ in range(args.rounds):
            s.sendto(payload, (args.connect, args.port))
            got += len(s.recv(65535))
        s.close()
    _hold(args, {"pid": os.getpid(), "received": got})


def role_sink(args: argparse.Namespace) -> None:
    """A UDP server that only receives: netatop could never attribute this one."""
    s = socket.socket(_family(args.bind), socket.SOCK_DGRAM)
    s.bind((args.bind, args.port))
    print(json.dumps({"ready": True}), flush=True)
    got = 0
    for _ in range(args.count):
        got += len(s.recv(65535))
    _hold(args, {"pid": os.getpid(), "received": got})


def role_sender(args: argparse.Namespace) -> None:
    s = socket.socket(_family(args.connect), socket.SOCK_DGRAM)
    for _ in range(args.count):
        s.sendto(b"s" * args.size, (args.connect, args.port))
    _hold(args, {"pid": os.getpid(), "sent": args.count})


def roles(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nfacct.lab")
    sub = p.add_subparsers(dest="role", required=True)
    a = sub.add_parser("echo-server")
    a.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    a.add_argument("--bind", default="0.0.0.0")
    a.add_argument("--port", type=int, required=True)
    a = sub.add_parser("client")
    a.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    a.add_argument("--connect", required=True)
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--sport", type=int, default=0)
    a.add_argument("--size", type=int, default=1000)
    a.add_argument("--rounds", type=int, default=10)
    a.add_argument("--hold", action="store_true")
    a = sub.add_parser("sink")
    a.add_argument("--bind", default="0.0.0.0")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--count", type=int, required=True)
    a.add_argument("--hold", action="store_true")
    a = sub.add_parser("sender")
    a.add_argument("--connect", required=True)
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--count", type=int, default=10)
    a.add_argument("--size", type=int, default=200)
    a.add_argument("--hold", action="store_true")
    args = p.parse_args(argv)
    {"echo-server": role_echo_server, "client": role_client, "sink": role_sink, "sender": role_sender}[
        args.role
    ](args)


if __name__ == "__main__":
    roles()
