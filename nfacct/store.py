"""SQLite persistence (sqlite-utils): exited processes forever, live ones as checkpoints.

`exited_tasks` holds one row per process that ever sent or received a packet, with its final
totals. `live_tasks` is the latest checkpoint of running processes, so a restarted daemon
continues their counts and a process that exits while no daemon runs is still recorded.
`unaccounted` records packets that reached the queue rule but no process's totals (see
`coverage`), and `state` the counter value the last checkpoint settled. `offloaded_flows` holds,
per namespace (`scope`), the element readings of offloaded flows that the checkpoint's totals
include, so a daemon restarted after a crash credits exactly what its elements counted since.
Processes and gaps say their network namespace (`netns`: its name; NULL: the daemon's own). The
file is plain SQLite in WAL mode: sqlite-utils and Datasette open it without help.

Command lines are other users' secrets: the file and its -wal and -shm are root's alone (0600),
in directories the store creates 0700. Names that are not UTF-8 are BLOBs (see `text`).

Longer than most rooms (~390 lines) because opening the file safely is half of it: modes,
read-only opening for `history` without leaving files behind, integrity check and setting a
damaged file aside; the schema, writes and queries are the other half, and they share the
connection and its errors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import sqlite_utils

from . import text, units
from .files import make_dirs, remove_dirs
from .tables import COUNTER_NAMES

log = logging.getLogger("nfacct")

SCHEMA_VERSION = 4
DEFAULT_DB = "/var/lib/nfacct/nfacct.db"
FLOW_ROWS = 2048  # offloaded_flows rows a checkpoint writes between pauses: about 10 ms
SIDECARS = ("-wal", "-shm")  # SQLite's companions of a WAL database, named after it

_facts = {"pid": int, "btime": float, "command": str, "cmdline": str, "uid": int, "cgroup": str, "netns": str}
_counters = dict.fromkeys(COUNTER_NAMES, int)
EXITED_COLUMNS = (*_facts, "exit_time", *COUNTER_NAMES)
LIVE_COLUMNS = (*_facts, "checkpoint_time", *COUNTER_NAMES)
OFFLOAD_COLUMNS = ("out_packets", "out_bytes", "in_packets", "in_bytes")
NAME_COLUMNS = ("command", "cmdline", "cgroup")  # TEXT, or BLOB when not UTF-8 (text.to_sql)
BY_COLUMNS = {"command": "command", "uid": "uid", "cgroup": "cgroup", "pid": "pid", "netns": "netns"}
# The unit (nfacct.units) is derived from the cgroup at query time, not stored: the mapping can
# improve without a migration, and rows written before it have a unit too.
BY_COLUMNS["unit"] = "nfacct_unit(cgroup)"
# SQLITE_CORRUPT ("database disk image is malformed"), SQLITE_NOTADB ("file is not a database") and
# SQLITE_TOOBIG ("string or blob too big": quick_check's answer to a record length that random bytes
# written over pages made absurd, seen in 1 run of about 50 of tests/test_store.py)
_DAMAGE = (11, 18, 26)
_ROOT_ONLY = (
    "permission denied (it holds every user's command lines and is readable by root only;"
    " see docs/security.md)"
)


class StoreError(Exception):
    pass


@dataclass
class Offloaded:
    """What a checkpoint writes of the offloaded flows of one namespace: the readings credited
    since the last one, and the flows whose elements are gone."""

    scope: str
    credited: dict[bytes, list[int]]
    forgotten: list[bytes]


def _migrate(db: sqlite_utils.Database) -> None:
    version = _version(db)
    if version < 1:
        db["exited_tasks"].create(
            {**_facts, "exit_time": float, **_counters},
            pk=("pid", "btime"),
            not_null={"pid", "btime"},
            if_not_exists=True,
        )
        db["exited_tasks"].create_index(["exit_time"], if_not_exists=True)
        db["exited_tasks"].create_index(["command", "exit_time"], if_not_exists=True)
        db["live_tasks"].create(
            {**_facts, "checkpoint_time": float, **_counters}, pk=("pid", "btime"), if_not_exists=True
        )
    if version < 2:
        db["unaccounted"].create(
            {"start": float, "end": float, "packets": int, "reason": str, "netns": str}, if_not_exists=True
        )
        db["unaccounted"].create_index(["end"], if_not_exists=True)
        db["state"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
    if version < 3:
        db["offloaded_flows"].create(
            {"scope": str, "flow": bytes, **dict.fromkeys(OFFLOAD_COLUMNS, int)},
            pk=("scope", "flow"),
            if_not_exists=True,
        )
    if version < 4:  # one daemon, several namespaces: each row says its own
        for table in ("exited_tasks", "live_tasks", "unaccounted"):
            if db[table].exists() and "netns" not in db[table].columns_dict:
                db[table].add_column("netns", str)
    # Later versions add their steps here, each guarded by `if version < N`.
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _version(db: sqlite_utils.Database) -> int:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"database schema {version} is newer than this nfacct understands ({SCHEMA_VERSION})"
        )
    return version


def _is_damage(e: sqlite3.Error) -> bool:
    return getattr(e, "sqlite_errorcode", 0) & 0xFF in _DAMAGE


def _recovery(path: str) -> str:
    """The commands that copy what is left in a damaged database into a new one.

    Debian 12's sqlite3 (3.40.1) has no .recover (its library lacks the sqlite_dbpage table);
    .dump reads what it can but ends with ROLLBACK if it met damage, hence the sed. Measured on
    a file with 20 of 163 pages overwritten: .dump kept 1,722 of 2,010 rows, WAL included;
    -readonly leaves the file and its -wal as they are.
    """
    q = shlex.quote(path)
    return (
        f"sqlite3 {q} .recover | sqlite3 recovered.db (with an sqlite3 that lacks .recover, as Debian 12's:"
        f" sqlite3 -readonly {q} .dump | sed '$s/^ROLLBACK.*/COMMIT;/' | sqlite3 recovered.db)"
    )


def _readonly_uri(path: str) -> str:
    """A URI that opens `path` for reading without creating or changing any file.

    Plain mode=ro is not enough for a WAL database: SQLite creates a missing -wal and -shm (and
    leaves them), and rebuilds an existing -shm no other connection uses. Without a -wal no
    connection has the database open (a writer keeps it until it closes) and the main file is
    the whole database: read it as immutable. A daemon starting meanwhile writes to a new -wal,
    and the main file only at a checkpoint, after 1,000 pages. With a -wal and -shm, the -shm is
    only read. A -wal without -shm (deleted by hand) gets a new -shm: the only file we create.
    """
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
    if not os.path.exists(path + "-wal"):
        return uri + "&immutable=1"
    return uri + "&readonly_shm=1" if os.path.exists(path + "-shm") else uri


def _damage(path: str) -> str | None:
    """What is wrong with the database at `path`, or None if SQLite's quick_check finds it sound.

    Read only (see `_readonly_uri`), so a damaged file is left exactly as it was; other errors
    (locked, unreadable) are raised. quick_check reads every page once; measured on a 93 MB
    database (265,000 exited processes): 0.09 s from the page cache, 1.2-1.3 s read from disk.
    """
    try:
        conn = sqlite3.connect(_readonly_uri(path), uri=True)
        try:
            found = [row[0] for row in conn.execute("PRAGMA quick_check")]
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        if _is_damage(e):
            return str(e)
        raise
    if found == ["ok"]:
        return None
    # One row can hold many lines ("*** in database main ***", then one line per problem): the
    # log gets one line.
    problems = [line for row in found for line in row.splitlines() if not line.startswith("***")]
    more = f" and {len(problems) - 1} more problems" if len(problems) > 1 else ""
    return f"quick_check: {problems[0] if problems else found[0]}{more}"


def _root_only(path: str) -> None:
    """Take group and other permissions off an existing database and its -wal and -shm (an
    older nfacct made them 0644); SQLite gives new -wal and -shm files the main file's mode."""
    for name in (path, *(path + s for s in SIDECARS)):
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(os.stat(name).st_mode)
            if mode & 0o077:
                os.chmod(name, mode & 0o700)


