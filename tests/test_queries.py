"""docs/queries.md, run: every command it shows (`$ ` lines) against a database a real daemon
wrote, each answer checked against the traffic made here, counted by the kernel (nft counters).

The traffic, in the accounted namespace: three `curl` in a cgroup of their own fetch a file
from a web server in the peer namespace; `socat` as user nobody sends 8 UDP datagrams; then,
with the daemon stopped, 7 more datagrams pass unaccounted, and a new daemon records the gap.
"""

from __future__ import annotations

import os
import re
import shlex
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import cgroup2, exited_rows, need_root, own_cgroup, until

from lab.daemon import Daemon
from lab.hosts import PEER_V4, Counters, Lab
from nfacct.display import human_bytes
from nfacct.rules import Rules
from nfacct.store import DEFAULT_DB
from nfacct.units import unit

DOC = Path(__file__).resolve().parent.parent / "docs" / "queries.md"
PID_IN_DOC = "20297"  # the doc's example pid, replaced by the real one
NOBODY = 65534
HTTP, UDP, GAP = 18080, 18081, 18082
GAP_DATAGRAMS = 7
UNIT = "fetch.service"  # the curls' cgroup's last component


@dataclass
class Command:
    source: str  # as the doc writes it
    argv: list[str]
    shown: str  # the output the doc shows


@dataclass
class Block:
    name: str  # the code block's name: ```console NAME
    commands: list[Command] = field(default_factory=list)


def blocks(markdown: str) -> list[Block]:
    """Every ```console NAME block: its commands (a `$ ` line and, while its quotes are open or
    it ends with a backslash, the lines after it) and the output shown after each."""
    found = []
    for name, body in re.findall(r"^```console (\S+)\n(.*?)^```$", markdown, re.MULTILINE | re.DOTALL):
        block = Block(name)
        lines = body.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ "):
                raise AssertionError(f"block {name}: expected a `$ ` command, got {lines[i]!r}")
            source = lines[i][2:]
            while source.endswith("\\") or not _complete(source):
                i += 1
                source = source.removesuffix("\\") + "\n" + lines[i]
            i += 1
            shown = []
            while i < len(lines) and not lines[i].startswith("$ "):
                shown.append(lines[i])
                i += 1
            block.commands.append(Command(source, shlex.split(source), "\n".join(shown)))
        found.append(block)
    return found


def _complete(source: str) -> bool:
    try:
        shlex.split(source)
    except ValueError:  # "No closing quotation"
        return False
    return True


# ---- reading the two kinds of output as rows ---------------------------------------------------


def rich_rows(out: str) -> list[dict[str, str]]:
    """`nfacct history`'s table (rich, to a pipe): header ┃, rows │."""
    header = next(line for line in out.splitlines() if "┃" in line)
    names = [c.strip().lower() for c in header.split("┃")[1:-1]]
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if "│" in line]
    return [dict(zip(names, r, strict=True)) for r in rows]


