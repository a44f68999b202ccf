"""`make demo` (`python -m lab.demo`): programs everyone knows make traffic in a throwaway
namespace pair, and nfacct says who did what.

In the accounted namespace: `curl` fetches a file three times from `python3 -m http.server`
(both ends on loopback, so both are counted), `iperf3` sends 2 s of TCP at 50 Mbit/s to a server
in the peer namespace, `socat` exchanges 20 UDP datagrams with an echo server there, and `ping`
sends 4 echo requests (ICMP: counted per protocol in `status`, not per process). The table is
the daemon's `top`, exited processes included.

Everything happens inside two fresh network namespaces; the root namespace is never touched,
and the namespaces, rules, daemon and every process started here are gone when this exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.daemon import Daemon
from lab.hosts import ACCT_V4, PEER_V4, Lab, stop_all
from nfacct.display import print_status, print_tasks
from nfacct.rules import Rules
from nfacct.service import FRESH

HTTP, IPERF, ECHO = 8080, 5201, 9000


def main() -> int:
    started: list[subprocess.Popen] = []
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    with tempfile.TemporaryDirectory(prefix="nfacct-demo-") as tmp, Lab("nfdemo") as lab:
        rules = Rules(lab.acct)
        try:
            backend = rules.install()
            print(
                f"namespaces {lab.acct} (accounted, {ACCT_V4}) and {lab.peer} ({PEER_V4}); "
                f"queue rules via {backend}"
            )
            # Its warnings, if any, on our terminal; everything else is in `tmp`, removed at exit.
            # A long GC cycle: the clients below have exited by the time the table is shown.
            daemon = Daemon(lab.acct, tmp, "--gc-cycle", "120", log=None)
            started.append(daemon.proc)
            www = Path(tmp, "www")
            www.mkdir()
            (www / "file").write_bytes(os.urandom(1 << 20))

            def server(ns: str, argv: list[str], proto: str, port: int) -> None:
                started.append(subprocess.Popen(lab.cmd(ns, argv), **quiet))
                lab.wait_listening(ns, proto, port)

            http = ["python3", "-m", "http.server", str(HTTP), "--bind", "127.0.0.1", "--directory", str(www)]
            server(lab.acct, http, "tcp", HTTP)
            server(lab.peer, ["iperf3", "-s", "-1", "-p", str(IPERF)], "tcp", IPERF)
            server(lab.peer, ["socat", f"UDP4-RECVFROM:{ECHO},fork", "PIPE"], "udp", ECHO)
            print("3 curl from python3 -m http.server, iperf3 for 2 s, socat over UDP, ping: about 4 s")
            clients = [
                ["iperf3", "-c", PEER_V4, "-p", str(IPERF), "-t", "2", "-b", "50M"],
                ["ping", "-c", "4", "-i", "0.2", PEER_V4],
                *[["curl", "-sS", "-o", "/dev/null", f"http://127.0.0.1:{HTTP}/file"]] * 3,
            ]
            running = [subprocess.Popen(lab.cmd(lab.acct, argv), **quiet) for argv in clients]
            started += running
            udp = ["socat", "-b", "512", "-t", "0.5", "STDIO", f"UDP4:{PEER_V4}:{ECHO}"]
            lab.run(lab.acct, udp, input=os.urandom(20 * 512), text=False)
            for p in running:
                if p.wait(timeout=30) != 0:
                    raise RuntimeError(f"{' '.join(p.args[4:])} failed with status {p.returncode}")
            # Their last packets' owners are found, and the flow sets read after the last packet:
            # `top` shows offloaded flows' counters up to FRESH seconds old.
            time.sleep(FRESH + 0.2)
            print_tasks(daemon.request("top")["tasks"])
            print_status(daemon.request("status"))
            print("ping's packets are the icmp lines: ICMP is counted per protocol, not per process.")
            print("Try it on a host: see README.md (nfacct rules install; nfacct run; nfacct top).")
        finally:
            stop_all(started)
            rules.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
