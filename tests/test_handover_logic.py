"""Pure logic behind "nothing lost": the coverage ledger, a handover of the tables, and GC
around lookups still in flight. No kernel here; the kernel-facing halves are in test_coverage."""

from __future__ import annotations

import json

from conftest import facts, udp_out

from nfacct.coverage import NOT_COUNTING, QUEUE_FULL, RULES_RESET, Coverage
from nfacct.engine import Engine
from nfacct.resolver import Answer
from nfacct.tables import GC_PAUSE_EVERY, PENDING_HORIZON, GcConfig, SockInfo, Tables


def test_coverage_records_what_the_counter_saw_and_the_engine_did_not():
    cov = Coverage(covered=100, since=0.0)
    assert cov.update(counter=150, seen=50, waiting=0, now=1.0) is None  # all 50 seen
    gap = cov.update(counter=180, seen=60, waiting=5, now=2.0)  # 30 more: 10 seen, 5 waiting
    assert (gap.packets, gap.reason, gap.start, gap.end) == (15, QUEUE_FULL, 1.0, 2.0)
    assert cov.update(counter=180, seen=65, waiting=0, now=3.0) is None  # the waiting 5 arrive


def test_read_skew_is_carried_not_recorded_twice_even_across_daemons():
    cov = Coverage(covered=0, since=0.0)
    # 3 packets arrived between reading the counter (100) and the queue (3 waiting, not counted).
    assert cov.update(counter=100, seen=100, waiting=3, now=1.0) is None
    successor = Coverage.parse(cov.state(seen=100))  # handed over right here
    assert successor.update(counter=103, seen=3, waiting=0, now=2.0) is None
    assert successor.unaccounted == 0


def test_a_reinstalled_ruleset_restarts_the_counter():
    cov = Coverage(covered=500, since=0.0)
    gap = cov.update(counter=20, seen=15, waiting=0, now=1.0, reason=NOT_COUNTING)
    assert (gap.packets, gap.reason) == (5, RULES_RESET)


def test_handover_keeps_owners_counts_and_pending_lookups():
    engine = Engine()
    resolved, key_a = udp_out(5000)
    pending, key_b = udp_out(5001)
    orphan, key_c = udp_out(5002)
    for pkt in (resolved, resolved, pending, orphan):
        engine.account(pkt, True)
    engine.apply_answers([Answer(key_a, facts(1)), Answer(key_c, facts(2))])
    engine.tables.exited(engine.tables.tasks[(2, 1002.0)], 10.0)
    engine.account(orphan, True)  # counted aside until a re-check says for whom

    state = json.loads(json.dumps(engine.tables.export()))  # as the control socket carries it
    successor = Engine()
    lookups = successor.tables.load(state)
    assert lookups == [key_b]
    tasks = successor.tables.tasks
    assert tasks[(1, 1001.0)].counters[4:6] == [2, 200]
    assert tasks[(2, 1002.0)].exit_time == 10.0 and 2 not in successor.tables.running
    successor.account(resolved, True)  # still counts for its owner, no lookup needed
    assert tasks[(1, 1001.0)].counters[4:6] == [3, 300]
    successor.apply_answers([Answer(key_b, facts(3)), Answer(key_c, None)])
    assert tasks[(3, 1003.0)].counters[4:6] == [1, 100]
    assert tasks[(2, 1002.0)].counters[4:6] == [2, 200]  # the late packet went back to its owner
    assert successor.tables.socks[key_c].state == SockInfo.RESOLVED


def test_gc_waits_for_a_pending_lookup_and_never_drops_its_counts():
    tables = Tables(GcConfig(closed_idle=2.0))
    engine = Engine(config=tables.config)
    engine.tables = tables
    pkt, key = udp_out(5003)
    engine.account(pkt, True, now=0.0)
    tables.socks[key].closed = True
    tables.gc(now=2.5)  # closed and idle, but its lookup may still answer
    assert key in tables.socks
    tables.gc(now=PENDING_HORIZON + 1)  # nobody answered: counted as unidentified, not lost
    assert key not in tables.socks
    assert tables.unidentified[4:6] == [1, 100]


def test_a_gc_sweep_pauses_for_the_queues_and_keeps_what_packets_bring_meanwhile():
    """20,000 idle flows: the sweep pauses every GC_PAUSE_EVERY (the daemon reads its queues
    there); a packet of a new flow counted during a pause stays, the idle flows go, their
    counts kept as unidentified."""
    engine = Engine()
    for sport in range(20_000):
        engine.account(udp_out(10_000 + sport)[0], True, now=0.0)
    late, late_key = udp_out(5000)
    pauses = []

    def pause() -> None:
        pauses.append(len(engine.tables.socks))
        engine.account(late, True, now=100.0)

    engine.gc(now=100.0, pause=pause)  # past every idle limit of the flows of time 0
    assert len(pauses) == 20_000 // GC_PAUSE_EVERY
    assert list(engine.tables.socks) == [late_key]
    assert engine.tables.unidentified[4] == 20_000, "every idle flow's packet, none lost"
    assert engine.tables.socks[late_key].flow[0] == len(pauses), "the late flow's packets, all kept"