def tabulate_rows(out: str) -> list[dict[str, str]]:
    """`sqlite-utils query --table` (tabulate's simple format): columns are where the dashes are."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line and set(line) <= {"-", " "})
    spans = [m.span() for m in re.finditer(r"-+", lines[rule])]
    cut = [[line[a:b].strip() for a, b in spans] for line in lines[rule - 1 :] if line.strip()]
    names = cut[0]
    return [dict(zip(names, r, strict=True)) for r in cut[2:]]


# ---- the traffic and the database ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cgroup():
    """A cgroup v2 directory of our own: (its cgroup.procs, its path as the daemon sees it)."""
    need_root()
    mountpoint, root = cgroup2()
    # A systemd unit's name under a directory of ours: `--by unit` finds `fetch.service`.
    name = f"nfacct-queries-{os.getpid()}"
    os.mkdir(f"{mountpoint}/{name}")
    os.mkdir(f"{mountpoint}/{name}/{UNIT}")
    yield f"{mountpoint}/{name}/{UNIT}/cgroup.procs", f"{root.rstrip('/')}/{name}/{UNIT}"
    os.rmdir(f"{mountpoint}/{name}/{UNIT}")
    os.rmdir(f"{mountpoint}/{name}")


def unaccounted(db: str) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT * FROM unaccounted").fetchall()
    except sqlite3.OperationalError:  # not yet created
        return []
    finally:
        conn.close()


@dataclass
class World:
    db: str
    curl: dict[str, int]  # the kernel's counts for the three curl, shaped like nfacct's counters
    socat: dict[str, int]
    socat_pid: int
    gap: int  # packets sent while no daemon counted
    curl_cgroup: str
    own_cgroup: str  # ours, and so socat's


def zero() -> dict[str, int]:
    return {f"{p}{d}{k}": 0 for p in ("tcp", "udp") for d in ("snd", "rcv") for k in ("packs", "bytes")}


@pytest.fixture(scope="module")
def world(cgroup, tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("queries")
    www = tmp / "www"
    www.mkdir()
    (www / "file").write_bytes(b"q" * 300_000)
    with Lab() as lab:
        rules = Rules(lab.acct)
        rules.install()
        started: list[subprocess.Popen] = []
        try:
            counters = Counters(lab, lab.acct)
            counters.add("curl-snd", "out", f"tcp dport {HTTP}")
            counters.add("curl-rcv", "in", f"tcp sport {HTTP}")
            counters.add("socat-snd", "out", f"udp dport {UDP}")
            counters.add("gap", "out", f"udp dport {GAP}")
            http = [sys.executable, "-m", "http.server", str(HTTP), "--directory", str(www)]
            started.append(subprocess.Popen(lab.cmd(lab.peer, http), stderr=subprocess.DEVNULL))
            sinks = [f"UDP4-RECV:{port}" for port in (UDP, GAP)]
            for sink in sinks:
                started.append(subprocess.Popen(lab.cmd(lab.peer, ["socat", "-u", sink, "OPEN:/dev/null"])))
            for proto, port in (("tcp", HTTP), ("udp", UDP), ("udp", GAP)):
                lab.wait_listening(lab.peer, proto, port)
            daemon = Daemon(lab.acct, tmp / "first", db=str(tmp / "nfacct.db"))
            started.append(daemon.proc)
            try:
                procs = cgroup[0]
                for _ in range(3):  # moves itself into the cgroup, then becomes curl in the namespace
                    curl = ["curl", "-sS", "-o", "/dev/null", f"http://{PEER_V4}:{HTTP}/file"]
                    join = 'echo $$ > "$0" && exec "$@"'
                    subprocess.run(["sh", "-c", join, procs, *lab.cmd(lab.acct, curl)], check=True)
                as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
                socat = ["socat", "-b", "500", "-u", "STDIN", f"UDP4-SENDTO:{PEER_V4}:{UDP}"]
                sender = subprocess.Popen(lab.cmd(lab.acct, [*as_nobody, *socat]), stdin=subprocess.PIPE)
                sender.stdin.write(b"u" * 4000)  # one write (at most PIPE_BUF): 8 reads of 500
                sender.stdin.flush()
                # Open until nfacct has found it: a sender that exits at once can be gone before its
                # owner is looked up (docs/limits.md), and its datagrams are then unidentified.
                sent = lambda: next((t["udpsndpacks"] for t in daemon.top() if t["pid"] == sender.pid), 0)  # noqa: E731
                assert until(sent, 8) == 8
                sender.stdin.close()
                assert sender.wait(timeout=10) == 0
                assert until(lambda: len(exited_rows(daemon.db)), 4) == 4  # written about 1 s after exit
            finally:
                assert daemon.stop() == 0
            # subprocess writes its input 512 bytes at a time: 7 datagrams of 64 bytes in one write
            send = ["socat", "-b", "64", "-u", "STDIN", f"UDP4-SENDTO:{PEER_V4}:{GAP}"]
            lab.run(lab.acct, send, input=b"g" * 64 * GAP_DATAGRAMS, text=False)  # nobody counts these
            second = Daemon(lab.acct, tmp / "second", "--checkpoint-interval", "0.5", db=daemon.db)
            started.append(second.proc)
            assert until(lambda: len(unaccounted(daemon.db)), 1) == 1  # a checkpoint records the gap
            assert second.stop() == 0
            read = counters.read()
        finally:
            for p in started:
                p.kill()
                p.wait()
            rules.remove()
    curl, socat = zero(), zero()
    (curl["tcpsndpacks"], curl["tcpsndbytes"]), (curl["tcprcvpacks"], curl["tcprcvbytes"]) = (
        read["curl-snd"],
        read["curl-rcv"],
    )
    socat["udpsndpacks"], socat["udpsndbytes"] = read["socat-snd"]
    assert socat["udpsndpacks"] == 8 and read["gap"][0] == GAP_DATAGRAMS  # as sent
    return World(daemon.db, curl, socat, sender.pid, read["gap"][0], cgroup[1], own_cgroup())


def run(command: Command, world: World) -> str:
    """The documented command on the test's database (the default path replaced, or `--db` added
    for `nfacct history`'s default), with the test's pid for the doc's."""
    argv = [
        a.replace(DEFAULT_DB, world.db) if a != PID_IN_DOC else str(world.socat_pid) for a in command.argv
    ]
    if argv[:2] == ["nfacct", "history"] and "--db" not in argv:
        argv[2:2] = ["--db", world.db]
    venv = os.path.dirname(sys.executable)  # nfacct and sqlite-utils, as installed with nfacct
    env = {**os.environ, "PATH": venv + os.pathsep + os.environ["PATH"]}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{shlex.join(argv)}: {done.stderr}"
    print(f"$ {command.source}\n{done.stdout}")  # pytest -s: the doc's outputs, real
    return done.stdout


