"""The unit or container of a cgroup (`nfacct.units`): the mapping on real-world paths (pure), and
`top --by unit`, `history --by unit` and the metrics' `unit` label end to end, for processes
placed in real cgroup v2 directories and sending real traffic through a daemon in a lab namespace.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import PROFILE, cgroup2, count_port, free_port, kernel, need_root, own_cgroup, until
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from lab.daemon import Daemon
from lab.hosts import PEER_V4, lab_env
from nfacct import text
from nfacct.display import human_bytes
from nfacct.store import Store
from nfacct.tables import COUNTER_NAMES
from nfacct.units import nfacct_unit, shown, unit

D = "3f4a6b0c9d8e7f60123456789abcdef0123456789abcdef0123456789abcdef0"  # a 64-hex container id
P = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
POD = "pod5e3f1c2a_9b8d_4e7f_a6b5_c4d3e2f1a0b9"  # kubelet's systemd driver: the pod uid's - as _

# Paths as /proc/PID/cgroup shows them ("0::" cut), from the runtimes' documentation, issue
# reports and machines: see the comment on each.
REAL = [
    # systemd (systemd-cgls on Debian 12)
    ("/system.slice/nginx.service", "nginx.service"),
    ("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service"),
    ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
    ("/user.slice/user-1000.slice/user@1000.service/init.scope", "init.scope"),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service", "foo.service"),
    (
        "/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-org.Terminal-4242.scope",
        "app-gnome-org.Terminal-4242.scope",
    ),
    ("/init.scope", "init.scope"),
    ("/system.slice/run-u42.service", "run-u42.service"),  # systemd-run
    ("/machine.slice/machine-qemu\\x2d1\\x2dvm.scope", "machine-qemu\\x2d1\\x2dvm.scope"),  # libvirt
    ("/machine.slice/systemd-nspawn@web.service/payload", "systemd-nspawn@web.service"),
    ("/user.slice", "user.slice"),  # a process straight in a slice: only by hand
    # docker: systemd cgroup driver, and cgroupfs (`docker info`: Cgroup Driver)
    (f"/system.slice/docker-{D}.scope", f"docker:{D[:12]}"),
    (f"/docker/{D}", f"docker:{D[:12]}"),
    (f"/system.slice/docker-{D}.scope/init.scope", f"docker:{D[:12]}"),  # systemd in a container
    (f"/system.slice/docker-{D}.scope/system.slice/nginx.service", f"docker:{D[:12]}"),
    ("/system.slice/docker.service", "docker.service"),  # dockerd itself
    ("/system.slice/containerd.service", "containerd.service"),
    # podman: rootful and rootless (systemd), with its `container` sub-cgroup, cgroupfs, conmon
    (f"/machine.slice/libpod-{P}.scope", f"podman:{P[:12]}"),
    (f"/machine.slice/libpod-{P}.scope/container", f"podman:{P[:12]}"),
    (
        f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{P}.scope",
        f"podman:{P[:12]}",
    ),
    (f"/libpod_parent/libpod-{P}", f"podman:{P[:12]}"),
    (f"/machine.slice/libpod-conmon-{P}.scope", f"libpod-conmon-{P}.scope"),
    # kubernetes: containerd and CRI-O with the systemd driver, then the cgroupfs driver
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{POD}.slice/cri-containerd-{D}.scope",
        f"containerd:{D[:12]}",
    ),
    (f"/kubepods.slice/kubepods-{POD}.slice/cri-containerd-{P}.scope", f"containerd:{P[:12]}"),
    (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{POD}.slice/crio-{D}.scope",
        f"cri-o:{D[:12]}",
    ),
    (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{POD}.slice/crio-conmon-{D}.scope",
        f"crio-conmon-{D}.scope",
    ),
    (f"/kubepods/burstable/pod5e3f1c2a-9b8d-4e7f-a6b5-c4d3e2f1a0b9/{D}", f"k8s:{D[:12]}"),
    (f"/kubepods/pod5e3f1c2a-9b8d-4e7f-a6b5-c4d3e2f1a0b9/{P}", f"k8s:{P[:12]}"),
    ("/kubepods.slice/kubepods-burstable.slice", "kubepods-burstable.slice"),
    (f"/system.slice/nerdctl-{D}.scope", f"nerdctl:{D[:12]}"),
    # LXC 4+ and LXD (needrestart PR #238: 0::/lxc.payload.focal/system.slice/avahi-daemon.service),
    # LXC 3.1 (lxc/lxc#2782), LXC 3 and earlier, and lxc-attach's `.lxc` (lxc/lxc#3373)
    ("/lxc.payload.focal/system.slice/avahi-daemon.service", "lxc:focal"),
    ("/lxc.payload.c1", "lxc:c1"),
    ("/lxc.payload.c1/.lxc", "lxc:c1"),
    ("/lxc.payload/c1", "lxc:c1"),
    ("/lxc/web01", "lxc:web01"),
    ("/lxc.monitor.c1", ""),  # LXC's monitor process, not the container
    # nothing systemd or a runtime names
    ("/", ""),
    ("", ""),
    ("/nfacct-queries-20073", ""),
    ("/process_api/05af0a1d023d4c0317d536b053bc52f7", ""),
]


@pytest.mark.parametrize("cgroup, expected", REAL)
def test_real_world_paths(cgroup, expected):
    assert unit(cgroup) == expected


@pytest.mark.parametrize(
    "cgroup, expected",
    [
        ("/system.slice/docker-foo.scope", "docker-foo.scope"),  # `systemd-run --scope --unit docker-foo`
        (f"/system.slice/docker-{D[:63]}.scope", f"docker-{D[:63]}.scope"),  # 63 digits
        (f"/system.slice/docker-{D.upper()}.scope", f"docker-{D.upper()}.scope"),  # runtimes write lowercase
        (f"/system.slice/docker-{D}.service", f"docker-{D}.service"),  # not the runtime's scope
        (f"/mine/{D}", ""),  # 64 hex digits under no runtime's directory
        (f"/x/docker/{D}/y", f"docker:{D[:12]}"),  # dockerd with a --cgroup-parent
        ("/a/lxc/c1", ""),  # LXC 3's directory is at the top only
        ("/lxc.payload.", ""),
        ("/system.slice/.service", "system.slice"),
        ("/system.slice//nginx.service/", "nginx.service"),  # empty components are nothing
    ],
)
def test_near_misses(cgroup, expected):
    assert unit(cgroup) == expected


def test_tables_show_none_as_a_dash():
    assert (shown("/"), shown(""), shown("/system.slice/a.service")) == ("-", "-", "a.service")


HOSTILE = b"/user.slice/\x1b[2J\xff\x07.service"


def test_hostile_bytes_are_kept_exact_for_escaping_on_output():
    cgroup = text.decode(HOSTILE)
    found = unit(cgroup)
    assert text.encode(found) == b"\x1b[2J\xff\x07.service"
    assert text.escape(found) == "\\x1b[2J\\xff\\x07.service"
    assert unit(text.decode(b"/lxc.payload.\xfe\x1b")) == text.decode(b"lxc:\xfe\x1b")


def test_the_sqlite_function_answers_in_the_kind_it_was_given():
    assert nfacct_unit("/system.slice/nginx.service") == "nginx.service"
    assert nfacct_unit(HOSTILE) == b"\x1b[2J\xff\x07.service"  # a BLOB name: a BLOB unit
    assert nfacct_unit(b"/") == "" and nfacct_unit(None) is None


@PROFILE
@given(
    st.lists(
        st.sampled_from(
            [
                "docker",
                "lxc",
                "kubepods",
                f"docker-{D}.scope",
                "a.service",
                "b.slice",
                "lxc.payload.x",
                D,
                "x.scope",
                "\udcff",
                "\x1b",
            ]
        )
        | st.text(),
        max_size=6,
    )
)
def test_any_path_maps_to_one_of_its_components_or_a_container(parts):
    path = "/" + "/".join(p.replace("/", "") for p in parts)
    found = unit(path)
    assert "/" not in found
    components = [p for p in path.split("/") if p]
    if found.startswith(("docker:", "podman:", "containerd:", "cri-o:", "k8s:", "nerdctl:")):
        _runtime, short = found.split(":")
        assert len(short) == 12 and any(short in c for c in components)
    elif found.startswith("lxc:"):
        assert any(c.endswith(found[4:]) for c in components)
    else:
        assert found == "" or found in components


def test_history_groups_by_unit_at_query_time(tmp_path):
    """Rows as the daemon writes them (a cgroup that is not UTF-8 stored as a BLOB); the unit is
    derived in the query, so rows written before nfacct knew units have one too."""
    store = Store(str(tmp_path / "n.db"))
    docker = f"/system.slice/docker-{D}.scope"
    hostile = text.decode(HOSTILE)
    rows = [
        (1, docker, 100),
        (2, docker + "/init.scope", 50),
        (3, "/system.slice/nginx.service", 10),
        (4, hostile, 7),
        (5, "/", 1),
        (6, "", 2),
    ]
    store.save_exited(
        [
            dict.fromkeys(COUNTER_NAMES, 0)
            | {"pid": pid, "btime": 1.0, "command": "c", "cmdline": "c", "uid": 0, "cgroup": cgroup}
            | {"exit_time": 2.0, "tcpsndpacks": 1, "tcpsndbytes": sent}
            for pid, cgroup, sent in rows
        ]
    )
    store.close()
    reader = Store(str(tmp_path / "n.db"), readonly=True)
    try:
        found = [(r["unit"], r["processes"], r["tcpsndbytes"]) for r in reader.history(None, None, "unit")]
    finally:
        reader.close()
    assert found == [
        (f"docker:{D[:12]}", 2, 150),
        ("nginx.service", 1, 10),
        (text.decode(b"\x1b[2J\xff\x07.service"), 1, 7),  # exact, for escaping on output
        ("", 2, 3),
    ]


# ---- end to end: real cgroups, real traffic, a real daemon -----------------------------------------

# Joins the cgroup whose cgroup.procs is $0, then becomes the command (the same pid throughout:
# `ip netns exec` execs too).
JOIN = 'echo $$ > "$0" && exec "$@"'


def tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cgroups:
    """cgroup v2 directories of our own under one parent, and the processes started in them;
    `close` ends those processes (only ours, by their Popen) and removes the directories."""

    serial = itertools.count()

    def __init__(self) -> None:
        self.mountpoint, root = cgroup2()
        name = f"nfacct-test-{os.getpid()}-{next(self.serial)}"
        self.parent = os.path.join(self.mountpoint, name)
        self.root = f"{root.rstrip('/')}/{name}"
        os.mkdir(self.parent)
        self.dirs: list[bytes] = []
        self.procs: list[subprocess.Popen] = []

    def start(self, name: bytes, argv: list[str]) -> tuple[subprocess.Popen, str]:
        """`argv` run in a new cgroup `name` (any bytes but / and newline); its path as
        /proc/PID/cgroup shows it."""
        path = os.fsencode(self.parent) + b"/" + name
        os.mkdir(path)
        self.dirs.append(path)
        p = subprocess.Popen(
            ["sh", "-c", JOIN, path + b"/cgroup.procs", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=lab_env(),
        )
        self.procs.append(p)
        return p, self.root + "/" + text.decode(name)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for path in [*reversed(self.dirs), os.fsencode(self.parent)]:
            deadline = time.monotonic() + 5
            while True:
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:  # EBUSY: a reaped process can leave its cgroup a moment late
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


@pytest.fixture
def cgroups():
    need_root()
    c = Cgroups()
    yield c
    c.close()
    assert not os.path.exists(c.parent)


@pytest.fixture(scope="module", params=["offload", "queue"])
def metered(lab, rules, tmp_path_factory, request):
    """A daemon for the lab's accounted namespace with its metrics on a loopback port, in both
    modes (the `daemon` fixture's, with --metrics)."""
    port = tcp_port()
    d = Daemon(
        lab.acct, tmp_path_factory.mktemp("units"), "--mode", request.param, "--metrics", f"127.0.0.1:{port}"
    )
    d.metrics = f"http://127.0.0.1:{port}/metrics"
    yield d
    assert d.stop() == 0, d.log.read_text()


def scraped(url: str) -> dict[tuple[str, str, str, str, str], float]:
    """nfacct_{packets,bytes}_total by (metric, unit, cgroup, proto, direction)."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        body = answer.read().decode("utf-8")
    return {
        (f.name, s.labels["unit"], s.labels["cgroup"], s.labels["proto"], s.labels["direction"]): s.value
        for f in text_string_to_metric_families(body)
        if f.name in ("nfacct_packets", "nfacct_bytes")
        for s in f.samples
        if s.name.endswith("_total")
    }


def top_frame(control: str, by: str, wanted: list[str], within: float = 15.0) -> list[str]:
    """Frames of `nfacct top --by BY` to a pipe (140 columns) until one has every line in `wanted`
    (whitespace-normalized); that frame's lines."""
    argv = [sys.executable, "-m", "nfacct", "top", "--control", control, "--by", by, "--interval", "0.3"]
    deadline = time.monotonic() + within
    frame: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, errors="surrogateescape") as top:
        try:
            for line in top.stdout:
                if line.startswith("nfacct top "):
                    if all(w in {" ".join(f.split()) for f in frame} for w in wanted):
                        return frame
                    frame = []
                    if time.monotonic() > deadline:
                        break
                frame.append(line.rstrip("\n"))
        finally:
            top.terminate()
    raise AssertionError(f"no frame with {wanted} within {within:g} s; the last:\n" + "\n".join(frame))


