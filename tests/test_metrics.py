"""Prometheus metrics (`nfacct run --metrics`): a real Prometheus server scrapes a real daemon.

The end-to-end test's figures come from three independent places that must agree: arithmetic on
the datagrams a process sends, the kernel's nft counter rules, and nfacct's own `top`; Prometheus,
asked over its HTTP API, must hold the same totals, also after the processes exited and the
daemon's GC forgot them. The others cover the fold, hostile names, the endpoint's bounds and
its one-line errors.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import count_port, free_port, kernel, until
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lab.daemon import Daemon
from lab.hosts import PEER_V4
from nfacct import scrape
from nfacct.cli import HANDED_OVER
from nfacct.faults import Faults
from nfacct.metrics import OVER_LIMIT, Aggregates, Collector, Frozen, Health
from nfacct.tables import COUNTER_NAMES

# A process name with a byte that is not UTF-8, an escape sequence, a quote, a backslash and a
# newline (15 bytes at most: the kernel's comm), and its label value (`text.escape`: backslash
# escapes for what is not printable; the exposition format escapes quote, backslash and newline
# itself, and Prometheus takes them back).
HOSTILE = b'nf\xff\x1b[7m\n"\\'
HOSTILE_LABEL = 'nf\\xff\\x1b[7m\\n"\\'


def tcp_port() -> int:
    """A loopback port free right now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def task(pid: int, comm: str, counts: list[int], uid: int = 0, cgroup: str = "/a") -> dict:
    return {"pid": pid, "btime": 100.0 + pid, "comm": comm, "uid": uid, "cgroup": cgroup} | dict(
        zip(COUNTER_NAMES, counts, strict=True)
    )


# ---- the fold, pure ------------------------------------------------------------------------


def test_the_fold_sums_processes_keeps_the_exited_and_follows_an_exec():
    agg = Aggregates()
    agg.fold([task(1, "curl", [1, 100, 2, 200, 0, 0, 0, 0]), task(2, "curl", [3, 300, 0, 0, 0, 0, 0, 0])])
    assert agg.totals == {("curl", "0", "/a", ""): [4, 400, 2, 200, 0, 0, 0, 0]}
    # pid 1 goes on; pid 2 exited and the GC dropped it; pid 3 appears; pid 1 exec'd into wget
    agg.fold([task(1, "wget", [5, 500, 2, 200, 1, 50, 0, 0]), task(3, "curl", [0, 0, 0, 0, 0, 0, 7, 70])])
    assert agg.totals == {
        ("curl", "0", "/a", ""): [4, 400, 2, 200, 0, 0, 7, 70],
        ("wget", "0", "/a", ""): [4, 400, 0, 0, 1, 50, 0, 0],
    }
    # a new process with a reused pid (another btime) counts from zero
    agg.fold([task(1, "wget", [5, 500, 2, 200, 1, 50, 0, 0]) | {"btime": 999.0}])
    assert agg.totals[("wget", "0", "/a", "")] == [9, 900, 2, 200, 2, 100, 0, 0]


def test_tasks_the_daemon_starts_with_count_from_then():
    agg = Aggregates()
    agg.baseline([task(1, "sshd", [10, 1000, 10, 1000, 0, 0, 0, 0])])
    agg.fold([task(1, "sshd", [12, 1200, 10, 1000, 0, 0, 0, 0])])
    assert agg.totals == {("sshd", "0", "/a", ""): [2, 200, 0, 0, 0, 0, 0, 0]}


def test_label_sets_beyond_the_limit_count_together():
    agg = Aggregates(limit=2)
    agg.fold([task(p, f"c{p}", [p, 10 * p, 0, 0, 0, 0, 0, 0]) for p in (1, 2, 3, 4)])
    agg.fold([task(p, f"c{p}", [2 * p, 20 * p, 0, 0, 0, 0, 0, 0]) for p in (1, 2, 3, 4)])
    assert agg.totals == {
        ("c1", "0", "/a", ""): [2, 20, 0, 0, 0, 0, 0, 0],
        ("c2", "0", "/a", ""): [4, 40, 0, 0, 0, 0, 0, 0],
        (OVER_LIMIT,) * 4: [14, 140, 0, 0, 0, 0, 0, 0],
    }