# ---- the answers --------------------------------------------------------------------------------


def check_groups(program: str, out: str, expected: dict[str, tuple[int, dict[str, int]]], key: str) -> None:
    """A table of groups: exactly `expected` {name: (processes, counters)}, biggest first."""
    if program == "nfacct":
        got = {r[key]: r for r in rich_rows(out)}
        assert set(got) == set(expected)
        for name, (processes, c) in expected.items():
            assert got[name]["processes"] == str(processes)
            for column, proto, d in (
                ("tcp snd", "tcp", "snd"),
                ("tcp rcv", "tcp", "rcv"),
                ("udp snd", "udp", "snd"),
                ("udp rcv", "udp", "rcv"),
            ):
                want = f"{c[f'{proto}{d}packs']}/{human_bytes(c[f'{proto}{d}bytes'])}"
                assert got[name][column] == want, (name, column)
    else:
        got = tabulate_rows(out)
        assert [r[key] for r in got] == list(expected)  # the order too: biggest first
        for r in got:
            processes, c = expected[r[key]]
            sent, received = c["tcpsndbytes"] + c["udpsndbytes"], c["tcprcvbytes"] + c["udprcvbytes"]
            assert (r["processes"], r["sent"], r["received"]) == (str(processes), str(sent), str(received))


def by_command(program: str, out: str, w: World) -> None:
    check_groups(program, out, {"curl": (3, w.curl), "socat": (1, w.socat)}, "command")


def by_user(program: str, out: str, w: World) -> None:
    check_groups(program, out, {"0": (3, w.curl), str(NOBODY): (1, w.socat)}, "uid")


def by_cgroup(program: str, out: str, w: World) -> None:
    check_groups(program, out, {w.curl_cgroup: (3, w.curl), w.own_cgroup: (1, w.socat)}, "cgroup")


def by_unit(program: str, out: str, w: World) -> None:
    # socat's cgroup is ours: no unit here ("-" in nfacct's table, "" from SQL), or the unit of
    # the cgroup the tests run in (a CI job's session scope or service)
    own = unit(w.own_cgroup) or ("-" if program == "nfacct" else "")
    check_groups(program, out, {UNIT: (3, w.curl), own: (1, w.socat)}, "unit")


def one_process(program: str, out: str, w: World) -> None:
    if program == "nfacct":
        check_groups(program, out, {str(w.socat_pid): (1, w.socat)}, "pid")
        return
    [row] = tabulate_rows(out)
    assert (row["pid"], row["command"], row["uid"]) == (str(w.socat_pid), "socat", str(NOBODY))
    assert row["cmdline"].startswith("socat -b 500 -u STDIN UDP4-SENDTO:")
    assert (row["sent"], row["received"]) == (str(w.socat["udpsndbytes"]), "0")
    assert row["ended"] >= row["started"] != ""


def gaps(program: str, out: str, w: World) -> None:
    if program == "nfacct":
        caption = f"{w.gap} packets passed unaccounted in 1 gaps (table `unaccounted`)"
        assert caption in " ".join(out.split())
        return
    [row] = tabulate_rows(out)
    assert (row["packets"], row["reason"]) == (
        str(w.gap),
        "no daemon counting (stopped, restarting or killed)",
    )
    assert row["ended"] >= row["began"] != ""


CHECKS = {
    "by-command": by_command,
    "by-user": by_user,
    "by-cgroup": by_cgroup,
    "by-unit": by_unit,
    "one-process": one_process,
    "gaps": gaps,
}


def test_every_block_of_the_doc_is_checked():
    found = blocks(DOC.read_text())
    assert [b.name for b in found] == list(CHECKS)
    for b in found:  # each question answered both ways, each answer shown
        assert [c.argv[0] for c in b.commands] == ["nfacct", "sqlite-utils"], b.name
        assert all(c.shown.strip() for c in b.commands), b.name
        assert b.commands[1].argv[1:3] == ["query", DEFAULT_DB], b.name
    one = next(b for b in found if b.name == "one-process")
    assert all(PID_IN_DOC in c.argv for c in one.commands)  # the pid `run` replaces


@pytest.mark.parametrize("block", blocks(DOC.read_text()), ids=lambda b: b.name)
def test_the_documented_queries_answer_with_the_traffic_made(block, world):
    for command in block.commands:
        CHECKS[block.name](command.argv[0], run(command, world), world)
