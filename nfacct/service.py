"""The accounting daemon: how it starts, and its one event loop over the queue, process and
socket events, the control socket, timers and signals. Runs in the root namespace (the proc
connector only works there); with `netns` its queue and sock_diag sockets live in that namespace.

The rooms it stands on: `engine` (packets, tables and their state), `resolver` (owner lookups),
`persistence` (SQLite and the coverage ledger), `takeover` (replacing a running daemon),
`claim` (one daemon per namespace), `control` (the control socket), `atop` (atop -K's socket),
`notify` (systemd).

Longer than most rooms (~440 lines) because a start is a sequence with an undo at each step
(claim, database, queue, rule move, hand-over) that must stay in one place to stay correct,
and the loop dispatches to everything the start opened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field

from . import atop, control, sockview, takeover
from .claim import Claim, ClaimError
from .coverage import STALLED
from .engine import Engine
from .events import EventsUnavailable, ProcConnector
from .faults import Faults
from .files import remove_dirs
from .flowsets import FlowSets, OffloadError
from .guard import Guard
from .metrics import Metrics
from .notify import STATUS_PERIOD, Notifier, status_line
from .offload import Offloader
from .persistence import Persistence
from .procs import is_alive, process_facts
from .queue import HOOK_LOCAL_OUT, QUEUE_MAXLEN, VERDICT_BATCH, Queue, QueuedPacket
from .resolver import Resolver
from .rules import FLOW_SET_SIZE, Rules, RulesError, takeover_pair
from .sockdiag import ALL_STATES, DestroyEvents, SockDiag, SockDiagError
from .store import DEFAULT_DB, Store
from .tables import HANDOVER_FORMAT, GcConfig

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
MODES = ("offload", "queue")


@dataclass
class ServiceConfig:
    netns: str | None = None
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

    @property
    def coverage_key(self) -> str:
        return f"covered:{self.netns or ''}"


class ServiceError(Exception):
    """The service cannot start; one line for the user."""


class Service:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.started = time.time()
        self._running = True  # until a signal or a handover says stop, from here on
        self._handing_over = False
        self._held: list[QueuedPacket] = []  # outgoing packets waiting for their flow's lookup (_on_packet)
        self._exits: list[tuple[int, float]] = []  # (tgid, when) of processes ended this turn (_flush)
        self._hold_max = HOLD_MAX if config.hold_new_connections else 0
        self._seen_overruns = 0  # proc connector overruns already answered by a liveness poll
        self._closes_seen = 0  # destroy event overruns already answered by a socket dump (_gc)
        self._guard_seen = 0  # packets the guard accepted, as of the last checkpoint
        self.faults = Faults()
        self.atop: atop.Server | None = None
        self._resources = contextlib.ExitStack()  # closed in reverse order by close()
        self._undo = contextlib.ExitStack()  # what only a failed start takes back
        self._sel = selectors.DefaultSelector()
        self._resources.callback(self._sel.close)
        # A stop asked for while starting (the integrity check or a takeover can take seconds)
        # takes back what the start made, like any failed start; once started, it ends the loop.
        self._signals = {s: signal.signal(s, self._interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._open()
        except BaseException:
            self._restore_signals()
            self.close()
            self._undo.close()
            raise
        self._undo.pop_all()
        for s in self._signals:
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
        if not cfg.takeover:
            self._claim()  # refuses at once if another daemon accounts the namespace
        self.metrics = Metrics(cfg.metrics, self, self._sel) if cfg.metrics else None  # refuses a taken port
        if self.metrics:
            self._resources.callback(self.metrics.close)
        self.sockdiag = SockDiag(cfg.netns)
        self._resources.callback(self.sockdiag.close)
        self.resolver = Resolver(self.sockdiag, faults=self.faults)
        self.engine = Engine(submit=self.resolver.submit, config=cfg.gc, faults=self.faults)
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
        self.destroy: DestroyEvents | None = None
        try:
            self.destroy = DestroyEvents(cfg.netns)
            self._resources.callback(self.destroy.close)
            self.destroy_mode = "sock_diag destroy events"
        except SockDiagError as e:
            self.destroy_mode = f"socket dump each GC cycle ({e})"
        self.notify = Notifier(os.environ, self.faults.record)  # systemd, when it started us
        self._resources.callback(self.notify.close)
        self.rules, self.rules_problem = None, "no nfacct rules installed in the namespace"
        try:
            self.rules = Rules(cfg.netns)
        except RulesError as e:
            self.rules_problem = str(e)
        try:
            self._start(cfg)
        except takeover.TakeoverError as e:
            raise ServiceError(str(e)) from None

    def _start(self, cfg: ServiceConfig) -> None:
        if cfg.takeover:
            number = takeover.successor_queue(
                cfg.control_path, cfg.netns, self.rules, self.rules_problem, cfg.queue
            )
        else:
            self._listen()  # refuses at once if another daemon answers here
            self._serve_atop()
            number = cfg.queue
        counter_at_start = self._queued()  # before bind: packets from here on are ours or a gap
        self.queue = Queue(number, self._on_packet, cfg.netns, maxlen=cfg.queue_maxlen)
        self._resources.callback(self.queue.close)
        queues = {q for *_where, q in self.rules.queue_rules()} if self.rules is not None else set()
        handed = None
        with contextlib.ExitStack() as move:  # a failed move takes its queue rule back
            if queues - {number}:
                # Our queue rule goes in front; the old ones stay until nothing they queued waits.
                self.rules.add_queue(number)
                move.callback(self._drop_queue_quietly, number)
                log.info("queue rules now send to queue %d (were %s)", number, sorted(queues))
            if cfg.takeover:
                handed = takeover.request_handover(cfg.control_path)
                self._claim(wait=5.0)  # the predecessor lets go as it exits
                self._listen()
                self._serve_atop()  # the predecessor's atop socket is gone with it
            if queues - {number}:
                self.rules.drop_queues_except(number)
            move.pop_all()
        self.persistence = Persistence(
            self.store, self.engine, cfg.coverage_key, self._queued, self._waiting, cfg.exit_grace
        )
        for key in self.persistence.restore(counter_at_start, handed):
            self.resolver.submit(key, 0)
        self._start_offload(cfg)
        # Only now, when the loop is about to read: a takeover's queue fills while the predecessor
        # drains, and those packets are ours to count, not the guard's to let pass.
        self.guard = Guard(self.queue.fileno(), number)
        self._resources.callback(self.guard.stop)  # before the queue closes: it shares its socket
        self.queue.on_read = self.guard.beat

    def _start_offload(self, cfg: ServiceConfig) -> None:
        """Open the flow sets and continue from the elements in them (a predecessor's, even in
        queue mode: their counts are taken, then they go). Without sets, every packet is queued."""
        self.offloader: Offloader | None = None
        self.offload_problem = ""
        if self.rules is None:
            self.offload_problem = self.rules_problem
        elif not self.rules.has_flow_sets():
            self.offload_problem = "the installed ruleset has no flow sets: run `nfacct rules install` again"
        if self.offload_problem:
            if cfg.mode == "offload":
                log.warning("flow offload off, every packet goes through the queue: %s", self.offload_problem)
            return
        try:
            sets = FlowSets(cfg.netns)
        except OffloadError as e:
            raise ServiceError(str(e)) from None
        self._resources.callback(sets.close)
        self.offloader = Offloader(sets, self.engine, self.faults, cfg.max_offloaded, cfg.mode)
        try:
            self.offloader.start(self.persistence.offloaded(), self.persistence.first_here)
        except (OffloadError, OSError) as e:
            raise ServiceError(f"reading the flow sets failed: {e}") from None

    def _offload(self, work: str, max_age: float = 0.0) -> None:
        """Refresh the flow sets' readings, or take the next step of one; a failure is counted
        and logged once, never fatal: the counts come at the next reading."""
        if self.offloader is None:
            return
        try:
            if work == "step":
                self.offloader.step()
            else:
                self.offloader.refresh(max_age)
        except (OffloadError, OSError) as e:
            self.faults.record(f"flow sets ({work})", e)

    def _exited(self, tgids: list[int], now: float) -> None:
        """Processes ended: settled at the turn's `_flush`, with the turn's other changes."""
        for tgid in tgids:
            self.resolver.forget(tgid)
            self._exits.append((tgid, now))

    def _flush(self) -> None:
        """The turn's changes to the flow sets, in one transaction: the flows that ended and those
        of the processes that exited go, crediting their last counts, and the flows attributed
        since the last flush come in. Then the exits are applied: what an exited process is
        written with is whole, and its sockets wait for whoever holds them next. A failure is
        counted and logged once, never fatal: the flows stay on the queue path."""
        exits, self._exits = self._exits, []
        if self.offloader is not None:
            try:
                self.offloader.flush(self.engine.offloaded_flows_of([tgid for tgid, _ in exits]))
            except (OffloadError, OSError) as e:
                self.faults.record("flow sets (flush)", e)
        for tgid, now in exits:
            self.engine.process_exited(tgid, now)

    def _drop_queue_quietly(self, number: int) -> None:
        with contextlib.suppress(RulesError):
            self.rules.drop_queue(number)

    def _claim(self, wait: float = 0.0) -> None:
        try:
            held = Claim(self.config.netns, self.config.control_path, wait=wait)
        except ClaimError as e:
            raise ServiceError(str(e)) from None
        self._resources.callback(held.release)
        self._undo.callback(remove_dirs, held.created_dirs)

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

    def _queued(self) -> int | None:
        """The counting rule's packets (None without rules), for the coverage ledger."""
        if self.rules is None:
            return None
        try:
            return self.rules.queued_packets()
        except RulesError as e:
            self.faults.record("reading the counting rule", e)
            return None

    def _waiting(self) -> int:
        """Packets queued for us or a predecessor and not yet read."""
        ours = takeover_pair(self.config.queue)  # our queue is always one of the pair
        return sum(s.waiting for n, s in self.queue.all_kernel_stats().items() if n in ours)

    # ---- per packet ---------------------------------------------------------------------------

    def _on_packet(self, pkt: QueuedPacket) -> None:
        outgoing = pkt.hook == HOOK_LOCAL_OUT
        try:
            ifindex = pkt.outdev if outgoing else pkt.indev
            asked = self.engine.account(pkt.payload, outgoing, ifindex, length=pkt.length, uid=pkt.uid)
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
        else:
            pkt.accept()

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for pkt in held:
            pkt.accept()
        self.queue.flush()

    # ---- events -------------------------------------------------------------------------------

    def _on_proc_events(self) -> None:
        now = time.time()
        exits = []
        for ev in self.events.read():
            if ev.kind == "exit" and ev.pid == ev.tgid:  # the group leader: the process
                exits.append(ev.tgid)
            elif ev.kind == "fork":
                self.resolver.note_new_process(ev.tgid)
            elif ev.kind == "exec":
                self.resolver.forget(ev.tgid)
                facts = process_facts(ev.tgid) if self.engine.is_running(ev.tgid) else None
                if facts is not None:
                    self.engine.process_execed(facts)
        self._exited(exits, now)
        if self.events.overruns > self._seen_overruns:
            self._seen_overruns = self.events.overruns
            self.resolver.forget()  # an exec may be among the lost events
            self._poll_liveness()  # events were lost: check every task once

    def _on_destroy_events(self) -> None:
        for proto, e in self.destroy.read():
            self.engine.socket_closed(proto, e.local, e.lport, e.remote, e.rport)

    def _poll_liveness(self) -> None:
        now = time.time()
        self._exited([t.pid for t in self.engine.running_tasks() if not is_alive(t.pid, t.btime)], now)

    def _dump_closed(self) -> None:
        live = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for proto in (6, 17):
                for e in self.sockdiag.dump(family, proto, ALL_STATES):
                    if e.inode:
                        live.add((proto, e.lport))
        self.engine.close_all_but(live)

    # ---- control ------------------------------------------------------------------------------

    def handle(self, cmd: str) -> dict | object:
        if cmd == "ping":
            return {"ok": True, "handover_format": HANDOVER_FORMAT}
        if cmd == "top":
            return {"time": time.time(), "tasks": self.snapshot()}
        if cmd == "status":
            self._settle()
            return self.status()
        if cmd == "sockets":  # per-socket counters for `nfacct sockets`, as fresh as `top`'s
            self.snapshot()
            return sockview.flows_answer(self.engine.flow_counts())
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
        self.engine.apply_answers(self.resolver.work())
        self._offload("refresh", FRESH)

    @property
    def handed_over(self) -> bool:
        return self._handing_over

    def status(self) -> dict:
        kernel = self.queue.kernel_stats()
        queue = {"number": self.queue.number, "flags": self.queue.flags}
        if kernel is not None:
            queue.update(vars(kernel))
            # Packet ids count every packet handed to us since bind; any we did not see was
            # lost to a full socket buffer (and, with FAIL_OPEN, accepted without accounting).
            queue["missed"] = kernel.id_sequence - self.engine.packets
        queue["maxlen"] = self.queue.maxlen
        queue["guard_accepted"] = self.guard.accepted
        cfg = self.config
        return {
            "pid": os.getpid(),
            "faults": self.faults.status(),
            "control": self.control.status(),
            "atop": self.atop.status() if self.atop else None,
            "netns": cfg.netns,
            "uptime": time.time() - self.started,
            "engine": self.engine.status(),
            "queue": queue,
            "coverage": self.persistence.coverage_status(self.rules_problem),
            "offload": self.offloader.status()
            if self.offloader is not None
            else {"mode": "queue", "problem": self.offload_problem or None},
            "resolver": {**self.resolver.status(), "sock_diag_requests": self.sockdiag.requests},
            "events": {
                "process_exits": self.events_mode,
                "socket_close": self.destroy_mode,
                "proc_connector_overruns": self.events.overruns if self.events else None,
                "destroy_overruns": self.destroy.overruns if self.destroy else None,
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
        # Each key's data is what to call when it is ready; the control server adds its clients.
        sel.register(self.queue.fileno(), selectors.EVENT_READ, lambda _m: self.queue.dispatch(DISPATCH_MOST))
        sel.register(wake_r, selectors.EVENT_READ, lambda _m: os.read(wake_r, 512))
        if self.events:
            sel.register(self.events, selectors.EVENT_READ, lambda _m: self._on_proc_events())
        if self.destroy:
            sel.register(self.destroy, selectors.EVENT_READ, lambda _m: self._on_destroy_events())
        now = time.monotonic()
        due = {
            "persist": now + PERSIST_TICK,
            "gc": now + cfg.gc.cycle,
            "checkpoint": now + cfg.checkpoint_interval,
        }
        if not self.events:
            due["poll"] = now + cfg.poll_interval
        if self.metrics:
            self.metrics.baseline()
        if self.notify.watchdog_period:
            due["watchdog"] = now
        if self.notify.enabled:
            due["notify"] = now + STATUS_PERIOD
        where = f"accounting queue {self.queue.number} in netns {cfg.netns or '(own)'}"
        log.info("%s", where)
        self.notify.ready(where)  # the queue is bound and the control socket listens
        try:
            while self._running:
                now = time.monotonic()
                wait = min(MAX_WAIT, min(due.values()) - now)
                resolver_due = self.resolver.next_due()
                if resolver_due is not None:
                    wait = min(wait, resolver_due)
                if self.control.busy or (self.offloader is not None and self.offloader.reading):
                    wait = 0.0
                for key, mask in sel.select(timeout=max(0.0, wait)):
                    key.data(mask)
                # After the batch: find the owners of the flows it brought while they still exist.
                # Their elements go in before the held first packets leave, so the answers to
                # those (a SYN-ACK) are counted by the kernel instead of queued again.
                try:
                    self.engine.apply_answers(self.resolver.work())
                    self._flush()
                finally:
                    self._release_held()
                self._offload("step")
                self.control.work()  # one command per turn: the queue is served between them
                if self.atop:
                    self.atop.work()
                if self.metrics:
                    self.metrics.work()
                self._timers(due)
            self.notify.stopping("handing over" if self._handing_over else "last verdicts and checkpoint")
            self._drain()
            self.engine.apply_answers(self.resolver.work())
            self._poll_liveness()
            self._flush()
            self._checkpoint()
            if self.control.held:
                tables = self.engine.export()
                for conn in self.control.held:
                    control.answer(conn, {"ok": True, "pid": os.getpid(), "tables": tables})
                self.control.held = []
        finally:
            signal.set_wakeup_fd(old_wakeup)
            self._restore_signals()
            for fd in (self.queue.fileno(), wake_r):
                sel.unregister(fd)
            os.close(wake_r)
            os.close(wake_w)
            self.close()

    def _drain(self, timeout: float = 1.0) -> None:
        """Give what is queued its verdict and its count: unbinding would drop it.

        On a handover the rules already point at the successor; once our queue is empty we wait
        a moment and look again, for packets that met the old rule just before it changed.
        """
        handover = self._handing_over
        deadline = time.monotonic() + (timeout if handover else 0.1)
        settled = not handover
        while True:
            self.queue.dispatch()
            self._release_held()
            stats = self.queue.kernel_stats()
            if stats is None or stats.waiting == 0:
                if settled:
                    return
                settled = True
                time.sleep(0.02)
            elif time.monotonic() > deadline:
                (log.warning if handover else log.info)(
                    "%d packets still queued at exit; the kernel drops them on unbind", stats.waiting
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
        accepted = self.guard.accepted
        stalled, self._guard_seen = accepted > self._guard_seen, accepted
        self.persistence.checkpoint(reason=STALLED if stalled else None)

    def _notify_status(self) -> None:
        coverage = self.persistence.coverage
        self.notify.status(status_line(self.snapshot(), coverage.unaccounted if coverage else None))

    def _gc(self) -> None:
        if self.atop:
            self.atop.before_gc()  # exits the GC may drop are still owed to atop clients
        try:
            # Without destroy events, or when some were lost (closing 100,000 sockets at once
            # overran them: bench/modes.py), the sockets left tell which flows closed; else
            # those flows would wait for --unreferenced-idle (60 s).
            if self.destroy is None or self.destroy.overruns > self._closes_seen:
                self._closes_seen = self.destroy.overruns if self.destroy else 0
                self._dump_closed()
        finally:  # a failed dump must not cost the cycle its idle and exited removals
            if self.metrics:
                self.metrics.refresh()  # what the GC drops is in the aggregates first
            self._offload("refresh", FRESH)  # offloaded flows are idle only if their elements say so
            self.engine.gc()
            self._flush()  # idle offloaded flows: their elements go first, GC drops them next

    def close(self) -> None:
        self._resources.close()