def test_the_unit_label_follows_the_cgroup_and_adds_no_label_set():
    docker = "/system.slice/docker-" + "c0" * 32 + ".scope"
    agg = Aggregates(limit=3)
    agg.fold(
        [
            task(1, "nginx", [1, 10, 0, 0, 0, 0, 0, 0], cgroup="/system.slice/nginx.service"),
            task(2, "curl", [2, 20, 0, 0, 0, 0, 0, 0], cgroup=docker),
            task(3, "curl", [3, 30, 0, 0, 0, 0, 0, 0], cgroup=docker + "/init.scope"),
            task(4, "sh", [4, 40, 0, 0, 0, 0, 0, 0], cgroup="/"),
        ]
    )
    assert agg.totals == {
        ("nginx", "0", "/system.slice/nginx.service", "nginx.service"): [1, 10, 0, 0, 0, 0, 0, 0],
        ("curl", "0", docker, "docker:c0c0c0c0c0c0"): [2, 20, 0, 0, 0, 0, 0, 0],
        ("curl", "0", docker + "/init.scope", "docker:c0c0c0c0c0c0"): [3, 30, 0, 0, 0, 0, 0, 0],
        (OVER_LIMIT,) * 4: [4, 40, 0, 0, 0, 0, 0, 0],  # the limit holds, unit included
    }


def render(totals: dict) -> bytes:
    health = Health(0, {}, {}, None, None, 0, 0, 0, 0, 0, 0)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(Frozen(list(totals.items()), health, 10, 0, 0, 0.0, 0.0)))
    return generate_latest(registry)


def test_hostile_names_come_out_as_valid_escaped_labels():
    agg = Aggregates()
    names = [HOSTILE, b"\xe2\x80\xaeevil", b"ok-\xc3\xa9"]  # bytes, a bidi override, valid UTF-8
    cgroup = b"/user.slice/\xfe\x07.service"
    agg.fold(
        [
            task(
                p,
                n.decode("utf-8", "surrogateescape"),
                [1, p, 0, 0, 0, 0, 0, 0],
                7,
                cgroup.decode("utf-8", "surrogateescape"),
            )
            for p, n in enumerate(names, 1)
        ]
    )
    body = render(agg.totals).decode("utf-8")  # strict: fails on anything that is not UTF-8
    series = {
        (s.labels["command"], s.labels["cgroup"], s.labels["unit"]): s.value
        for family in text_string_to_metric_families(body)
        if family.name == "nfacct_bytes"
        for s in family.samples
        if s.labels["proto"] == "tcp" and s.labels["direction"] == "snd"
    }
    where = ("/user.slice/\\xfe\\x07.service", "\\xfe\\x07.service")
    assert series == {(HOSTILE_LABEL, *where): 1.0, ("\\u202eevil", *where): 2.0, ("ok-é", *where): 3.0}


# ---- the address and the endpoint ------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("9108", ("127.0.0.1", 9108)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::1]:9108", ("::1", 9108)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_addresses(value, expected):
    assert scrape.parse_address(value) == expected


def test_a_bad_address_is_one_line_naming_the_flag():
    for value, reason in (
        ("::1:9108", "write an IPv6 address in brackets, like [::1]:9108, not '::1:9108'"),
        (":9108", "expected HOST:PORT, PORT or [IPV6]:PORT, not ':9108'"),
        ("127.0.0.1:0", "expected a port from 1 to 65535 in '127.0.0.1:0'"),
        ("127.0.0.1:http", "expected a port from 1 to 65535 in '127.0.0.1:http'"),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "nfacct", "run", "--metrics", value], capture_output=True, text=True
        )
        assert run.returncode == 2
        assert run.stderr.splitlines()[-1] == f"nfacct run: error: argument --metrics: {reason}"


class Loop:
    """An endpoint driven by a selector, as the daemon drives it; the test plays the clients."""

    def __init__(self, body: bytes = b"x 1\n"):
        self.sel = selectors.DefaultSelector()
        self.prepared = 0
        self.body = body
        self.endpoint = scrape.Endpoint(("127.0.0.1", tcp_port()), self.prepare, self.sel, Faults())

    def prepare(self) -> scrape.Render:
        self.prepared += 1
        return lambda: (self.body, "text/plain")

    def turn(self, seconds: float = 0.05) -> None:
        for key, mask in self.sel.select(seconds):
            key.data(mask)

    def connect(self) -> socket.socket:
        s = socket.create_connection(self.endpoint.address)
        s.setblocking(False)
        return s

    def exchange(self, request: bytes) -> bytes:
        """One request and its whole answer, until the endpoint closes the connection."""
        s = self.connect()
        s.sendall(request)
        data = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.turn(0.01)
            try:
                while chunk := s.recv(1 << 20):
                    data.append(chunk)
                break  # closed
            except BlockingIOError:
                continue
        s.close()
        return b"".join(data)

    def close(self) -> None:
        self.endpoint.close()
        self.sel.close()


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.close()


