"""Hostile names: process names, command lines and cgroup paths are bytes chosen by any local
user, not necessarily UTF-8, with control characters. They must not stop the daemon, must be
stored byte for byte and must never reach a terminal raw.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys

import pytest
from conftest import count_port, exited_rows, kernel, need_root, until
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from lab.daemon import Daemon
from lab.hosts import PEER_V4
from nfacct import text
from nfacct.display import print_tasks
from nfacct.procs import process_facts, process_name
from nfacct.tables import COUNTER_NAMES

EVIL = b"evil\xff\x1b[2J"  # not UTF-8, and clears the screen of whoever prints it raw
PYTHON = os.fsencode(sys.executable)  # not a wrapper script (pyenv's shim): `exec -a` must reach python
# Sends one datagram from port argv[1] to the peer and waits for its stdin to close; writes its
# own name (comm) from $COMM first, if set.
SENDER = (
    "import os, socket, sys\n"
    "name = os.environb.get(b'COMM')\n"
    "if name:\n"
    "    open('/proc/self/comm', 'wb').write(name)\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind(('', int(sys.argv[1])))\n"
    f"s.sendto(b'hi', ('{PEER_V4}', 9))\n"
    "print('sent', flush=True)\n"
    "sys.stdin.read()\n"
).encode()


def no_raw_bytes(out: bytes) -> None:
    """Nothing a terminal would interpret: no ESC, no BEL, no byte that is not UTF-8."""
    assert b"\x1b" not in out and b"\x07" not in out
    out.decode("utf-8")  # rich's box drawing is UTF-8; a raw \xff is not


@pytest.fixture
def hostile_cgroup():
    """A cgroup v2 directory named with bytes that are not UTF-8: (its cgroup.procs, its path as
    /proc/PID/cgroup shows it)."""
    need_root()
    with open("/proc/self/mountinfo", "rb") as f:
        mounts = [line.split() for line in f]
    found = [(m[4], m[3]) for m in mounts if m[m.index(b"-") + 1] == b"cgroup2"]
    if not found:
        pytest.skip("no cgroup v2 hierarchy mounted")
    mountpoint, root = found[0]
    name = b"nfacct-test-\xff\x1b[2J-" + str(os.getpid()).encode()
    directory = mountpoint + b"/" + name
    os.mkdir(directory)
    yield directory + b"/cgroup.procs", root.rstrip(b"/") + b"/" + name
    os.rmdir(directory)


# ---- the codec ----------------------------------------------------------------------------------


@given(st.binary(max_size=64))
def test_names_survive_sqlite_byte_for_byte(raw):
    name = text.decode(raw)
    assert text.encode(name) == raw
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (name TEXT)")
    conn.execute("INSERT INTO t VALUES (?)", (text.to_sql(name),))
    stored, kind = conn.execute("SELECT name, typeof(name) FROM t").fetchone()
    assert text.from_sql(stored) == name
    try:
        raw.decode("utf-8")
        assert kind == "text"  # the common case stays readable in queries
    except UnicodeDecodeError:
        assert (kind, stored) == ("blob", raw)


@given(st.binary(max_size=64))
def test_escaped_names_hold_nothing_a_terminal_interprets(raw):
    shown = text.escape(text.decode(raw))
    assert shown.isprintable()
    shown.encode("utf-8")  # no lone surrogate left


def test_escape_shows_bytes_and_control_characters():
    assert text.escape(text.decode(EVIL)) == "evil\\xff\\x1b[2J"
    assert text.escape("a\tb\nc\x07") == "a\\tb\\nc\\x07"
    assert text.escape("\u0085\u202e\U000e0001") == "\\u0085\\u202e\\U000e0001"
    assert text.escape("café ünïcode \\x41") == "café ünïcode \\x41"


def test_names_survive_json():
    name = text.decode(EVIL)
    dumped = json.dumps({"comm": name})
    assert dumped.isascii() and "\\udcff" in dumped and "\\u001b" in dumped
    assert text.encode(json.loads(dumped)["comm"]) == EVIL


def test_tables_show_undecodable_bytes_escaped():
    task = dict.fromkeys(COUNTER_NAMES, 1)
    task.update(pid=1, btime=0, uid=0, comm=text.decode(EVIL), cmdline=text.decode(b"x \xfe\x9b1m"))
    out = io.StringIO()
    print_tasks([task], Console(file=out, width=200, color_system=None))
    shown = out.getvalue()
    assert "evil\\xff\\x1b[2J" in shown and "x \\xfe\\x9b1m" in shown
    shown.encode("utf-8")


# ---- /proc --------------------------------------------------------------------------------------


def test_process_facts_keep_the_exact_bytes(hostile_cgroup, procs):
    cgroup_procs, cgroup = hostile_cgroup
    script = b'echo $$ > "$2"; exec -a "$0" "$3" -c "$1" 0 "\xfe\n"'
    code = b"import os, sys; open('/proc/self/comm', 'wb').write(os.environb[b'COMM']); print(1, flush=True)"
    p = subprocess.Popen(
        [b"bash", b"-c", script, EVIL, code + b"; sys.stdin.read()", cgroup_procs, PYTHON],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environb, b"COMM": EVIL},
    )
    procs.append(p)
    assert p.stdout.readline() == b"1\n"
    facts = process_facts(p.pid)
    p.stdin.close()
    assert p.wait(timeout=5) == 0
    assert facts is not None
    assert text.encode(facts.comm) == EVIL
    assert text.encode(facts.cmdline) == EVIL + b" -c " + code + b"; sys.stdin.read() 0 \xfe\n"
    assert text.encode(facts.cgroup) == cgroup


# ---- end to end ---------------------------------------------------------------------------------


def start_sender(lab, procs, argv: list[bytes], env: dict[bytes, bytes] | None = None) -> subprocess.Popen:
    """`argv` in the accounted namespace, once it has sent its datagram."""
    p = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environb, **(env or {})},
    )
    procs.append(p)
    assert p.stdout.readline() == b"sent\n"
    return p


def task_rows(db: str, table: str) -> dict[int, dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return {r["pid"]: dict(r) for r in conn.execute(f"SELECT * FROM {table}")}
    finally:
        conn.close()


def nfacct(*args: str) -> bytes:
    """stdout of the command line, as the bytes it wrote."""
    r = subprocess.run([sys.executable, "-m", "nfacct", *args], capture_output=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_hostile_names_are_stored_exactly_and_shown_escaped(
    lab, rules, counters, hostile_cgroup, tmp_path, port, daemons, procs
):
    cgroup_procs, cgroup = hostile_cgroup
    daemon = Daemon(lab.acct, tmp_path)
    daemons.append(daemon)
    plain_port, evil_port = port(), port()
    for p in (plain_port, evil_port):
        count_port(counters, "udp", p)
    # As the reviewer crashed the daemon: a \xff in argv, then argv[0], comm and cgroup.
    argv = [PYTHON, b"-c", SENDER, b"%d" % plain_port, b"\xff"]
    plain = start_sender(lab, procs, lab.cmd(lab.acct, argv))
    # Into the cgroup from here: `ip netns exec` mounts a /sys without the cgroup hierarchy.
    exec_a = lab.cmd(lab.acct, [b"bash", b"-c", b'exec -a "$0" "$1" -c "$2" "$3"', EVIL, PYTHON, SENDER])
    argv = [b"bash", b"-c", b'echo $$ > "$1"; shift; exec "$@"', b"bash", cgroup_procs, *exec_a]
    evil = start_sender(lab, procs, [*argv, b"%d" % evil_port], {b"COMM": EVIL})
    expected = {
        plain.pid: (PYTHON, PYTHON + b" -c " + SENDER + b" %d \xff" % plain_port, None, plain_port),
        evil.pid: (EVIL, EVIL + b" -c " + SENDER + b" %d" % evil_port, cgroup, evil_port),
    }

    def live_counts() -> dict[int, int]:
        return {t["pid"]: t["udpsndpacks"] for t in daemon.top() if t["pid"] in expected}

    def check(rows: dict[int, dict]) -> None:
        """The rows hold the exact bytes, and the kernel's count."""
        for pid, (command, cmdline, cg, sport) in expected.items():
            as_bytes = {k: v.encode() if isinstance(v, str) else v for k, v in rows[pid].items()}
            assert as_bytes["command"] == os.path.basename(command)[:15]  # comm: the file name, truncated
            assert as_bytes["cmdline"] == cmdline
            if cg is not None:
                assert as_bytes["cgroup"] == cg
            assert {c: rows[pid][c] for c in COUNTER_NAMES} == kernel(counters, "udp", sport)

    assert until(live_counts, {plain.pid: 1, evil.pid: 1}) == {plain.pid: 1, evil.pid: 1}
    top = nfacct("top", "--once", "--control", daemon.control)
    no_raw_bytes(top)
    assert b"evil\\xff\\x1b[2J" in top

    # The checkpoint of running processes, then a restart that takes the names back from it.
    assert daemon.stop() == 0, daemon.log.read_text()
    check(task_rows(daemon.db, "live_tasks"))
    daemon = Daemon(lab.acct, tmp_path, db=daemon.db)
    daemons.append(daemon)
    restored = {t["pid"]: text.encode(t["comm"]) for t in daemon.top() if t["pid"] in expected}
    assert restored == {pid: os.path.basename(e[0])[:15] for pid, e in expected.items()}

    for p in (plain, evil):
        p.stdin.close()
        assert p.wait(timeout=5) == 0
    assert until(lambda: set(expected) <= set(exited_rows(daemon.db)), True), "the exits were not recorded"
    assert daemon.proc.poll() is None, daemon.log.read_text()
    check(exited_rows(daemon.db))

    escaped_cgroup = text.escape(text.decode(cgroup)).encode()
    for by, escaped in (("command", b"evil\\xff\\x1b[2J"), ("cgroup", escaped_cgroup)):
        shown = nfacct("history", "--db", daemon.db, "--by", by)
        no_raw_bytes(shown)
        assert escaped in shown
    listed = {r["command"] for r in json.loads(nfacct("history", "--db", daemon.db, "--json"))}
    assert text.decode(EVIL) in listed
    assert daemon.stop() == 0, daemon.log.read_text()


def test_a_name_that_ends_with_a_newline_keeps_it():
    """/proc adds one newline after the name; a name may end with its own (found by the metrics
    work: every trailing newline was stripped)."""
    code = (
        "import ctypes, sys; ctypes.CDLL(None).prctl(15, b'nl\\n', 0, 0, 0);"
        " print('ready', flush=True); sys.stdin.read()"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        assert process_name(p.pid) == "nl\n"
        assert process_facts(p.pid).comm == "nl\n"
    finally:
        p.kill()
        p.wait()
