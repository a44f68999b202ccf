"""Several namespaces, the pure part (no root): the same flow in two namespaces is two flows,
what happens to one namespace's flows leaves the other's alone, rows and groupings say their
namespace, and a database of the previous schema is migrated with its rows."""

from __future__ import annotations

import sqlite3

from conftest import facts, migrated
from scapy.layers.inet import IP, UDP

from nfacct import netns
from nfacct.display import several_namespaces
from nfacct.engine import Engine
from nfacct.resolver import Answer
from nfacct.store import Store
from nfacct.tables import TaskInfo
from nfacct.topview import Snapshot, rows

LO = bytes([127, 0, 0, 1])
DATAGRAM = bytes(IP(src="127.0.0.1", dst="127.0.0.1") / UDP(sport=5000, dport=53) / (b"q" * 72))


def two_namespaces() -> tuple[Engine, list]:
    """One datagram of the same flow in namespaces a and b, each flow's owner found."""
    submitted = []
    engine = Engine(submit=lambda key, _ifindex: submitted.append(key))
    for ns in ("a", "b"):
        assert engine.account(DATAGRAM, True, netns=ns)
    engine.apply_answers([Answer(submitted[0], facts(1)), Answer(submitted[1], facts(2))])
    return engine, submitted


def test_the_same_flow_in_two_namespaces_is_two_flows_and_two_owners():
    engine, submitted = two_namespaces()
    assert submitted == [(17, LO, 5000, LO, 53, "a"), (17, LO, 5000, LO, 53, "b")]
    tasks = {t.pid: t for t in engine.tables.tasks.values()}
    assert (tasks[1].netns, tasks[2].netns) == ("a", "b")
    assert tasks[1].counters[4:6] == tasks[2].counters[4:6] == [1, 100]
    assert {t["pid"]: t["netns"] for t in engine.top()} == {1: "a", 2: "b"}


def test_a_socket_closed_in_one_namespace_closes_only_its_flows():
    engine, (in_a, in_b) = two_namespaces()
    engine.socket_closed("a", 17, LO, 5000, LO, 53)
    assert (engine.tables.socks[in_a].closed, engine.tables.socks[in_b].closed) == (True, False)
    engine.close_all_but("b", set())  # the dump fallback of b: no socket holds port 5000 there
    assert engine.tables.socks[in_b].closed


def test_forgetting_a_namespace_drops_its_flows_and_keeps_its_processes_totals():
    engine, (_in_a, in_b) = two_namespaces()
    assert engine.forget_netns("a") == 1
    assert list(engine.tables.socks) == [in_b]
    assert [t["udpsndbytes"] for t in engine.top()] == [100, 100]


def test_tables_handed_over_keep_each_flows_namespace():
    engine, keys = two_namespaces()
    successor = Engine()
    successor.load(engine.export())
    assert list(successor.tables.socks) == keys
    assert sorted(t.netns for t in successor.tables.tasks.values()) == ["a", "b"]


def test_patterns_name_the_namespaces_they_match(tmp_path, monkeypatch):
    for name in ("ct-1", "ct-2", "web"):
        (tmp_path / name).touch()
    monkeypatch.setattr(netns, "NETNS_RUN_DIR", str(tmp_path))
    assert netns.is_pattern("ct-*") and not netns.is_pattern("web")
    assert netns.matching(["ct-*"]) == ["ct-1", "ct-2"]
    assert netns.matching(["web", "nope-*"]) == ["web"]


def test_a_schema_3_database_gets_its_netns_columns_and_keeps_its_rows(tmp_path):
    db = str(tmp_path / "v3.db")
    store = Store(db)
    store.save_exited([{**TaskInfo(7, 1.0, "old", "old", 0).row(), "exit_time": 2.0}])
    store.close()
    conn = sqlite3.connect(db)  # as schema 3 had it: no netns anywhere
    for table in ("exited_tasks", "live_tasks", "unaccounted"):
        conn.execute(f"ALTER TABLE {table} DROP COLUMN netns")
    with migrated(db, conn, 3) as store:
        web = TaskInfo(8, 1.0, "curl", "curl", 0, netns="web")
        store.save_exited([{**web.row(), "exit_time": 3.0, "udpsndbytes": 5}])
        grouped = {r["netns"]: r["processes"] for r in store.history(None, None, "netns")}
        assert grouped == {None: 1, "web": 1}
        assert {r["command"]: r["netns"] for r in store.history(None, None, "command")} == {
            "old": None,
            "curl": "web",
        }


def test_top_groups_by_namespace():
    tasks = [
        {**TaskInfo(pid, 1.0, "p", "p", 0, netns=ns).as_dict(), "exit_time": None}
        for pid, ns in ((1, "a"), (2, "a"), (3, None))
    ]
    found = rows(None, Snapshot(0.0, tasks, {}), "netns")
    assert sorted((r.label, r.processes) for r in found) == [("(own)", 1), ("a", 2)]


def test_tables_show_a_netns_column_only_for_rows_of_several_namespaces():
    assert not several_namespaces([{"netns": "a"}, {"netns": "a"}])
    assert not several_namespaces([{"netns": None}, {}])
    assert several_namespaces([{"netns": "a,b"}])  # a history group of two namespaces
    assert several_namespaces([{"netns": None}, {"netns": "a"}])
