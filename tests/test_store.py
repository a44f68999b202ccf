"""The database file: root only, read-only for `history`, damaged files set aside (never
overwritten), and nothing left behind by a failed start."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import traceback

import pytest

from lab.daemon import Daemon
from nfacct.store import FLOW_ROWS, SCHEMA_VERSION, Offloaded, Store
from nfacct.tables import COUNTER_NAMES

NOBODY = 65534
SIDECARS = ("", "-wal", "-shm")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def rows(n: int, start: int = 0) -> list[dict]:
    base = dict.fromkeys(COUNTER_NAMES, 1)
    return [
        {**base, "pid": i, "btime": float(i), "exit_time": time.time(), "command": f"c{i % 7}",
         "cmdline": f"cmd {i} " + "x" * 200, "uid": 0, "cgroup": "/"}
        for i in range(start, start + n)
    ]  # fmt: skip


def history(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nfacct", "history", *args], capture_output=True, text=True)


@pytest.fixture
def shared_dir():
    """A directory every user may enter (pytest's tmp_path is root's alone, which would hide
    the modes under test from a non-root user)."""
    path = tempfile.mkdtemp(prefix="nfacct-test-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def as_nobody(argv: list[str]) -> tuple[int, str]:
    """nfacct.cli.main(argv) in a child running as uid/gid 65534: (exit status, stderr).

    In-process after fork, with every module it uses imported: the child needs no access to
    the checkout or the Python installation (under root's 0700 home), only to what it reads."""
    from nfacct import cli, display  # noqa: F401 (display: cmd_history imports it late)

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.close(r)
            sys.stderr = os.fdopen(w, "w")
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = cli.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


# ---- modes --------------------------------------------------------------------------------------


def test_a_daemon_writes_root_only_files_in_root_only_directories(lab, rules, tmp_path, daemons):
    parent_mode = mode(tmp_path)
    db = tmp_path / "var" / "nfacct" / "nfacct.db"
    daemon = Daemon(lab.acct, tmp_path, db=str(db))
    daemons.append(daemon)
    assert daemon.status()["store"]["writes"] >= 1
    assert {s: mode(f"{db}{s}") for s in SIDECARS} == dict.fromkeys(SIDECARS, 0o600)
    assert (mode(tmp_path / "var"), mode(db.parent)) == (0o700, 0o700)
    assert mode(tmp_path) == parent_mode, "changed a directory it did not create"
    assert daemon.stop() == 0


def test_existing_files_become_root_only_before_they_are_written(tmp_path):
    db = str(tmp_path / "old.db")
    writer = sqlite3.connect(db)  # an older nfacct's files, 0644, -wal and -shm still there
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("CREATE TABLE t (x)")
    writer.commit()
    os.chmod(tmp_path, 0o755)
    for s in SIDECARS:
        os.chmod(f"{db}{s}", 0o644)
    store = Store(db)
    store.close()
    writer.close()
    assert {s: mode(f"{db}{s}") for s in SIDECARS if os.path.exists(f"{db}{s}")} == {"": 0o600}
    assert mode(tmp_path) == 0o755


# ---- history: read only, root only --------------------------------------------------------------


@pytest.mark.root  # as_nobody changes user
@pytest.mark.parametrize("where", ["nfacct/nfacct.db", "nfacct.db"], ids=["store's directory", "file mode"])
def test_history_by_another_user_is_one_clear_line(shared_dir, where):
    db = os.path.join(shared_dir, where)
    store = Store(db)
    store.save_exited(rows(3))
    store.close()
    code, err = as_nobody(["history", "--db", db])
    assert code == 1
    assert err == (
        f"nfacct: error: cannot read {db}: permission denied (it holds every user's command lines and is"
        " readable by root only; see docs/security.md)\n"
    )


def test_history_reads_without_writing(tmp_path):
    db = tmp_path / "nfacct.db"
    store = Store(str(db))
    store.save_exited(rows(3))
    store.close()
    before = (sorted(os.listdir(tmp_path)), digest(db), os.stat(db).st_mtime_ns)
    out = history("--db", str(db), "--json")
    assert out.returncode == 0, out.stderr
    assert (sorted(os.listdir(tmp_path)), digest(db), os.stat(db).st_mtime_ns) == before

    missing = tmp_path / "missing" / "nfacct.db"
    out = history("--db", str(missing))
    assert out.returncode == 1
    assert out.stderr == f"nfacct: error: no database at {missing} (nfacct run --db writes one)\n"
    assert not os.path.exists(missing.parent)


def test_history_of_an_older_schema_says_to_migrate_and_leaves_it(tmp_path):
    db = str(tmp_path / "v1.db")
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE exited_tasks (pid INTEGER, btime FLOAT)")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    before = digest(db)
    out = history("--db", db)
    assert out.returncode == 1
    assert out.stderr == (
        f"nfacct: error: database {db} has schema 1, older than this nfacct's {SCHEMA_VERSION}:"
        " run the daemon (nfacct run) once to migrate it\n"
    )
    assert digest(db) == before and os.listdir(tmp_path) == ["v1.db"]


# ---- damaged databases --------------------------------------------------------------------------


@pytest.fixture(params=["malformed pages", "not a database"])
def damaged(request, tmp_path):
    """A database as a crash might leave it (-wal and -shm still there), with damaged pages; or a
    file that is no database at all. Returns its path."""
    db = str(tmp_path / "db" / "nfacct.db")
    if request.param == "not a database":
        os.makedirs(os.path.dirname(db))
        with open(db, "wb") as f:
            f.write(b"#!/bin/sh\n" * 1000)
        return db
    made = str(tmp_path / "made.db")
    store = Store(made)
    store.save_exited(rows(2000))
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.save_exited(rows(10, start=5000))  # in the WAL only
    os.makedirs(os.path.dirname(db))
    for s in SIDECARS:  # copied while open: the state a SIGKILL leaves
        shutil.copy(f"{made}{s}", f"{db}{s}")
    store.close()
    with open(db, "r+b") as f:
        f.seek(os.path.getsize(db) // 2)
        f.write(os.urandom(20 * 4096))
    check = str(tmp_path / "check.db")  # a copy: opening the original must be left to the test
    for s in SIDECARS:
        shutil.copy(f"{db}{s}", f"{check}{s}")
    conn = sqlite3.connect(check)
    with pytest.raises(sqlite3.DatabaseError, match="database disk image is malformed"):
        conn.execute("SELECT SUM(LENGTH(cmdline)) FROM exited_tasks").fetchall()
    conn.close()
    return db


def test_history_of_a_damaged_database_names_it_and_the_recovery(damaged):
    before = {s: digest(f"{damaged}{s}") for s in SIDECARS if os.path.exists(f"{damaged}{s}")}
    out = history("--db", damaged)
    assert out.returncode == 1
    assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"nfacct: error: {damaged} is damaged (")
    assert f"sqlite3 {damaged} .recover | sqlite3 recovered.db" in out.stderr
    assert {s: digest(f"{damaged}{s}") for s in SIDECARS if os.path.exists(f"{damaged}{s}")} == before


def test_a_daemon_sets_a_damaged_database_aside_and_starts_anew(lab, rules, tmp_path, daemons, damaged):
    before = {s: digest(f"{damaged}{s}") for s in SIDECARS if os.path.exists(f"{damaged}{s}")}
    daemon = Daemon(lab.acct, tmp_path, db=damaged)
    daemons.append(daemon)
    assert daemon.status()["store"]["writes"] >= 1
    directory = os.path.dirname(damaged)
    aside = sorted(n for n in os.listdir(directory) if ".damaged-" in n)
    base = os.path.join(directory, aside[0])
    assert {s: digest(f"{base}{s}") for s in before} == before, "the damaged files were changed"
    assert aside == sorted(os.path.basename(base) + s for s in before)
    conn = sqlite3.connect(damaged)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert daemon.stop() == 0
    warnings = [line for line in daemon.log.read_text().splitlines() if "damaged" in line]
    assert len(warnings) == 1, daemon.log.read_text()
    assert base in warnings[0] and f"sqlite3 {base} .recover | sqlite3 recovered.db" in warnings[0]


# ---- a failed start leaves nothing behind -------------------------------------------------------


def test_discard_removes_what_the_store_created_and_nothing_else(tmp_path):
    db = tmp_path / "a" / "b" / "nfacct.db"
    store = Store(str(db))
    store.checkpoint(rows(1))
    assert os.path.exists(f"{db}-wal")
    store.discard()
    assert os.listdir(tmp_path) == []

    other = tmp_path / "a" / "keep"  # someone else's file in a directory the store creates
    store = Store(str(tmp_path / "a" / "b" / "nfacct.db"))
    os.makedirs(other)
    store.discard()
    assert sorted(os.listdir(tmp_path / "a")) == ["keep"]

    existing = str(tmp_path / "existing.db")
    store = Store(existing)
    store.save_exited(rows(1))
    store.close()
    store = Store(existing)
    store.discard()
    store.discard()  # twice, or after close: the same
    assert [r["pid"] for r in Store(existing, readonly=True).exited()] == [0]


# ---- a long checkpoint lets the daemon serve its queues ------------------------------------------


def test_a_checkpoint_of_many_flows_pauses_between_chunks_and_writes_them_all(tmp_path):
    """5,000 offloaded readings and 3,000 flows gone: the writing pauses between chunks of
    FLOW_ROWS (where the daemon reads its queues), within one transaction that keeps them all."""
    store = Store(str(tmp_path / "nfacct.db"))
    flow = [i.to_bytes(4, "big") for i in range(8000)]
    store.checkpoint([], offloaded=[Offloaded("ns", {f: [1, 2, 3, 4] for f in flow}, [])])
    pauses = []
    gone = Offloaded("ns", {f: [5, 6, 7, 8] for f in flow[:5000]}, flow[5000:])
    store.checkpoint([], offloaded=[gone], pause=lambda: pauses.append(len(store.offloaded("ns"))))
    assert len(pauses) == -(-5000 // FLOW_ROWS) + -(-3000 // FLOW_ROWS)
    assert pauses[0] == 8000, "another connection sees nothing of the transaction under way"
    saved = store.offloaded("ns")
    assert len(saved) == 5000 and all(saved[f] == [5, 6, 7, 8] for f in flow[:5000])
