"""`make demo` (`python -m lab.demo`): account sample traffic in a throwaway namespace pair and
print the result.

Everything happens inside two fresh network namespaces; the root namespace is never touched,
and the namespaces, rules, daemon and traffic processes are all gone when this exits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

from lab.daemon import Daemon
from lab.hosts import ACCT_V4, PEER_V4, PEER_V6, Lab, stop_all
from nfacct.display import print_status, print_tasks
from nfacct.rules import Rules


def main() -> int:
    started: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="nfacct-demo-") as tmp, Lab("nfdemo") as lab:
        rules = Rules(lab.acct)
        try:
            backend = rules.install()
            print(
                f"namespaces {lab.acct} (accounted, {ACCT_V4}) and {lab.peer} ({PEER_V4}); "
                f"queue rules via {backend}"
            )
            # Its warnings, if any, on our terminal; everything else is in `tmp`, removed at exit.
            daemon = Daemon(lab.acct, tmp, log=None)
            started.append(daemon.proc)

            def role(ns: str, *args: str) -> dict:
                p = lab.role(ns, *args)
                started.append(p)
                return json.loads(p.stdout.readline())

            role(lab.peer, "echo-server", "--bind", "::", "--port", "8000")
            role(lab.peer, "echo-server", "--proto", "udp", "--bind", "0.0.0.0", "--port", "8001")
            role(lab.acct, "echo-server", "--bind", "127.0.0.1", "--port", "8002")
            role(lab.acct, "sink", "--port", "8003", "--count", "25", "--hold")
            role(
                lab.acct,
                "client",
                "--connect",
                PEER_V4,
                "--port",
                "8000",
                "--size",
                "100000",
                "--rounds",
                "30",
                "--hold",
            )
            role(
                lab.acct,
                "client",
                "--connect",
                PEER_V6,
                "--port",
                "8000",
                "--size",
                "20000",
                "--rounds",
                "10",
                "--hold",
            )
            role(
                lab.acct,
                "client",
                "--proto",
                "udp",
                "--connect",
                PEER_V4,
                "--port",
                "8001",
                "--size",
                "512",
                "--rounds",
                "40",
                "--hold",
            )
            role(
                lab.acct,
                "client",
                "--connect",
                "127.0.0.1",
                "--port",
                "8002",
                "--size",
                "4096",
                "--rounds",
                "50",
                "--hold",
            )
            role(lab.peer, "sender", "--connect", ACCT_V4, "--port", "8003", "--count", "25", "--hold")
            time.sleep(0.5)
            print_tasks(daemon.request("top")["tasks"])
            print_status(daemon.request("status"))
            print("Try it on a host: see README.md (nfacct rules install; nfacct run; nfacct top).")
        finally:
            stop_all(started)
            rules.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
