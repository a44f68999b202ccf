"""The command line: wrong input gets one clear line and a non-zero exit; output is escaped."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from conftest import migrated
from rich.console import Console

from nfacct.display import print_tasks
from nfacct.tables import COUNTER_NAMES

LONG_PATH = "/tmp/" + "s" * 103  # 108 bytes: one more than sockaddr_un holds with its NUL
# Should a flag's check ever let a value through, the daemon stops at the missing namespace: no
# test may start one in the root namespace or on the host's control socket and database.
RUN = (
    "run",
    "--netns",
    "nfacct-missing-ns",
    "--control",
    "/tmp/nfacct-test-missing.sock",
    "--db",
    "/tmp/nfacct-test-missing.db",
)


def nfacct(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nfacct", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        pytest.param(
            ("rules", "install", "--netns", "nfacct-missing-ns"),
            2,  # a mistake on the command line, as argparse's own are
            "network namespace 'nfacct-missing-ns' does not exist",
            marks=pytest.mark.root,  # without root: "managing nftables rules needs root"
        ),
        (
            ("run", "--netns", "nfacct-missing-ns", "--control", "/tmp/nfacct-test-missing.sock"),
            2,
            "does not exist",
        ),
        (
            ("top", "--once", "--control", "/nonexistent/nfacct.sock"),
            1,
            "no nfacct daemon at /nonexistent/nfacct.sock",
        ),
        (("status", "--control", "/nonexistent/nfacct.sock"), 1, "no nfacct daemon"),
        (("rules", "install", "--queue", "70000"), 2, "queue number 70000 is out of range"),
        ((*RUN, "--queue", "abc"), 2, "argument --queue: queue number must be an integer, not 'abc'"),
        (("rules", "install", "--bogus"), 2, "unrecognized arguments: --bogus"),
        ((*RUN, "--queue-maxlen", "0"), 2, "argument --queue-maxlen: expected a positive integer, not '0'"),
        (("rules", "install", "--backend", "pf"), 2, "invalid choice: 'pf'"),
        (
            (*RUN, "--queue-maxlen", "99999999999"),
            2,
            "argument --queue-maxlen: 99999999999 is more than the limit of 1,048,576",
        ),
        ((*RUN, "--control", LONG_PATH), 2, "argument --control: control socket path is 108 bytes"),
        (("top", "--control", LONG_PATH), 2, "a UNIX socket path is at most 107"),
        (("status", "--control", LONG_PATH + "x"), 2, "argument --control: control socket path is 109 bytes"),
        *(
            ((*RUN, flag, value), 2, f"argument {flag}: expected a finite number of seconds, not '{value}'")
            for flag in ("--gc-cycle", "--checkpoint-interval", "--udp-idle", "--tcp-idle", "--closed-idle")
            for value in ("nan", "inf")
        ),
        ((*RUN, "--unreferenced-idle=-inf"), 2, "argument --unreferenced-idle: expected a finite"),
        ((*RUN, "--gc-cycle", "0"), 2, "argument --gc-cycle: expected a positive number of seconds"),
        ((*RUN, "--gc-cycle", "86401"), 2, "argument --gc-cycle: 86401 seconds is more than the limit"),
        ((*RUN, "--checkpoint-interval", "1e6"), 2, "argument --checkpoint-interval: 1e6 seconds is more"),
        ((*RUN, "--tcp-idle", "31536001"), 2, "argument --tcp-idle: 31536001 seconds is more than the"),
        ((*RUN, "--udp-idle=-1"), 2, "argument --udp-idle: expected a positive number of seconds"),
        (("top", "--interval", "nan"), 2, "argument --interval: expected a finite number of seconds"),
        (("top", "--interval", "0"), 2, "argument --interval: expected a positive number of seconds"),
        (("top", "--interval", "1e9"), 2, "argument --interval: 1e9 seconds is more than the limit of 86,"),
        ((*RUN, "--max-sockinfo", "0"), 2, "argument --max-sockinfo: expected a positive integer, not '0'"),
        ((*RUN, "--max-sockinfo", "1e9"), 2, "argument --max-sockinfo: expected an integer, not '1e9'"),
        ((*RUN, "--max-sockinfo", "10000001"), 2, "argument --max-sockinfo: 10000001 is more than the"),
        ((*RUN, "--max-taskinfo", "5000000"), 2, "argument --max-taskinfo: 5000000 is more than the"),
        (("history", "--since", "0001-01-01"), 2, "argument --since: expected a duration like 1h"),
        (("history", "--pid", "0"), 2, "argument --pid: expected a positive integer, not '0'"),
    ],
)
def test_bad_input_names_the_problem(args, code, message):
    r = nfacct(*args)
    assert r.returncode == code
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    if code == 1:
        assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists("/tmp/nfacct-test-missing.sock"), "a failed start left its socket behind"
    assert not os.path.exists("/tmp/nfacct-test-missing.db"), "a failed start left a database behind"


def test_not_root_is_a_clear_error(monkeypatch, capsys):
    # In-process with a non-root euid: a checkout under a 0700 directory is unreadable to
    # a real unprivileged user, which would test the file mode instead of our message.
    from nfacct import cli

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["rules", "show"]) == 1
    assert "needs root" in capsys.readouterr().err


def test_hostile_process_names_are_escaped_in_tables():
    task = dict.fromkeys(COUNTER_NAMES, 1)
    task.update(pid=1, btime=0, uid=0, comm="\x1b[2J\x1b[31mevil[/bold]", cmdline="x\x07\r\nrm -rf")
    out = io.StringIO()
    print_tasks([task], Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "\\x1b[2J" in text and "[/bold]" in text  # shown literally, not interpreted


def test_history_groups_exited_processes_of_a_period(tmp_path):
    import time as _time

    from nfacct.store import Store

    db = str(tmp_path / "h.db")
    store = Store(db)
    now = _time.time()
    base = dict.fromkeys(COUNTER_NAMES, 0)
    store.save_exited(
        [
            {
                **base,
                "pid": 1,
                "btime": 1.0,
                "exit_time": now - 60,
                "command": "curl",
                "cmdline": "",
                "uid": 0,
                "cgroup": "",
                "tcpsndbytes": 100,
            },
            {
                **base,
                "pid": 2,
                "btime": 2.0,
                "exit_time": now - 30,
                "command": "curl",
                "cmdline": "",
                "uid": 0,
                "cgroup": "",
                "tcpsndbytes": 50,
            },
            {
                **base,
                "pid": 3,
                "btime": 3.0,
                "exit_time": now - 7200,
                "command": "old",
                "cmdline": "",
                "uid": 1,
                "cgroup": "",
                "tcpsndbytes": 999,
            },
        ]
    )
    store.close()
    out = nfacct("history", "--db", db, "--since", "1h", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["command"], r["processes"], r["tcpsndbytes"]) for r in rows] == [("curl", 2, 150)]
    assert nfacct("history", "--db", db, "--since", "2x").returncode == 2


def test_a_newer_schema_is_refused_clearly(tmp_path):
    import sqlite3

    db = str(tmp_path / "new.db")
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    out = nfacct("history", "--db", db)
    assert out.returncode == 1
    assert "schema 99 is newer" in out.stderr


def test_a_version_1_database_is_migrated_and_keeps_its_rows(tmp_path):
    import sqlite3

    db = str(tmp_path / "v1.db")
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE exited_tasks (pid INTEGER, btime FLOAT, command TEXT, cmdline TEXT, uid INTEGER,"
        " cgroup TEXT, exit_time FLOAT, tcpsndpacks INTEGER, tcpsndbytes INTEGER, tcprcvpacks INTEGER,"
        " tcprcvbytes INTEGER, udpsndpacks INTEGER, udpsndbytes INTEGER, udprcvpacks INTEGER,"
        " udprcvbytes INTEGER, PRIMARY KEY (pid, btime))"
    )
    conn.execute("INSERT INTO exited_tasks VALUES (7, 1.0, 'old', 'old', 0, '', 2.0, 1, 2, 3, 4, 5, 6, 7, 8)")
    with migrated(db, conn, 1) as store:
        assert store.unaccounted() == (0, 0)
        assert store.state("covered:") is None
        assert store.offloaded("covered:") == {}


def test_takeover_without_a_daemon_to_take_over_is_a_clear_error(tmp_path):
    control = str(tmp_path / "control.sock")
    r = nfacct("run", "--takeover", "--control", control, "--db", str(tmp_path / "db"))
    assert r.returncode == 1
    assert r.stderr.strip() == f"nfacct: error: no nfacct daemon at {control} (start one with `nfacct run`)"
    assert not os.path.exists(control)


HOSTILE = b"evil\x1b]0;pwned\x07\xff"  # sets the terminal's title, rings, and is not UTF-8


def history_csv(tmp_path, command: str) -> list[str]:
    """`nfacct history --csv` of a database holding one process named `command`."""
    from nfacct.store import Store

    db = str(tmp_path / "one.db")
    store = Store(db)
    row = dict.fromkeys(COUNTER_NAMES, 1)
    row.update(pid=1, btime=1.0, exit_time=0.0, uid=0, cgroup="/", command=command, cmdline="")
    store.save_exited([row])
    store.close()
    return [sys.executable, "-m", "nfacct", "history", "--db", db, "--csv"]


@pytest.fixture
def hostile_csv(tmp_path) -> list[str]:
    from nfacct import text

    return history_csv(tmp_path, text.decode(HOSTILE))


def test_csv_to_a_pipe_is_the_exact_bytes(hostile_csv):
    out = subprocess.run(hostile_csv, capture_output=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == HOSTILE + b",1" + b",1" * len(COUNTER_NAMES)


def test_csv_to_a_terminal_is_escaped(hostile_csv):
    import pty

    master, slave = pty.openpty()
    p = subprocess.Popen(hostile_csv, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert p.wait(timeout=10) == 0, p.stderr.read()
    assert not {b for b in out if b < 0x20} - {0x0D, 0x0A}
    assert b"\\x1b]0;pwned\\x07\\xff,1," in out
    out.decode("utf-8")


def test_a_reader_that_leaves_early_ends_the_output_quietly(tmp_path):
    argv = [*history_csv(tmp_path, "curl")[:-1], "--json"]
    r, w = os.pipe()
    os.close(r)  # `nfacct history --json | head -0`: gone before the first byte
    with os.fdopen(w, "wb") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, text=True)
    assert (done.returncode, done.stderr) == (141, "")
