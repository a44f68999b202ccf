"""`nfacct top`, live: rates and groups from two polls (pure), the screen at 80 columns, and the
real thing in a real terminal (tmux): a daemon in a lab namespace, real traffic, real keys."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
from conftest import need_root
from rich.console import Console

from lab.hosts import PEER_V4
from nfacct.display import human_bytes, top_screen
from nfacct.live import regroup
from nfacct.tables import COUNTER_NAMES
from nfacct.topview import EXITED_BEFORE, EXITED_NOW, Snapshot, health, rows

STATUS = {
    "netns": "labns",
    "engine": {
        "packets": 1234567,
        "unidentified": {**dict.fromkeys(COUNTER_NAMES, 0), "udprcvpacks": 3, "tcpsndpacks": 4},
        "malformed_total": 2,
    },
    "queue": {"queue_dropped": 5, "user_dropped": 6},
    "coverage": {"unaccounted": 7},
}


def task(pid: int, comm: str = "curl", uid: int = 0, cgroup: str = "/a", exit_time=None, **counters) -> dict:
    t = {**dict.fromkeys(COUNTER_NAMES, 0), **counters}
    t.update(pid=pid, btime=1000.0 + pid, comm=comm, cmdline=f"{comm} --x", uid=uid, cgroup=cgroup)
    return {**t, "exit_time": exit_time}


def snap(when: float, *tasks: dict) -> Snapshot:
    return Snapshot(when, list(tasks), STATUS)


# ---- rates and groups (pure) ---------------------------------------------------------------------


def test_a_rate_is_the_bytes_since_the_last_poll_over_the_daemons_time_between_them():
    prev = snap(100.0, task(1, tcpsndbytes=1000, udprcvbytes=10))
    cur = snap(102.5, task(1, tcpsndbytes=6000, udpsndbytes=1000, udprcvbytes=2510, tcprcvpacks=99))
    [row] = rows(prev, cur, "process")
    assert (row.pid, row.label, row.cmdline) == (1, "curl", "curl --x")
    assert (row.send_rate, row.recv_rate) == (6000 / 2.5, 2500 / 2.5)
    assert (row.sent, row.received) == (7000, 2510)


def test_the_first_poll_has_totals_and_no_rates():
    [row] = rows(None, snap(5.0, task(1, tcpsndbytes=7)), "process")
    assert (row.send_rate, row.recv_rate, row.sent) == (None, None, 7)


def test_a_process_new_since_the_last_poll_counts_whole_and_rows_go_fastest_first():
    prev = snap(10.0, task(1, tcpsndbytes=5000))
    cur = snap(12.0, task(1, tcpsndbytes=5000), task(2, comm="iperf3", udprcvbytes=300))
    assert [(r.pid, r.send_rate, r.recv_rate) for r in rows(prev, cur, "process")] == [
        (2, 0.0, 150.0),
        (1, 0.0, 0.0),
    ]


def test_counters_lower_than_before_give_no_rate():
    # A daemon restarted without --takeover continues from its last checkpoint: up to 10 s lost.
    [row] = rows(snap(1.0, task(1, tcpsndbytes=900)), snap(2.0, task(1, tcpsndbytes=500)), "process")
    assert (row.send_rate, row.sent) == (None, 500)


def test_groups_add_up_their_processes():
    prev = snap(0.0, task(1, uid=0, tcpsndbytes=10), task(2, uid=1000, comm="ssh", cgroup="/b"))
    cur = snap(
        1.0,
        task(1, uid=0, tcpsndbytes=110),
        task(2, uid=1000, comm="ssh", cgroup="/b", udpsndbytes=40),
        task(3, uid=1000, comm="curl", cgroup="/b", tcprcvbytes=7),
    )
    names = {0: "root", 1000: "ann"}.get
    by_user = [
        (r.label, r.processes, r.send_rate, r.recv_rate, r.sent) for r in rows(prev, cur, "user", names)
    ]
    assert by_user == [("root", 1, 100.0, 0.0, 110), ("ann", 2, 40.0, 7.0, 40)]
    by_command = [(r.label, r.processes, r.sent, r.received) for r in rows(prev, cur, "command")]
    assert by_command == [("curl", 2, 110, 7), ("ssh", 1, 40, 0)]
    by_cgroup = [(r.label, r.processes) for r in rows(prev, cur, "cgroup")]
    assert by_cgroup == [("/a", 1), ("/b", 2)]


def test_units_group_their_cgroups_and_none_is_a_dash():
    docker = "/system.slice/docker-" + "ab" * 32 + ".scope"
    cur = snap(
        1.0,
        task(1, cgroup=docker, tcpsndbytes=5),
        task(2, cgroup=docker + "/init.scope", udprcvbytes=7),  # systemd inside the container
        task(3, cgroup="/system.slice/nginx.service", tcprcvbytes=100),
        task(4, cgroup="/", tcpsndbytes=1),
        task(5, cgroup="", tcpsndbytes=1),  # unknown
    )
    by_unit = [(r.label, r.processes, r.sent, r.received) for r in rows(None, cur, "unit")]
    assert by_unit == [("nginx.service", 1, 0, 100), ("docker:abababababab", 2, 5, 7), ("-", 2, 2, 0)]
    assert [r.unit for r in rows(None, cur, "process")] == [
        "nginx.service",
        "docker:abababababab",
        "docker:abababababab",
        "-",
        "-",
    ]


def test_exits_are_marked_in_the_interval_they_happened():
    prev = snap(
        100.0,
        task(1),
        task(2),
        task(3, exit_time=90.0),
        task(4, exit_time=95.0),
        task(5, tcpsndbytes=70),
    )
    cur = snap(
        102.0,
        task(1),  # still running
        task(2, exit_time=101.0),  # exited since the last poll
        task(3, exit_time=90.0),  # exited before it
        task(6, cgroup="/b", exit_time=101.5, udpsndbytes=8),  # appeared and exited in between
        # 4: exited before and collected since: no longer shown; 5: running before, gone now
    )
    found = {r.pid: (r.state, r.send_rate, r.sent) for r in rows(prev, cur, "process")}
    assert found == {
        1: ("", 0.0, 0),
        2: (EXITED_NOW, 0.0, 0),
        3: (EXITED_BEFORE, 0.0, 0),
        5: (EXITED_NOW, None, 70),  # its last bytes went to the database, unseen here
        6: (EXITED_NOW, 4.0, 8),
    }
    by_cgroup = {r.label: (r.state, r.processes) for r in rows(prev, cur, "cgroup")}
    assert by_cgroup == {"/a": (EXITED_NOW, 4), "/b": (EXITED_NOW, 1)}
    alone = rows(snap(6.0, task(1, exit_time=5.0)), snap(9.0, task(1, exit_time=5.0)), "command")
    assert [r.state for r in alone] == [EXITED_BEFORE]  # a group whose processes all exited


def test_health_is_the_engines_figures():
    h = health(STATUS)
    assert (h.packets, h.unaccounted, h.unidentified, h.malformed, h.queue_drops) == (1234567, 7, 7, 2, 11)
    bare = {**STATUS, "queue": {}, "coverage": {"rules": "no nfacct rules"}}
    assert (health(bare).unaccounted, health(bare).queue_drops) == (None, None)


def test_keys_switch_the_grouping_and_q_quits():
    assert regroup("process", "u") == ("user", False)
    assert regroup("process", "s") == ("cgroup", False)
    assert regroup("cgroup", "g") == ("unit", False)
    assert regroup("unit", "g") == ("netns", False)
    assert regroup("netns", "g") == ("process", False)
    assert regroup("process", "t") == ("unit", False)
    assert regroup("process", "n") == ("netns", False)
    assert regroup("process", "\t\t") == ("user", False)
    assert regroup("user", "xq") == ("user", True)
    assert regroup("user", "c") == ("command", False)


# ---- the screen (pure rendering) -----------------------------------------------------------------

HOSTILE = "\x1b[2J\x1b]0;pwned\x07" + "\udcff" * 3 + "[bold]x" * 10  # clears, retitles, not UTF-8, markup
LONG_CGROUP = "/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-org.Terminal-4242.scope"
HOSTILE_CGROUP = "/user.slice/" + HOSTILE.replace("[bold]x" * 10, "") + ".service"


def render(by: str, width: int = 80, height: int | None = 24, cgroup: str = LONG_CGROUP) -> list[str]:
    prev = snap(100.0, task(41, comm=HOSTILE, cgroup=cgroup, uid=1000))
    cur = snap(
        102.0,
        task(41, comm=HOSTILE, cgroup=cgroup, uid=1000, tcpsndbytes=3 * 1024**3, tcprcvbytes=2**20),
        *(task(1000 + i, comm=f"worker{i}", udpsndbytes=i) for i in range(40)),
    )
    out = io.StringIO()
    console = Console(file=out, width=width, height=height, color_system=None, legacy_windows=False)
    console.print(top_screen(prev, cur, by, 2.0, width, height, lambda uid: {1000: HOSTILE}.get(uid, "root")))
    return out.getvalue().splitlines()


@pytest.mark.parametrize("by", ["process", "command", "user", "cgroup", "unit"])
def test_the_screen_fits_80x24_with_hostile_names_escaped(by):
    lines = render(by, cgroup=HOSTILE_CGROUP if by == "unit" else LONG_CGROUP)
    assert len(lines) <= 24
    assert max(len(line) for line in lines) <= 80
    screen = "\n".join(lines)
    assert not {c for c in screen if not c.isprintable() and c != "\n"}
    assert lines[0] == f"nfacct top  netns labns  by {by}  every 2s"
    assert lines[1] == "packets 1,234,567  unaccounted 7  unidentified 7  malformed 2  queue drops 11"
    fastest = lines[4].split()
    # Figures are never cut: 3 GiB in 2 s, 1 MiB received in 2 s, and the totals.
    assert fastest[-4:] == ["1.5G/s", "512.0K/s", "3.0G", "1.0M"]
    if by == "cgroup":
        assert fastest[-6].endswith("Terminal-4242.scope")  # the unit stays visible
    if by in ("process", "command", "user", "unit"):
        assert "\\x1b[2J\\x1b]0;pw" in lines[4]  # escaped, never interpreted
    if by in ("process", "command"):
        assert "more (a taller terminal shows them)" in screen


def test_a_wide_terminal_shows_command_lines_and_from_140_columns_units():
    lines = render("process", width=120, height=None)
    assert lines[3].split()[3:] == ["COMMAND", "SEND/s", "RECV/s", "SENT", "RECEIVED", "CMDLINE"]
    # The whole command line, escaped and not read as markup, to the last column.
    assert lines[4].endswith("  \\x1b[2J\\x1b]0;pwned\\x07\\xff\\xff\\xff[bo…")
    assert len(lines[4]) == 120
    assert len(lines) == 4 + 41  # no height: every row
    lines = render("process", width=140, height=None)
    assert lines[3].split()[3:5] == ["COMMAND", "UNIT"]
    assert lines[3].split()[-1] == "CMDLINE"
    assert lines[4][38:60] == "  app-gnome-org.Termi…"  # the unit, cut to its 20 columns
    assert lines[4].endswith("  \\x1b[2J\\x1b]0;pwned\\x07\\xff\\xff\\xff[…")  # 37 columns
    assert len(lines[4]) == 140
    unit_view = render("process", width=140, height=None, cgroup=HOSTILE_CGROUP)
    assert unit_view[4][38:60] == "  \\x1b[2J\\x1b]0;pwned…"  # escaped as every name


# ---- the real thing in tmux ------------------------------------------------------------------------

_sessions = itertools.count()


class Pane:
    """A shell in a tmux pane of a private tmux server (its own socket in `directory`: the user's
    tmux is never touched), `width` x `height`, removed with everything in it by `close`."""

    def __init__(self, directory: str | os.PathLike, width: int = 80, height: int = 24) -> None:
        self.socket = os.path.join(directory, f"tmux-{next(_sessions)}.sock")
        env = {k: v for k, v in os.environ.items() if k != "TMUX"}
        shell = "env -u PROMPT_COMMAND PS1='$ ' TERM=xterm-256color bash --norc --noprofile"
        self.tmux("new-session", "-d", "-x", str(width), "-y", str(height), shell, env=env)

    def tmux(self, *args: str, env: dict | None = None) -> str:
        argv = ["tmux", "-S", self.socket, "-f", "/dev/null", *args]
        return subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout

    def type(self, line: str) -> None:
        self.tmux("send-keys", "-l", line)
        self.tmux("send-keys", "Enter")

    def key(self, key: str) -> None:
        self.tmux("send-keys", key)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p")

    def wait_for(self, pattern: str, within: float = 15.0) -> re.Match:
        deadline = time.monotonic() + within
        while True:
            found = re.search(pattern, screen := self.screen(), re.MULTILINE)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on the screen within {within:g} s:\n{screen}")
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True)
        with contextlib.suppress(FileNotFoundError):  # the server leaves its socket behind
            os.unlink(self.socket)


@pytest.fixture
def pane(tmp_path):
    need_root()
    p = Pane(tmp_path)
    yield p
    p.close()
    assert not os.path.exists(p.socket)


def top_command(daemon, tmp_path) -> str:
    """`nfacct top` between two `stty -g` (the terminal's settings before and after) and its status."""
    top = shlex.join([sys.executable, "-m", "nfacct", "top", "--control", daemon.control, "--interval", "1"])
    before, after = tmp_path / "stty.before", tmp_path / "stty.after"
    return f"clear; stty -g > {before}; {top}; echo status=$?; stty -g > {after}"


def row(screen: str, first: str) -> list[str]:
    """The fields of the table row whose second field (after S) is `first`; S is dropped."""
    for line in screen.splitlines():
        fields = line.split()
        if fields[:1] == [first] or fields[1:2] == [first]:
            return fields[fields.index(first) :]
    raise AssertionError(f"no row for {first!r} in:\n{screen}")


def test_live_top_in_a_terminal(lab, daemon, counters, port, procs, pane, tmp_path):
    p = port()
    counters.add("sent", "out", f"udp dport {p}")
    pane.type(top_command(daemon, tmp_path))
    pane.wait_for(r"^nfacct top  netns \S+  by process  every 1s$")
    # 400 datagrams of 1000 bytes (1028 on the wire), 200 a second
    argv = ["sender", "--connect", PEER_V4, "--port", str(p), "--count", "400", "--rate", "200"]
    sender = lab.role(lab.acct, *argv, "--size", "1000", "--hold")
    procs.append(sender)
    pid = str(sender.pid)
    rate = pane.wait_for(rf"^ +{pid} +root +python\S* +([\d.]+)K/s ", within=10)
    assert 50 <= float(rate[1]) <= 800  # about 200.8K/s (200 x 1028 bytes), whatever the load
    assert json.loads(sender.stdout.readline())["sent"] == 400
    wire = counters.read()["sent"]
    assert wire == (400, 400 * 1028)  # the kernel's count, independent of nfacct
    total = human_bytes(wire[1])
    # Once it is quiet: no rate, and the total is the kernel's
    pane.wait_for(rf"^ +{pid} +root +python\S* +0B/s +0B/s +{re.escape(total)} +0B$")

    pane.key("u")
    pane.wait_for(r"^nfacct top  netns \S+  by user  every 1s$")
    assert row(pane.screen(), "root")[1:] == ["1", "0B/s", "0B/s", total, "0B"]  # one process: the sender
    pane.key("s")
    pane.wait_for(r"by cgroup")
    with open(f"/proc/{sender.pid}/cgroup") as f:
        cgroup = next(line[3:].strip() for line in f if line.startswith("0::"))
    assert row(pane.screen(), cgroup)[1:] == ["1", "0B/s", "0B/s", total, "0B"]

    sender.stdin.close()  # it exits: marked X at the next poll
    sender.wait()
    pane.key("p")
    pane.wait_for(rf"^X +{pid} +root +python\S* +0B/s +0B/s +{re.escape(total)} +0B$")

    pane.key("q")
    pane.wait_for(r"^status=0\n\$$")
    assert (tmp_path / "stty.before").read_text() == (tmp_path / "stty.after").read_text()
    assert "by process" not in pane.screen()  # the alternate screen is gone, the shell's is back


def test_ctrl_c_leaves_the_terminal_as_it_was(daemon, pane, tmp_path):
    pane.type(top_command(daemon, tmp_path))
    pane.wait_for(r"^packets \d")
    pane.key("C-c")
    pane.wait_for(r"^status=0\n\$$")
    assert (tmp_path / "stty.before").read_text() == (tmp_path / "stty.after").read_text()
    assert "Traceback" not in pane.screen()


def test_a_pipe_gets_one_frame_per_poll(lab, daemon):
    argv = [sys.executable, "-m", "nfacct", "top", "--control", daemon.control, "--interval", "0.2"]
    frames = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as top:
        for line in top.stdout:
            frames += [line] if line.startswith("nfacct top ") else []
            if len(frames) == 3:
                break
        top.terminate()
    assert frames == [f"nfacct top  netns {lab.acct}  by process  every 0.2s\n"] * 3


def test_a_daemon_that_stops_answering_is_said_in_the_header():
    out = io.StringIO()
    problem = "no nfacct daemon at /run/x\x1b[2J.sock (trying again every 2s)"
    Console(file=out, width=80, color_system=None).print(
        top_screen(None, snap(1.0, task(1)), "process", 2.0, 80, 24, problem=problem)
    )
    assert out.getvalue().splitlines()[2] == "no nfacct daemon at /run/x\\x1b[2J.sock (trying again every 2s)"
