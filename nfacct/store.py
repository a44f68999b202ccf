"""SQLite persistence (sqlite-utils): exited processes forever, live ones as checkpoints.

`exited_tasks` holds one row per process that ever sent or received a packet, with its final
totals. `live_tasks` is the latest checkpoint of running processes, so a restarted daemon
continues their counts and a process that exits while no daemon runs is still recorded.
`unaccounted` records packets that reached the queue rule but no process's totals (see
`coverage`), and `state` the counter value the last checkpoint settled. The
file is plain SQLite in WAL mode: sqlite-utils and Datasette open it without help.
"""

from __future__ import annotations

import os
import time

import sqlite_utils

from .tables import COUNTER_NAMES

SCHEMA_VERSION = 2
DEFAULT_DB = "/var/lib/nfacct/nfacct.db"

_facts = {"pid": int, "btime": float, "command": str, "cmdline": str, "uid": int, "cgroup": str}
_counters = dict.fromkeys(COUNTER_NAMES, int)
EXITED_COLUMNS = (*_facts, "exit_time", *COUNTER_NAMES)
LIVE_COLUMNS = (*_facts, "checkpoint_time", *COUNTER_NAMES)
BY_COLUMNS = {"command": "command", "uid": "uid", "cgroup": "cgroup", "pid": "pid"}


class StoreError(Exception):
    pass


def _migrate(db: sqlite_utils.Database) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"database schema {version} is newer than this nfacct understands ({SCHEMA_VERSION})"
        )
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
            {"start": float, "end": float, "packets": int, "reason": str}, if_not_exists=True
        )
        db["unaccounted"].create_index(["end"], if_not_exists=True)
        db["state"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
    # Later versions add their steps here, each guarded by `if version < N`.
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


class Store:
    def __init__(self, path: str):
        self.path = path
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
        try:
            self.db = (
                sqlite_utils.Database(path) if path != ":memory:" else sqlite_utils.Database(memory=True)
            )
            if path != ":memory:":
                self.db.enable_wal()
            with self.db.conn:
                _migrate(self.db)
        except Exception as e:  # sqlite3.DatabaseError and friends: say which file
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"cannot open database {path}: {e}") from e
        self.writes = 0

    def close(self) -> None:
        self.db.close()

    def _upsert(self, table: str, columns: tuple[str, ...], rows: list[dict]) -> None:
        # Hand-written: sqlite-utils' upsert_all measured 250 ms for 1,000 rows, this 8 ms, and
        # the daemon writes from its packet loop.
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns[2:])
        sql = (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            f" ON CONFLICT (pid, btime) DO UPDATE SET {updates}"
        )
        self.db.conn.executemany(sql, [tuple(r.get(c) for c in columns) for r in rows])

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
        self, changed: list[dict], gaps: list[dict] = (), state: dict[str, str] | None = None
    ) -> None:
        """Update the checkpoint of live processes with the rows that `changed` since the last
        one (exited processes leave it through `save_exited`); record `gaps` and `state` with it.

        One transaction, so the settled counter in `state` always matches the totals beside it.
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
        self.writes += 1

    def state(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def unaccounted(self, since: float | None = None, until: float | None = None) -> tuple[int, int]:
        """Packets that reached the queue rule but no process, and in how many gaps, ending in the period."""
        row = self.db.execute(
            "SELECT COALESCE(SUM(packets), 0), COUNT(*) FROM unaccounted WHERE end >= ? AND end <= ?",
            (since if since is not None else 0, until if until is not None else float("inf")),
        ).fetchone()
        return row[0], row[1]

    def live(self) -> list[dict]:
        return list(self.db["live_tasks"].rows)

    def exited(self) -> list[dict]:
        return list(self.db["exited_tasks"].rows_where(order_by="exit_time"))

    def history(self, since: float | None, until: float | None, by: str) -> list[dict]:
        """Top talkers among processes that exited in [since, until], grouped by `by`."""
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
        sql = (
            f"SELECT {col} AS {by}, COUNT(*) AS processes, {sums} FROM exited_tasks"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + f" GROUP BY {col} ORDER BY SUM(tcpsndbytes + tcprcvbytes + udpsndbytes + udprcvbytes) DESC"
        )
        cursor = self.db.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