def test_requests_get_their_answers(loop):
    ok = loop.exchange(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4\r\nConnection: close\r\n"
    assert ok == head + b"\r\nx 1\n"
    assert loop.exchange(b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert loop.exchange(b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert loop.exchange(b"hello\r\n\r\n").startswith(b"HTTP/1.1 400 Bad Request\r\n")
    too_long = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * scrape.MAX_REQUEST
    assert loop.exchange(too_long).startswith(b"HTTP/1.1 431 ")


def test_scrapes_in_a_loop_share_one_rendering(loop):
    for _ in range(20):
        assert loop.exchange(b"GET /metrics HTTP/1.1\r\n\r\n").endswith(b"\r\n\r\nx 1\n")
    assert loop.prepared == 1  # 20 scrapes within RENDER_EVERY
    assert loop.endpoint.answered == 20


def test_silent_clients_make_room_for_a_scraper_and_are_dropped_at_their_deadline(loop):
    silent = [loop.connect() for _ in range(scrape.MAX_CLIENTS + 4)]
    for _ in range(10):
        loop.turn(0.01)
    assert loop.endpoint.dropped == 4  # the oldest made room for the last four
    assert loop.exchange(b"GET /metrics HTTP/1.1\r\n\r\n").endswith(b"x 1\n")  # and one more
    loop.endpoint.work(time.monotonic() + scrape.REQUEST_TIMEOUT + 0.1)
    assert loop.endpoint.dropped == len(silent)  # 5 made room, 15 reached their deadline
    for s in silent:
        s.setblocking(True)
        assert s.recv(10) == b""  # closed by the endpoint
        s.close()


def test_a_client_that_never_reads_a_large_answer_is_dropped_and_costs_one_copy():
    lp = Loop(b"y" * (8 << 20))  # 8 MB: the size of 80,000 series
    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(lp.endpoint.address)
        s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        for _ in range(40):
            lp.turn(0.01)
        assert lp.exchange(b"GET /metrics HTTP/1.1\r\n\r\n").endswith(b"y" * 1000)  # served meanwhile
        lp.endpoint.work(time.monotonic() + scrape.ANSWER_TIMEOUT + 0.1)
        assert lp.endpoint.dropped == 1 and lp.endpoint.answered == 1
        s.close()
    finally:
        lp.close()


# ---- the real daemon and a real Prometheus ----------------------------------------------------

PROMETHEUS_CONFIG = """
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: nfacct
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


class Prometheus:
    """Debian's prometheus, scraping one target every second, with its data in `directory`."""

    def __init__(self, directory: Path, target: int):
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed: `make setup` installs it (Debian package prometheus)"
        self.directory = directory
        directory.mkdir()
        (directory / "prometheus.yml").write_text(PROMETHEUS_CONFIG.format(port=target))
        self.url = f"http://127.0.0.1:{tcp_port()}"
        argv = [
            binary,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address={self.url.removeprefix('http://')}",
            "--log.level=warn",
        ]
        with open(directory / "prometheus.log", "w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=1)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError((directory / "prometheus.log").read_text()) from None
                time.sleep(0.2)

    def query(self, promql: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as answer:
            reply = json.load(answer)
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


# Sends `rounds` datagrams of `size` bytes to an echo server and reads each echo, under a name it
# gives itself; says its pid, then waits for its stdin to close.
ECHOER = r"""
import ctypes, json, os, socket, sys
name, server, port, sport, rounds, size = sys.argv[1:]
ctypes.CDLL(None).prctl(15, ctypes.c_char_p(bytes.fromhex(name)), 0, 0, 0)  # PR_SET_NAME
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", int(sport)))
s.settimeout(5)
for _ in range(int(rounds)):
    s.sendto(b"m" * int(size), (server, int(port)))
    s.recv(65535)
s.close()
print(json.dumps({"pid": os.getpid()}), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def udp_echo(lab, procs):
    port = free_port()
    server = lab.role(lab.peer, "echo-server", "--proto", "udp", "--bind", PEER_V4, "--port", str(port))
    procs.append(server)
    assert json.loads(server.stdout.readline())["ready"]
    return port


def value(prometheus: Prometheus, promql: str) -> list[tuple[dict, float]]:
    return [(r["metric"], float(r["value"][1])) for r in prometheus.query(promql)]


def test_prometheus_holds_a_commands_exact_totals(lab, counters, tmp_path, procs, udp_echo):
    """Two processes named HOSTILE send 30 and 20 datagrams of 1000 bytes and get each echo: the
    command's series in Prometheus equal the kernel's nft counters and nfacct's top, and keep their
    value after both exited and the GC dropped them."""
    metrics_port = tcp_port()
    daemon = Daemon(
        lab.acct,
        tmp_path / "daemon",
        *("--metrics", f"127.0.0.1:{metrics_port}"),
        *("--gc-cycle", "1", "--closed-idle", "0.5"),
    )
    prometheus = None
    try:
        prometheus = Prometheus(tmp_path / "prometheus", metrics_port)
        rounds, size = {free_port(): 30, free_port(): 20}, 1000
        pids = []
        for sport, n in rounds.items():
            count_port(counters, "udp", sport)
            argv = [sys.executable, "-c", ECHOER, HOSTILE.hex(), PEER_V4, str(udp_echo), str(sport), str(n)]
            p = subprocess.Popen(
                lab.cmd(lab.acct, [*argv, str(size)]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(p)
            pids.append(json.loads(p.stdout.readline())["pid"])

        # The kernel's count, and arithmetic: IPv4 and UDP headers are 28 bytes.
        for sport, n in rounds.items():
            udp = {"packs": n, "bytes": n * (size + 28)}
            expected = {f"udp{d}{what}": v for d in ("snd", "rcv") for what, v in udp.items()}
            assert kernel(counters, "udp", sport) == dict.fromkeys(COUNTER_NAMES, 0) | expected

        def nfacct_totals() -> dict[str, int]:
            tasks = [t for t in daemon.top() if t["pid"] in pids]
            return {c: sum(t[c] for t in tasks) for c in COUNTER_NAMES} | {"tasks": len(tasks)}

        kernel_sum = {c: sum(kernel(counters, "udp", sp)[c] for sp in rounds) for c in COUNTER_NAMES}
        assert until(nfacct_totals, kernel_sum | {"tasks": 2}) == kernel_sum | {"tasks": 2}
        assert {t["comm"] for t in daemon.top() if t["pid"] in pids} == {
            HOSTILE.decode("utf-8", "surrogateescape")
        }

        def prometheus_totals() -> dict[tuple, float]:
            series = value(prometheus, '{__name__=~"nfacct_(bytes|packets)_total", command=~"nf.*"}')
            return {(m["__name__"], m["proto"], m["direction"], m["command"]): v for m, v in series}

        expected = {
            (f"nfacct_{what}_total", proto, d, HOSTILE_LABEL): (
                kernel_sum[f"udp{d}{'packs' if what == 'packets' else 'bytes'}"] if proto == "udp" else 0
            )
            for what in ("packets", "bytes")
            for proto in ("tcp", "udp")
            for d in ("snd", "rcv")
        }
        assert until(prometheus_totals, expected, within=15) == expected
        assert value(prometheus, 'up{job="nfacct"}')[0][1] == 1.0

        for p in procs[-2:]:
            p.stdin.close()
            p.wait()
        assert until(lambda: [t for t in daemon.top() if t["pid"] in pids], [], within=10) == [], "GC"
        gone = time.time()
        time.sleep(2.5)  # two scrapes after the GC dropped both
        stamps = value(prometheus, 'timestamp(nfacct_bytes_total{command=~"nf.*", proto="udp"})')
        assert len(stamps) == 2 and all(stamp > gone for _m, stamp in stamps)
        assert prometheus_totals() == expected
    finally:
        if prometheus is not None:
            prometheus.stop()
        assert daemon.stop() == 0, daemon.log.read_text()
    assert not (tmp_path / "prometheus").exists()


def test_a_port_in_use_is_one_line(lab, rules, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        argv = ["--control", str(tmp_path / "c.sock"), "--db", str(tmp_path / "n.db")]
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "nfacct",
                "run",
                "--netns",
                lab.acct,
                *argv,
                "--metrics",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert (run.returncode, run.stderr) == (
        1,
        f"nfacct: error: cannot listen for metrics on 127.0.0.1:{port}: Address already in use\n",
    )
    assert os.listdir(tmp_path) == [], "the refused daemon created nothing"


def scrape_once(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read()


def test_a_takeover_keeps_the_port(lab, rules, tmp_path):
    """The successor listens beside its predecessor (SO_REUSEPORT) and serves once it has gone;
    a daemon that is not a takeover is refused the port."""
    port = tcp_port()
    first = Daemon(lab.acct, tmp_path, "--metrics", f"127.0.0.1:{port}")
    second = None
    try:
        assert b"nfacct_engine_packets_total" in scrape_once(port)
        second = Daemon(lab.acct, tmp_path, "--takeover", "--metrics", f"127.0.0.1:{port}", db=first.db)
        assert first.proc.wait(timeout=15) == HANDED_OVER
        assert b"nfacct_engine_packets_total" in scrape_once(port)
        with pytest.raises(scrape.ScrapeError, match="Address already in use"):
            scrape.listen("127.0.0.1", port)
    finally:
        first.kill()
        if second is not None:
            assert second.stop() == 0


def test_hostile_scrapers_delay_no_verdict(lab, counters, tmp_path, procs):
    """While iperf3 and ping run through the daemon: 40 connections that send nothing, one that
    sends its request a byte every 0.3 s, and one that asks again as soon as it has an answer.
    Traffic keeps moving, its counts stay exact, and the scrapers are served or cut off."""
    port, iperf_port = tcp_port(), free_port()
    counters.add("iperf-snd", "out", f"tcp dport {iperf_port}")
    counters.add("iperf-rcv", "in", f"tcp sport {iperf_port}")
    server = subprocess.Popen(lab.cmd(lab.peer, ["iperf3", "-s", "-B", PEER_V4, "-p", str(iperf_port)]))
    procs.append(server)
    daemon = Daemon(lab.acct, tmp_path, "--metrics", f"127.0.0.1:{port}")
    kept: list[socket.socket] = []
    outcome: dict[str, object] = {"answers": 0, "errors": []}
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                outcome["answers"] += scrape_once(port).startswith(b"# HELP")
            except OSError as e:  # rare: cut off while its request was still on its way (below)
                outcome["errors"].append(repr(e))

    def slow() -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            start = time.monotonic()
            try:
                for byte in b"GET /metrics HTTP/1.1\r\n\r\n":
                    s.send(bytes([byte]))
                    time.sleep(0.3)
            except OSError:
                pass
            s.settimeout(10)
            outcome["slow"] = (s.recv(100), time.monotonic() - start)

    try:
        until(lambda: bool(lab.run(lab.peer, ["ss", "-Htln", f"sport = :{iperf_port}"]).stdout), True, 5)
        client = ["iperf3", "-c", PEER_V4, "-p", str(iperf_port), "-t", "8", "-i", "1", "-J"]
        iperf = subprocess.Popen(lab.cmd(lab.acct, client), stdout=subprocess.PIPE, text=True)
        ping = lab.cmd(lab.acct, ["ping", "-n", "-q", "-i", "0.05", "-w", "8", PEER_V4])
        ping = subprocess.Popen(ping, stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        threads = [threading.Thread(target=f) for f in (hammer, slow)]
        for t in threads:
            t.start()
        kept += [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        report, ping_out = json.loads(iperf.communicate(timeout=40)[0]), ping.communicate(timeout=40)[0]
        stop.set()
        for t in threads:
            t.join(timeout=30)
        intervals = [i["sum"]["bits_per_second"] for i in report["intervals"]]
        # A verdict held for a second shows as an interval near zero; noise stays well above a tenth.
        assert min(intervals) > sorted(intervals)[len(intervals) // 2] / 10, intervals
        rtt_max = float(next(ln for ln in ping_out.splitlines() if ln.startswith("rtt")).split("/")[5])
        assert rtt_max < 200, ping_out
        read = counters.read()
        expected = (*read["iperf-snd"], *read["iperf-rcv"])

        def iperf_counts() -> tuple[int, ...] | None:
            t = next((t for t in daemon.top() if t["pid"] == iperf.pid), None)
            return t and (t["tcpsndpacks"], t["tcpsndbytes"], t["tcprcvpacks"], t["tcprcvbytes"])

        assert until(iperf_counts, expected) == expected
        # The oldest silent ones made room for newcomers, the others were cut off at their deadline.
        for s in kept:
            s.settimeout(scrape.REQUEST_TIMEOUT + 2)
            assert s.recv(10) == b""
        # With every slot taken, a newcomer takes the place of the client silent longest, read once
        # more first; a scraper accepted a moment before its request arrives can be that client
        # (a clean-clone CI run under load: 1 of 18,159 scrapes). Prometheus tries again at its
        # next interval; what must hold is that scrapers are served.
        assert len(outcome["errors"]) <= max(1, outcome["answers"] // 1000), outcome
        assert outcome["answers"] >= 2, outcome
        slow_answer, slow_seconds = outcome["slow"]
        assert slow_answer == b"" and slow_seconds < scrape.REQUEST_TIMEOUT + 2, outcome["slow"]
        assert daemon.status()["faults"] == {}
    finally:
        stop.set()
        for s in kept:
            s.close()
        assert daemon.stop() == 0, daemon.log.read_text()