def _create(path: str) -> bool:
    """Create an empty database file, root's alone from its first moment; False if one exists."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        return False
    return True


def _set_aside(path: str) -> str:
    """Rename the database at `path` and its -wal and -shm to `<path>.damaged-<UTC time>`
    (contents untouched: SQLite's .recover reads them there, WAL included); returns the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = f"{path}.damaged-{stamp}", 1
    while any(os.path.lexists(aside + s) for s in ("", *SIDECARS)):  # never overwrite an earlier one
        n += 1
        aside = f"{path}.damaged-{stamp}-{n}"
    # The companions first: a -wal left at `path` would be replayed into the new database.
    for s in (*SIDECARS, ""):
        with contextlib.suppress(FileNotFoundError):
            os.rename(path + s, aside + s)
    return aside


class Store:
    """The database at `path`. Writable (the daemon): created if missing, set aside and started
    anew if damaged, migrated. `readonly` (`nfacct history`): opened as it is, never written,
    migrated or created."""

    def __init__(self, path: str, readonly: bool = False):
        self.path = path
        self.writes = 0
        self._created_dirs: list[str] = []
        self._created_db = False
        try:
            self.db = self._open_readonly() if readonly else self._open()
            self.db.conn.create_function("nfacct_unit", 1, units.nfacct_unit, deterministic=True)
        except BaseException as e:
            self.discard()
            if isinstance(e, sqlite3.Error):
                raise self._error(e) from e
            if isinstance(e, OSError):
                raise StoreError(f"cannot open database {path}: {e.strerror or e}") from e
            raise

    def _open(self) -> sqlite_utils.Database:
        if self.path == ":memory:":
            db = sqlite_utils.Database(memory=True)
        else:
            self._prepare_file()
            db = sqlite_utils.Database(self.path)
        try:
            db.enable_wal()  # a no-op in memory
            with db.conn:
                _migrate(db)
        except BaseException:
            db.close()
            raise
        return db

    def _prepare_file(self) -> None:
        """A root-only database file at `path`, a damaged one set aside first."""
        self._created_dirs = make_dirs(os.path.dirname(os.path.abspath(self.path)), 0o700)
        self._created_db = _create(self.path)
        if self._created_db:
            return
        _root_only(self.path)  # before SQLite creates a -wal or -shm with the file's mode
        damage = _damage(self.path)
        if damage is None:
            return
        aside = _set_aside(self.path)
        self._created_db = _create(self.path)
        log.warning(
            "database %s is damaged (%s): set it aside, untouched, as %s (with its -wal and -shm, if any)"
            " and started a new one; recover its rows with: %s",
            self.path,
            damage,
            aside,
            _recovery(aside),
        )

    def _open_readonly(self) -> sqlite_utils.Database:
        try:
            os.close(os.open(self.path, os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError:
            raise StoreError(f"no database at {self.path} (nfacct run --db writes one)") from None
        except PermissionError:
            raise StoreError(f"cannot read {self.path}: {_ROOT_ONLY}") from None
        db = sqlite_utils.Database(sqlite3.connect(_readonly_uri(self.path), uri=True))
        try:
            version = _version(db)
        except BaseException:
            db.close()
            raise
        if version < SCHEMA_VERSION:
            db.close()
            raise StoreError(
                f"database {self.path} has schema {version}, older than this nfacct's {SCHEMA_VERSION}:"
                " run the daemon (nfacct run) once to migrate it"
            )
        return db

    def _error(self, e: sqlite3.Error) -> StoreError:
        if _is_damage(e):
            return StoreError(f"{self.path} is damaged ({e}); recover its rows with: {_recovery(self.path)}")
        return StoreError(f"cannot use database {self.path}: {e}")

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """SQLite's errors as one line naming the file (and the recovery, if it is damaged)."""
        try:
            yield
        except sqlite3.Error as e:
            raise self._error(e) from e

    def close(self) -> None:
        if hasattr(self, "db"):  # not when the open failed
            self.db.close()

    def discard(self) -> None:
        """Close, and remove what this Store created: the database file with its -wal and -shm
        if it created the file, then the directories it created, innermost first, each only
        while empty. A database that existed before is never removed. For a failed start;
        calling it again, or after `close`, does nothing more."""
        self.close()
        if self._created_db:
            for s in ("", *SIDECARS):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path + s)
            self._created_db = False
        remove_dirs(self._created_dirs)
        self._created_dirs = []

    def _upsert(self, table: str, columns: tuple[str, ...], rows: list[dict]) -> None:
        # Hand-written: sqlite-utils' upsert_all measured 250 ms for 1,000 rows, this 8 ms, and
        # the daemon writes from its packet loop.
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns[2:])
        sql = (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            f" ON CONFLICT (pid, btime) DO UPDATE SET {updates}"
        )
        self.db.conn.executemany(sql, [_values(r, columns) for r in rows])

    def save_exited(self, rows: list[dict]) -> None:
        """Record (or update, if late packets came) exited processes; they leave the checkpoint."""
        if not rows:
            return
        with self.db.conn:
            self._upsert("exited_tasks", EXITED_COLUMNS, rows)
            self.db.conn.executemany(
                "DELETE FROM live_tasks WHERE pid = ? AND btime = ?", [(r["pid"], r["btime"]) for r in rows]
            )
        self.writes += 1

    def checkpoint(
        self,
        changed: list[dict],
        gaps: list[dict] = (),
        state: dict[str, str] | None = None,
        offloaded: list[Offloaded] = (),
        pause: Callable[[], None] = lambda: None,
    ) -> None:
        """Update the checkpoint of live processes with the rows that `changed` since the last
        one (exited processes leave it through `save_exited`); record `gaps`, `state` and the
        changes of `offloaded` with it.

        One transaction, so the settled counter in `state` and the readings in `offloaded_flows`
        always match the totals beside them. `pause` is called between every FLOW_ROWS readings
        written: the daemon serves its queues there (30,000 new flows since the last checkpoint
        took 115-260 ms to write, long enough for the guard to take the daemon for frozen).
        """
        now = time.time()
        with self.db.conn:
            self.db.execute("UPDATE live_tasks SET checkpoint_time = ?", (now,))  # all still ran
            if changed:
                self._upsert("live_tasks", LIVE_COLUMNS, [{**r, "checkpoint_time": now} for r in changed])
            if gaps:
                self.db["unaccounted"].insert_all(gaps)
            if state:
                self.db["state"].upsert_all([{"key": k, "value": v} for k, v in state.items()], pk="key")
            for scope in offloaded:
                credited = [(scope.scope, flow, *reading) for flow, reading in scope.credited.items()]
                forgotten = [(scope.scope, flow) for flow in scope.forgotten]
                for sql, rows in (
                    ("INSERT OR REPLACE INTO offloaded_flows VALUES (?, ?, ?, ?, ?, ?)", credited),
                    ("DELETE FROM offloaded_flows WHERE scope = ? AND flow = ?", forgotten),
                ):
                    for i in range(0, len(rows), FLOW_ROWS):
                        self.db.conn.executemany(sql, rows[i : i + FLOW_ROWS])
                        pause()
        self.writes += 1

    def offloaded(self, scope: str) -> dict[bytes, list[int]]:
        """The element readings the last checkpoint's totals include, by flow."""
        with self._reading():
            rows = self.db.execute(
                f"SELECT flow, {', '.join(OFFLOAD_COLUMNS)} FROM offloaded_flows WHERE scope = ?", (scope,)
            ).fetchall()
        return {bytes(flow): list(reading) for flow, *reading in rows}

    def state(self, key: str) -> str | None:
        with self._reading():
            row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def unaccounted(self, since: float | None = None, until: float | None = None) -> tuple[int, int]:
        """Packets that reached the queue rule but no process, and in how many gaps, ending in the period."""
        with self._reading():
            row = self.db.execute(
                "SELECT COALESCE(SUM(packets), 0), COUNT(*) FROM unaccounted WHERE end >= ? AND end <= ?",
                (since if since is not None else 0, until if until is not None else float("inf")),
            ).fetchone()
        return row[0], row[1]

    def live(self) -> list[dict]:
        with self._reading():
            return [_names(r) for r in self.db["live_tasks"].rows]

    def exited(self) -> list[dict]:
        with self._reading():
            return [_names(r) for r in self.db["exited_tasks"].rows_where(order_by="exit_time")]

    def history(
        self, since: float | None, until: float | None, by: str, pid: int | None = None
    ) -> list[dict]:
        """Top talkers among processes that exited in [since, until] (with this `pid`, if given),
        grouped by `by`. Each row says its namespaces (`netns`: the names, comma-separated; None:
        the daemon's own namespace only) unless it is grouped by them.

        A name is TEXT or BLOB by its bytes alone, so equal names always fall in one group."""
        if by not in BY_COLUMNS:
            raise StoreError(f"cannot group by {by!r}: use one of {', '.join(BY_COLUMNS)}")
        col = BY_COLUMNS[by]
        sums = ", ".join(f"SUM({c}) AS {c}" for c in COUNTER_NAMES)
        where, params = [], []
        if since is not None:
            where.append("exit_time >= ?")
            params.append(since)
        if until is not None:
            where.append("exit_time <= ?")
            params.append(until)
        if pid is not None:
            where.append("pid = ?")
            params.append(pid)
        namespaces = "" if by == "netns" else ", GROUP_CONCAT(DISTINCT netns) AS netns"
        sql = (
            f"SELECT {col} AS {by}, COUNT(*) AS processes, {sums}{namespaces} FROM exited_tasks"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + f" GROUP BY {col} ORDER BY SUM(tcpsndbytes + tcprcvbytes + udpsndbytes + udprcvbytes) DESC"
        )
        with self._reading():
            cursor = self.db.execute(sql, params)
            names = [d[0] for d in cursor.description]
            rows = [_names(dict(zip(names, row, strict=True))) for row in cursor.fetchall()]
        if by == "unit":  # TEXT or BLOB as its cgroup (units.nfacct_unit)
            for r in rows:
                r["unit"] = text.from_sql(r["unit"])
        return rows


def _values(row: dict, columns: tuple[str, ...]) -> tuple:
    return tuple(text.to_sql(row.get(c)) if c in NAME_COLUMNS else row.get(c) for c in columns)


def _names(row: dict) -> dict:
    """A row as read, with its BLOB names back as the str they were (text.from_sql)."""
    for c in NAME_COLUMNS:
        if c in row:
            row[c] = text.from_sql(row[c])
    return row