def test_top_history_and_metrics_show_units_with_the_kernels_counts(lab, metered, counters, cgroups, procs):
    """Three processes in cgroups named as a docker container, a systemd service and a hostile
    service name exchange UDP datagrams with an echo server; each unit's packets and bytes in
    `top --json`, `top --by unit`, the metrics and (after they exit) `history --by unit` are the
    kernel's nft counts of their ports."""
    echo = free_port()
    server = lab.role(lab.peer, "echo-server", "--proto", "udp", "--bind", PEER_V4, "--port", str(echo))
    procs.append(server)
    assert json.loads(server.stdout.readline())["ready"]
    n = next(Cgroups.serial)
    container = secrets.token_hex(32)
    cases = [  # cgroup name, its unit, datagrams each way
        (f"docker-{container}.scope".encode(), f"docker:{container[:12]}", 30),
        (f"nfacct-web-{n}.service".encode(), f"nfacct-web-{n}.service", 20),
        (b"nf\xff\x1b[7m-%d.service" % n, text.decode(b"nf\xff\x1b[7m-%d.service" % n), 10),
    ]
    senders = []
    for name, expected, rounds in cases:
        sport = free_port()
        count_port(counters, "udp", sport)
        client = ["client", "--proto", "udp", "--connect", PEER_V4, "--port", str(echo)]
        client += ["--sport", str(sport), "--rounds", str(rounds), "--size", "500", "--hold"]
        p, path = cgroups.start(name, lab.cmd(lab.acct, [sys.executable, "-m", "lab.roles", *client]))
        report = json.loads(p.stdout.readline())
        assert report == {"pid": p.pid, "received": 500 * rounds}
        assert own_cgroup(p.pid) == path  # where the daemon reads it
        udp = {"packs": rounds, "bytes": rounds * 528}  # IPv4 and UDP headers: 28 bytes
        want = {f"udp{d}{k}": v for d in ("snd", "rcv") for k, v in udp.items()}
        assert kernel(counters, "udp", sport) == dict.fromkeys(COUNTER_NAMES, 0) | want
        senders.append((p, path, expected, kernel(counters, "udp", sport)))

    # top --json: every task carries its unit; each unit's sums are the kernel's
    def top_units() -> dict[str, dict[str, int]]:
        tasks = [t for t in metered.top() if t["pid"] in {p.pid for p, *_ in senders}]
        return {t["unit"]: {c: t[c] for c in COUNTER_NAMES} for t in tasks}

    expected = {unit: counts for _p, _path, unit, counts in senders}
    assert until(top_units, expected) == expected

    # top --by unit, the live view to a pipe: a row per unit, totals as the kernel's, escaped
    rows = [
        f"{text.escape(u)} 1 0B/s 0B/s {human_bytes(c['udpsndbytes'])} {human_bytes(c['udprcvbytes'])}"
        for u, c in expected.items()
    ]
    frame = top_frame(metered.control, "unit", rows)
    assert "\x1b" not in "".join(frame) and "UNIT" in frame[3].split()

    # the metrics: unit and cgroup labels, exact counts
    def metric_units() -> dict[tuple, float]:
        found = scraped(metered.metrics)
        return {k: v for k, v in found.items() if k[1] in {text.escape(u) for u in expected}}

    want_metrics = {
        (f"nfacct_{what}", text.escape(unit), text.escape(path), proto, d): (
            counts[f"udp{d}{'packs' if what == 'packets' else 'bytes'}"] if proto == "udp" else 0
        )
        for _p, path, unit, counts in senders
        for what in ("packets", "bytes")
        for proto in ("tcp", "udp")
        for d in ("snd", "rcv")
    }
    assert until(metric_units, want_metrics) == want_metrics

    # history --by unit, once they exited and were written
    for p, *_ in senders:
        p.stdin.close()
        assert p.wait(timeout=10) == 0

    def history() -> dict[str, dict]:
        argv = [sys.executable, "-m", "nfacct", "history", "--db", metered.db, "--by", "unit", "--json"]
        found = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
        return {r["unit"]: r for r in found if r["unit"] in expected}

    want_history = {u: {"unit": u, "processes": 1, **c, "netns": lab.acct} for u, c in expected.items()}
    assert until(history, want_history) == want_history
    table = subprocess.run(
        [sys.executable, "-m", "nfacct", "history", "--db", metered.db, "--by", "unit"],
        capture_output=True,
        check=True,
    ).stdout
    assert b"\x1b" not in table and b"\\xff\\x1b[7m" in table
