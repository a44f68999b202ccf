"""The accounting daemon: how it starts, and its one event loop over the queues, process and
socket events, the control socket, timers and signals. Runs in the root namespace (the proc
connector only works there); each namespace it accounts (`--netns`, repeated) has its queue,
sock_diag, flow sets and ledger in a `namespace.Namespace`, and one engine counts them all.
Namespaces come (`reload`, SIGHUP) and go (their name deleted) while it runs.

The rooms it stands on: `engine` (packets, tables and their state), `resolver` (owner lookups),
`persistence` (SQLite and the coverage ledger), `takeover` (replacing a running daemon),
`claim` (one daemon per namespace), `namespace` (what it opens in each), `control` (the control
socket), `atop` (atop -K's socket), `notify` (systemd).

Longer than most rooms (~600 lines) because a start is a sequence with an undo at each step
(claim, database, queue, rule move, hand-over) that must stay in one place to stay correct,
the loop dispatches to everything the start opened, and a namespace added or dropped while it
runs goes through the same steps.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import selectors
import signal
import time
from dataclasses import dataclass, field

from . import atop, control, netns, sockview, takeover
from .claim import ClaimError
from .coverage import STALLED
from .engine import Engine
from .events import EventsUnavailable, ProcConnector
from .faults import Faults
from .files import remove_dirs
from .flowsets import OffloadError
from .metrics import Health, Metrics
from .namespace import Namespace, label
from .netns import is_pattern
from .notify import STATUS_PERIOD, Notifier, status_line
from .persistence import Persistence
from .procs import SocketIndex, is_alive, process_facts
from .queue import HOOK_LOCAL_OUT, QUEUE_MAXLEN, VERDICT_BATCH, KernelQueueStats, QueuedPacket, QueueError
from .rules import FLOW_SET_SIZE, Rules, RulesError
from .store import DEFAULT_DB, Store
from .tables import HANDOVER_FORMAT, FlowKey, GcConfig

log = logging.getLogger("nfacct")

PERSIST_TICK = 0.25
MAX_WAIT = 1.0  # the loop looks at its timers at least this often, whatever they are set to
HOLD_MAX = 4096  # first packets held for their lookup at most; beyond, they pass at once
# Packets read per loop turn at most. Reading until the socket is empty never ends under a flood
# the daemon cannot keep up with, and the owner lookups, which run between turns, wait until the
# flood ends, when the sockets are gone (bench/modes.py, 1,000 UDP flows: every flow unidentified,
# none offloaded during the flood; 4 batches per turn: all 1,000 found and offloaded, docs/performance.md).
DISPATCH_MOST = 4 * VERDICT_BATCH
FRESH = 1.0  # seconds: the oldest reading of the flow sets' counters `top` and `status` may show
# Flows whose elements go per loop turn at most; the rest go in the turns after, the queue served
# in between. 85,774 flows closed at once took one 2.7 s transaction (31 µs a flow: the commit and
# the last counts it echoes); the guard passed the packets waiting meanwhile unseen.
WITHDRAW_MOST = 2048
MODES = ("offload", "queue")
NETNS_CHECK = 1.0  # seconds between looks for accounted namespaces whose name is gone
# Resolver figures of each namespace that `status` adds up (the socket index is shared).
RESOLVER_SUMS = ("in_flight", "resolved", "gave_up", "by_listener", "errors", "sock_diag_requests")


@dataclass
class ServiceConfig:
    # Names or shell patterns (`ct-*`) of the namespaces to account; empty: the daemon's own.
    netns: tuple[str, ...] = ()
    queue: int = 0
    control_path: str = control.DEFAULT_CONTROL
    db_path: str = DEFAULT_DB
    gc: GcConfig = field(default_factory=GcConfig)
    checkpoint_interval: float = 10.0
    exit_grace: float = 1.0  # late packets (FIN, ACK) of an exited process still count before it is written
    poll_interval: float = 1.0  # /proc liveness checks when the proc connector is unavailable
    proc_connector: bool = True
    queue_maxlen: int = QUEUE_MAXLEN
    takeover: bool = False  # replace the daemon answering at control_path without a gap
    hold_new_connections: bool = True  # an outgoing packet that starts a lookup waits for it
    mode: str = "offload"  # "queue": every packet through the queue, as before flow offload
    max_offloaded: int = FLOW_SET_SIZE  # flows counted in the kernel at once; beyond, on the queue
    atop_socket: str | None = None  # serve `atop -K` here (netatop-bpf's protocol, nfacct.atop)
    metrics: tuple[str, int] | None = None  # serve Prometheus metrics at (host, port)


def _freeze_survivors(phase: str, info: dict) -> None:
    """After a full collection of Python's cycle collector, what survived is set aside for good
    (gc.freeze): the next full collections look only at objects made since.

    The tables' objects hold no reference cycles (the 100,000-flow run's 16 full collections freed
    none), but each full collection walked all of them: 106 ms at 370,000 objects, one each time
    the heap grew by a quarter, and again and again while they were freed. The loop stood still
    meanwhile; with other work in the same turn the guard passed the waiting packets unseen
    (1.7-3% of the flows at 3,000 new flows a second). Objects set aside are still freed when their
    last reference goes; only a cycle among them would stay, and the tables make none."""
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


class ServiceError(Exception):
    """The service cannot start; one line for the user."""


class Service:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.started = time.time()
        self._running = True  # until a signal or a handover says stop, from here on
        self._handing_over = False
        self._reload_asked = False  # SIGHUP: `reload` at the next turn of the loop
        self._held: list[QueuedPacket] = []  # outgoing packets waiting for their flow's lookup (_on_packet)
        self._exits: list[tuple[int, float]] = []  # (tgid, when) of processes ended, to settle (_flush)
        self._exit_waiting: tuple[int, int] | None = None  # (tgid, flows left) of one waiting a turn
        self._hold_max = HOLD_MAX if config.hold_new_connections else 0
        self._seen_overruns = 0  # proc connector overruns already answered by a liveness poll
        self.faults = Faults()
        self.atop: atop.Server | None = None
        self.spaces: dict[str | None, Namespace] = {}  # the accounted namespaces, by name
        # Each name once (given twice, it would be claimed twice); `reload NAME` adds to these.
        self._named = list(dict.fromkeys(n for n in config.netns if not is_pattern(n)))
        self._resources = contextlib.ExitStack()  # closed in reverse order by close()
        self._undo = contextlib.ExitStack()  # what only a failed start takes back
        self._sel = selectors.DefaultSelector()
        self._resources.callback(self._sel.close)
        self._resources.callback(self._close_spaces)
        # A stop asked for while starting (the integrity check or a takeover can take seconds)
        # takes back what the start made, like any failed start; once started, it ends the loop.
        self._signals = {s: signal.signal(s, self._interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
        # A reload asked for while starting is done once the loop runs (the default would end us).
        self._signals[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._hangup)
        try:
            self._open()
        except BaseException:
            self._restore_signals()
            self.close()
            self._undo.close()
            raise
        self._undo.pop_all()
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self.stop)

    @staticmethod
    def _interrupted(signum: int, _frame) -> None:
        raise ServiceError(f"stopped by {signal.Signals(signum).name} while starting; nothing was changed")

    def _restore_signals(self) -> None:
        for s, handler in self._signals.items():
            signal.signal(s, handler)

    def _open(self) -> None:
        cfg = self.config
        control.check_path(cfg.control_path)
        # One /proc index for every namespace: socket inodes are unique. Its long reads pause to
        # serve the queues.
        self.index = SocketIndex(pause=self._serve_queues)
        self.engine = Engine(submit=self._submit, config=cfg.gc, faults=self.faults)
        names = self._wanted() if cfg.netns else [None]
        for name in names:  # a missing one fails here, before anything changes
            self.spaces[name] = Namespace(name, self.engine, self.index, self.faults)
        if not cfg.takeover:
            for ns in self.spaces.values():
                self._claim(ns)  # refuses at once if another daemon accounts the namespace
        self.metrics = None
        if cfg.metrics:  # refuses a taken port
            share = cfg.takeover  # a successor listens beside its predecessor until that one exits
            self.metrics = Metrics(cfg.metrics, self.snapshot, self._health, self.faults, self._sel, share)
            self._resources.callback(self.metrics.close)
        # Opened before the queue moves: its integrity check and migration (1.3 s for 93 MB
        # from a cold disk) must not hold the packets a takeover's new queue collects.
        self.store = Store(cfg.db_path)
        self._undo.callback(self.store.discard)  # a failed start leaves no empty database behind
        self._resources.callback(self.store.close)
        self.events: ProcConnector | None = None
        self.events_mode = "polling /proc (disabled by --no-proc-connector)"
        if cfg.proc_connector:
            try:
                self.events = ProcConnector()
                self._resources.callback(self.events.close)
                self.events_mode = "proc connector"
            except EventsUnavailable as e:
                self.events_mode = f"polling /proc ({e})"
                log.warning("%s; falling back to polling /proc every %ss", e, cfg.poll_interval)
        self.notify = Notifier(os.environ, self.faults.record)  # systemd, when it started us
        self._resources.callback(self.notify.close)
        try:
            self._start(cfg)
        except takeover.TakeoverError as e:
            raise ServiceError(str(e)) from None

    def _wanted(self) -> list[str]:
        """The namespaces to account: every name given (or added by `reload NAME`), and every one
        a pattern matches that has the nfacct ruleset installed (`rules install` is what marks a
        namespace for a pattern: those without rules are left alone)."""
        patterns = [n for n in self.config.netns if is_pattern(n)]
        found = [n for n in netns.matching(patterns) if n not in self._named and self._has_rules(n)]
        return [*self._named, *found]

    def _has_rules(self, name: str) -> bool:
        try:
            return bool(Rules(name).queue_rules())
        except (RulesError, netns.NetnsError) as e:
            self.faults.record(f"reading the rules of {label(name)}", e)
            return False

    def _start(self, cfg: ServiceConfig) -> None:
        spaces = list(self.spaces.values())
        numbers = {ns.name: cfg.queue for ns in spaces}
        if cfg.takeover:
            for ns in spaces:
                numbers[ns.name] = takeover.successor_queue(
                    cfg.control_path, ns.name, ns.rules, ns.rules_problem, cfg.queue
                )
        else:
            self._listen()  # refuses at once if another daemon answers here
            self._serve_atop()
        at_start = {}
        for ns in spaces:
            at_start[ns.name] = ns.queued()  # before bind: packets from here on are ours or a gap
            ns.bind(numbers[ns.name], self._on_packet, cfg.queue_maxlen)
        handed = None
        with contextlib.ExitStack() as move:  # a failed move takes its queue rules back
            # Our queue rules go in front; the old ones stay until nothing they queued waits.
            moved = [ns for ns in spaces if ns.lead_rules_here(move)]
            if cfg.takeover:
                handed = takeover.request_handover(cfg.control_path)
                for ns in spaces:
                    self._claim(ns, wait=5.0)  # the predecessor lets go as it exits
                self._listen()
                self._serve_atop()  # the predecessor's atop socket is gone with it
            for ns in moved:
                ns.drop_other_queues()
            move.pop_all()
        self.persistence = Persistence(self.store, self.engine, cfg.exit_grace, pause=self._serve_queues)
        for key in self.persistence.restore(handed):
            self._submit(key, 0)
        for ns in spaces:
            self._begin(ns, at_start[ns.name])

    def _begin(self, ns: Namespace, counter_at_start: int | None) -> None:
        """A bound namespace starts counting: its ledger, its flow sets, its guard."""
        self.persistence.open_ledger(ns.ledger, counter_at_start)
        try:
            ns.start_offload(self.config.mode, self.config.max_offloaded, self.persistence)
        except (OffloadError, OSError) as e:
            raise ServiceError(f"reading the flow sets of {label(ns.name)} failed: {e}") from None
        ns.start_guard()

    def _claim(self, ns: Namespace, wait: float = 0.0) -> None:
        try:
            ns.claim(self.config.control_path, wait=wait)
        except ClaimError as e:
            raise ServiceError(str(e)) from None
        self._undo.callback(remove_dirs, ns.created_dirs)

    def _close_spaces(self) -> None:
        for ns in reversed(self.spaces.values()):
            ns.close()

    def _submit(self, key: FlowKey, ifindex: int) -> None:
        """A flow's owner must be looked up, by the resolver of its namespace."""
        ns = self.spaces.get(key[5])
        if ns is not None:  # not, for a flow a predecessor handed over from a namespace we do not account
            ns.resolver.submit(key, ifindex)

    def _listen(self) -> None:
        self.control = control.Server(self.config.control_path, self.handle, self._sel, self.faults)
        self._resources.callback(self.control.close)
        self._undo.callback(remove_dirs, self.control.created_dirs)

    def _serve_atop(self) -> None:
        if self.config.atop_socket is None:
            return
        try:
            self.atop = atop.Server(self.config.atop_socket, self.snapshot, self._sel, self.faults)
        except atop.AtopError as e:
            raise ServiceError(str(e)) from None
        self._resources.callback(self.atop.close)
        self._undo.callback(remove_dirs, self.atop.created_dirs)

    def _offload(self, work: str, max_age: float = 0.0) -> None:
        """Refresh every namespace's flow sets' readings, or take the next step of one."""
        for ns in self.spaces.values():
            ns.offload(work, max_age)

    def _exited(self, tgids: list[int], now: float) -> None:
        """Processes ended: settled at the turn's `_flush`, with the turn's other changes."""
        for tgid in tgids:
            self.index.forget(tgid)
            self._exits.append((tgid, now))

    def _flush(self) -> None:
        """The turn's changes to the flow sets, in one transaction per namespace: the flows that
        ended and those of the processes that exited go (WITHDRAW_MOST a turn, the rest in the
        turns after), crediting their last counts, and the flows attributed since the last flush
        come in; each namespace's offloader gets its own (a namespace without flow sets keeps its
        flows on the queue path). Then the exits whose flows have all gone are applied: what an
        exited process is written with is whole, and its sockets wait for whoever holds them
        next. A failure is counted and logged once, never fatal."""
        gone: list[FlowKey] = []
        exits = []  # those whose last flows go now: settled after the transaction
        while self._exits and len(gone) < WITHDRAW_MOST:
            tgid = self._exits[0][0]
            flows = self.engine.offloaded_flows_of([tgid])
            room = WITHDRAW_MOST - len(gone)
            if len(flows) > room and self._exit_waiting != (tgid, len(flows)):
                gone += flows[:room]  # the rest next turn: the exit waits for its last flows
                self._exit_waiting = (tgid, len(flows))
                break
            # All its flows go now, or none went since the last turn (a failed transaction,
            # counted and logged): then it is settled with what was credited, not held forever.
            gone += flows if len(flows) <= room else []
            exits.append(self._exits.pop(0))
            self._exit_waiting = None
        gone += self.engine.take_withdrawals(WITHDRAW_MOST - len(gone))
        ready = self.engine.take_offloadable()
        for ns in self.spaces.values():
            if ns.offloader is not None:
                mine = [k for k in gone if ns.owns(k)], [k for k in ready if ns.owns(k)]
                ns.offload("flush", withdraw=mine[0], ready=mine[1])
        for tgid, now in exits:
            self.engine.process_exited(tgid, now)

    def _flush_pending(self) -> bool:
        """Flows left to withdraw, or exits to settle, for the next `_flush`."""
        return bool(self._exits or self.engine.tables.withdraw)

    # ---- per packet ---------------------------------------------------------------------------

    def _on_packet(self, pkt: QueuedPacket, netns_name: str | None) -> bool:
        """Count the packet; True: accept it now, False: it is held (see below)."""
        outgoing = pkt.hook == HOOK_LOCAL_OUT
        try:
            ifindex = pkt.outdev if outgoing else pkt.indev
            asked = self.engine.account(pkt.payload, outgoing, ifindex, None, pkt.length, pkt.uid, netns_name)
        except Exception as e:  # a bug must cost one packet's attribution, never its verdict
            self.engine.failed(e)
            asked = False
        # The verdict goes at once, with one exception: a packet out of here that made its flow's
        # owner be looked up waits for that first lookup, right after this batch. Its sender
        # still holds the socket then: connect() cannot return before the SYN leaves, and a UDP
        # client waits for the answer that this packet brings. A socket that lives a millisecond
        # (measured: a UDP client's five echo rounds and close(), all inside one batch) would
        # otherwise be gone, and its traffic unidentified or charged to the port's last owner.
        if asked and outgoing and len(self._held) < self._hold_max:
            self._held.append(pkt)
            return False
        return True

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for pkt in held:
            pkt.accept()
        for ns in self.spaces.values():
            ns.queue.flush()

    def _apply_answers(self) -> None:
        """The owners every namespace's resolver found so far go to the engine."""
        for ns in self.spaces.values():
            self.engine.apply_answers(ns.resolver.work())

    # ---- events -------------------------------------------------------------------------------

    def _on_proc_events(self) -> None:
        now = time.time()
        exits = []
        for ev in self.events.read():
            if ev.kind == "exit" and ev.pid == ev.tgid:  # the group leader: the process
                exits.append(ev.tgid)
            elif ev.kind == "fork":
                self.index.note_new_process(ev.tgid)
            elif ev.kind == "exec":
                self.index.forget(ev.tgid)
                facts = process_facts(ev.tgid) if self.engine.is_running(ev.tgid) else None
                if facts is not None:
                    self.engine.process_execed(facts)
        self._exited(exits, now)
        if self.events.overruns > self._seen_overruns:
            self._seen_overruns = self.events.overruns
            self.index.forget()  # an exec may be among the lost events
            self._poll_liveness()  # events were lost: check every task once

    def _poll_liveness(self) -> None:
        now = time.time()
        self._exited([t.pid for t in self.engine.running_tasks() if not is_alive(t.pid, t.btime)], now)

    # ---- namespaces coming and going -----------------------------------------------------------

    def _watch(self, ns: Namespace) -> None:
        """The loop reads the namespace's queue and destroy events from now on."""
        self._sel.register(ns.queue.fileno(), selectors.EVENT_READ, lambda _m: self._dispatch(ns))
        if ns.destroy:
            self._sel.register(ns.destroy, selectors.EVENT_READ, lambda _m: ns.on_destroy_events())

    def _dispatch(self, ns: Namespace) -> None:
        try:
            ns.queue.dispatch(DISPATCH_MOST)
        except OSError as e:  # its queue socket fails: the namespace cannot be accounted any more
            self._drop(ns, f"its queue failed ({e.strerror or e})")

    def _serve_queues(self) -> None:
        """Read every queue once, within a long piece of work (see SocketIndex): packets get
        their count and verdict as in a turn of the loop, and the guard sees the daemon read. Only
        the queues the loop watches: not one of a namespace being added or dropped. A queue that
        fails is counted here and left to the loop's own read, which drops its namespace."""
        watched = self._sel.get_map()
        for ns in self.spaces.values():
            if ns.queue is not None and ns.queue.fileno() in watched:
                try:
                    ns.queue.dispatch(DISPATCH_MOST)
                except OSError as e:
                    self.faults.record("reading a queue within long work", e)

    def _check_namespaces(self) -> None:
        for ns in list(self.spaces.values()):
            if ns.gone():
                self._drop(ns, f"is gone (no /run/netns/{ns.name})")

    def _drop(self, ns: Namespace, why: str) -> None:
        """Stop accounting a namespace, its counts settled: what its queue holds gets its verdict
        and its count, lookups under way their answer, offloaded flows their last reading
        (the namespace lives on while our sockets refer to it, so its sets can still be read).
        Its processes keep their totals: they are written as they exit, as any process is."""
        if self.spaces.get(ns.name) is not ns:
            return  # already dropped (its queue failed in the same turn)
        flows = sum(1 for k in self.engine.tables.socks if k[5] == ns.name)
        try:
            ns.queue.dispatch()
        except OSError as e:  # a failed queue has nothing more to give: what it held passes unseen
            self.faults.record("draining a dropped namespace's queue", e)
        self._release_held()
        self._sel.unregister(ns.queue.fileno())
        if ns.destroy:
            self._sel.unregister(ns.destroy)
        self.engine.apply_answers(ns.resolver.work())
        ns.withdraw_all()
        self.engine.forget_netns(ns.name)
        counter = ns.queued()
        del self.spaces[ns.name]
        try:
            self.persistence.close_ledger(ns.name, counter)
        except Exception as e:  # a full disk: the next checkpoint writes what this one could not
            self.faults.record("checkpoint", e)
        ns.close()
        log.warning(
            "%s %s: no longer accounted; its %d flows settled, its processes keep their totals%s",
            label(ns.name),
            why,
            flows,
            "" if self.spaces else "; no namespace is accounted now (add one: nfacct reload)",
        )

    def _hangup(self, *_args) -> None:
        self._reload_asked = True

    def reload(self, name: str | None = None) -> dict:
        """Account the namespaces wanted now (`_wanted`) that are not yet, `name` among them if
        given; drop those whose name is gone. Returns what changed, and what could not be added."""
        self._check_namespaces()
        if name is not None:
            netns.netns_path(name)  # NoSuchNetns: the answer says so
            if name not in self._named:
                self._named.append(name)
        added, refused = [], {}
        for wanted in self._wanted():
            if wanted in self.spaces:
                continue
            try:
                self._add(wanted)
                added.append(wanted)
            except (ServiceError, ClaimError, netns.NetnsError, QueueError, RulesError, OSError) as e:
                refused[wanted] = str(e)
                self.faults.record(f"adding {label(wanted)}", e)
        if added:
            log.warning("now accounting %s", ", ".join(label(n) for n in added))
        return {"ok": True, "added": added, "refused": refused, "accounted": list(self.spaces)}

    def _add(self, name: str) -> None:
        """Start accounting one more namespace; on any failure, nothing of it is left."""
        cfg = self.config
        ns = Namespace(name, self.engine, self.index, self.faults)
        try:
            ns.claim(cfg.control_path)
            counter_at_start = ns.queued()
            ns.bind(cfg.queue, self._on_packet, cfg.queue_maxlen)
            with contextlib.ExitStack() as move:
                if ns.lead_rules_here(move):
                    ns.drop_other_queues()
                move.pop_all()
            self.spaces[name] = ns
            self._begin(ns, counter_at_start)
            self._watch(ns)
        except BaseException:
            if self.spaces.get(name) is ns:
                del self.spaces[name]
                self.persistence.ledgers.pop(name, None)
            ns.discard()
            raise

    # ---- control ------------------------------------------------------------------------------

    def handle(self, cmd: str) -> dict | object:
        verb, _, arg = cmd.partition(" ")
        if cmd == "ping":
            return {"ok": True, "handover_format": HANDOVER_FORMAT}
        if cmd == "top":
            return {"time": time.time(), "tasks": self.snapshot()}
        if cmd == "status":
            self._settle()
            return self.status()
        if verb == "sockets":  # per-socket counters for `nfacct sockets`, as fresh as `top`'s
            self.snapshot()
            flows = self.engine.flow_counts()
            if arg:  # `sockets NAME`: one namespace's flows
                flows = {k: r for k, r in flows.items() if k[5] == arg}
            return sockview.flows_answer(flows)
        if verb == "reload":  # `reload NAME` names a namespace to add
            try:
                return self.reload(arg or None)
            except netns.NetnsError as e:
                return {"error": str(e)}
        if cmd == "handover":
            self._handing_over = True
            self._running = False
            return control.LATER  # answered with our tables once the queue is drained and flushed
        return {"error": f"unknown command {cmd!r}"}

    def snapshot(self) -> list[dict]:
        """Every task with its counters as of now (`_settle`): what `top`, atop clients, the
        metrics and systemd's status line show."""
        self._settle()
        return self.engine.top()

    def _settle(self) -> None:
        """Before an answer: the owners found so far applied, offloaded flows' readings at most
        FRESH old (see Offloader.refresh)."""
        self._apply_answers()
        self._offload("refresh", FRESH)

    @property
    def handed_over(self) -> bool:
        return self._handing_over

    def _health(self) -> Health:
        """The daemon's own figures for the metrics."""
        engine = self.engine.status()  # fresh dicts, no reference into the tables
        return Health(
            packets=engine["packets"],
            malformed=engine["malformed"],
            unidentified_by_uid=engine["unidentified_by_uid"],
            unaccounted=self.persistence.unaccounted,
            kernel=self.kernel_stats(),  # every namespace's queue added up
            guard_accepted=self.guard_accepted,
            sockinfo=engine["sockinfo"],
            sockinfo_overflow=engine["sockinfo_overflow"],
            taskinfo=engine["taskinfo"],
            taskinfo_overflow=engine["taskinfo_overflow"],
            faults=sum(self.faults.counts.values()),
        )

    def kernel_stats(self) -> KernelQueueStats | None:
        """Every namespace's queue figures added up (None: no queue line found)."""
        found = [s for s in (ns.queue.kernel_stats() for ns in self.spaces.values()) if s is not None]
        return KernelQueueStats.total(found) if found else None

    @property
    def guard_accepted(self) -> int:
        return sum(ns.guard.accepted for ns in self.spaces.values())

    def status(self) -> dict:
        cfg = self.config
        spaces = [ns.status() for ns in self.spaces.values()]
        # The top-level queue, offload and coverage are the first namespace's: what they always
        # were with one; `namespaces` has each, and `resolver` adds them up.
        first = (
            spaces[0] if spaces else {"queue": {}, "offload": {"mode": "queue", "problem": "no namespace"}}
        )
        resolver = {k: sum(s["resolver"][k] for s in spaces) for k in RESOLVER_SUMS}
        resolver.update(
            proc_scans=self.index.scans, proc_probes=self.index.probes, socket_index=len(self.index)
        )
        return {
            "pid": os.getpid(),
            "faults": self.faults.status(),
            "control": self.control.status(),
            "atop": self.atop.status() if self.atop else None,
            "netns": ", ".join(n for n in self.spaces if n) or None,
            "namespaces": spaces,
            "uptime": time.time() - self.started,
            "engine": self.engine.status(),
            "queue": first["queue"],
            "coverage": first.get("coverage", {"rules": "no namespace accounted"}),
            "unaccounted": self.persistence.unaccounted,
            "offload": first["offload"],
            "resolver": resolver,
            "events": {
                "process_exits": self.events_mode,
                "socket_close": "; ".join(sorted({s["socket_close"] for s in spaces})),
                "proc_connector_overruns": self.events.overruns if self.events else None,
                "destroy_overruns": sum(s["destroy_overruns"] or 0 for s in spaces),
            },
            "store": {"path": cfg.db_path, "writes": self.store.writes},
            "gc": vars(cfg.gc),
        }

    # ---- loop ---------------------------------------------------------------------------------

    def stop(self, *_args) -> None:
        self._running = False

    def run(self) -> None:
        cfg = self.config
        sel = self._sel
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        gc.callbacks.append(_freeze_survivors)
        # Each key's data is what to call when it is ready; the control server adds its clients.
        for ns in self.spaces.values():
            self._watch(ns)
        sel.register(wake_r, selectors.EVENT_READ, lambda _m: os.read(wake_r, 512))
        if self.events:
            sel.register(self.events, selectors.EVENT_READ, lambda _m: self._on_proc_events())
        now = time.monotonic()
        due = {
            "persist": now + PERSIST_TICK,
            "gc": now + cfg.gc.cycle,
            "checkpoint": now + cfg.checkpoint_interval,
            "netns": now + NETNS_CHECK,
        }
        if not self.events:
            due["poll"] = now + cfg.poll_interval
        if self.metrics:
            self.metrics.baseline()
        if self.notify.watchdog_period:
            due["watchdog"] = now
        if self.notify.enabled:
            due["notify"] = now + STATUS_PERIOD
        where = "accounting " + (
            ", ".join(f"queue {ns.queue.number} in netns {ns.name or '(own)'}" for ns in self.spaces.values())
            or "no namespace yet (a pattern matched none; a reload adds those that come)"
        )
        log.info("%s", where)
        self.notify.ready(where)  # the queues are bound and the control socket listens
        try:
            while self._running:
                now = time.monotonic()
                wait = min(MAX_WAIT, min(due.values()) - now)
                for ns in self.spaces.values():
                    resolver_due = ns.resolver.next_due()
                    if resolver_due is not None:
                        wait = min(wait, resolver_due)
                busy = any(ns.offloader is not None and ns.offloader.reading for ns in self.spaces.values())
                if self.control.busy or busy or self._reload_asked or self._flush_pending():
                    wait = 0.0
                registered = sel.get_map()
                for key, mask in sel.select(timeout=max(0.0, wait)):
                    if registered.get(key.fd) is key:  # not a namespace dropped earlier in this batch
                        key.data(mask)
                # After the batch: find the owners of the flows it brought while they still exist.
                # Their elements go in before the held first packets leave, so the answers to
                # those (a SYN-ACK) are counted by the kernel instead of queued again.
                try:
                    self._apply_answers()
                    self._flush()
                finally:
                    self._release_held()
                self._offload("step")
                self.control.work()  # one command per turn: the queue is served between them
                if self.atop:
                    self.atop.work()
                if self.metrics:
                    self.metrics.work()
                if self._reload_asked:
                    self._reload_asked = False
                    self.reload()
                self._timers(due)
            self.notify.stopping("handing over" if self._handing_over else "last verdicts and checkpoint")
            self._drain()
            self._apply_answers()
            self._poll_liveness()
            self._flush()
            while self._flush_pending():
                self._flush()
            self._checkpoint()
            if self.control.held:
                tables = self.engine.export()
                for conn in self.control.held:
                    control.answer(conn, {"ok": True, "pid": os.getpid(), "tables": tables})
                self.control.held = []
        finally:
            gc.callbacks.remove(_freeze_survivors)
            signal.set_wakeup_fd(old_wakeup)
            self._restore_signals()
            sel.unregister(wake_r)
            os.close(wake_r)
            os.close(wake_w)
            self.close()

    def _drain(self, timeout: float = 1.0) -> None:
        """Give what is queued its verdict and its count: unbinding would drop it.

        On a handover the rules already point at the successor; once our queues are empty we
        wait a moment and look again, for packets that met the old rule just before it changed.
        """
        handover = self._handing_over
        deadline = time.monotonic() + (timeout if handover else 0.1)
        settled = not handover
        while True:
            waiting = 0
            for ns in list(self.spaces.values()):
                try:
                    ns.queue.dispatch()
                except OSError as e:
                    self._drop(ns, f"its queue failed ({e.strerror or e})")
                    continue
                stats = ns.queue.kernel_stats()
                waiting += stats.waiting if stats is not None else 0
            self._release_held()
            if waiting == 0:
                if settled:
                    return
                settled = True
                time.sleep(0.02)
            elif time.monotonic() > deadline:
                (log.warning if handover else log.info)(
                    "%d packets still queued at exit; the kernel drops them on unbind", waiting
                )
                return
            else:
                time.sleep(0.001)

    def _timers(self, due: dict[str, float]) -> None:
        cfg = self.config
        now = time.monotonic()
        for job, period, work in (
            ("persist", PERSIST_TICK, self.persistence.persist_exited),
            ("poll", cfg.poll_interval, self._poll_liveness),
            ("gc", cfg.gc.cycle, self._gc),
            ("checkpoint", cfg.checkpoint_interval, self._checkpoint),
            ("netns", NETNS_CHECK, self._check_namespaces),
            ("watchdog", self.notify.watchdog_period, self.notify.watchdog),
            ("notify", STATUS_PERIOD, self._notify_status),
        ):
            if job in due and now >= due[job]:
                due[job] = now + period
                try:
                    work()
                except Exception as e:  # a full disk or a bug: retried next time, counted, logged once
                    self.faults.record(job, e)

    def _checkpoint(self) -> None:
        self._offload("refresh")
        reasons = {}
        for ns in self.spaces.values():
            accepted = ns.guard.accepted
            if accepted > ns.guard_seen:
                reasons[ns.name] = STALLED
            ns.guard_seen = accepted
        self.persistence.checkpoint(reasons)

    def _notify_status(self) -> None:
        self.notify.status(status_line(self.snapshot(), self.persistence.unaccounted))

    def _gc(self) -> None:
        if self.atop:
            self.atop.before_gc()  # exits the GC may drop are still owed to atop clients
        try:
            for ns in self.spaces.values():
                ns.dump_closed(self._serve_queues)
        finally:  # a failed dump must not cost the cycle its idle and exited removals
            if self.metrics:
                self.metrics.refresh()  # what the GC drops is in the aggregates first
            self._offload("refresh", FRESH)  # offloaded flows are idle only if their elements say so
            self.engine.gc(pause=self._serve_queues)
            self._flush()  # idle offloaded flows: their elements go first, GC drops them as they go

    def close(self) -> None:
        self._resources.close()
