"""The accounting daemon: one event loop over the queue, process and socket events, the control
socket, timers and signals. Runs in the root namespace (the proc connector only works there);
with `netns` its queue and sock_diag sockets live in that namespace instead.
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

from netfilterqueue import Packet

from . import claim, control
from .claim import Claim, ClaimError
from .coverage import NOT_COUNTING, Coverage
from .engine import Engine
from .events import EventsUnavailable, ProcConnector
from .faults import Faults
from .files import remove_dirs
from .procs import is_alive, process_facts
from .queue import HOOK_LOCAL_OUT, QUEUE_MAXLEN, Queue
from .resolver import Resolver
from .rules import Rules, RulesError, takeover_pair
from .sockdiag import ALL_STATES, DestroyEvents, SockDiag, SockDiagError
from .store import DEFAULT_DB, Store
from .tables import COUNTER_NAMES, GcConfig, TaskInfo

log = logging.getLogger("nfacct")

PERSIST_TICK = 0.25
MAX_WAIT = 1.0  # the loop looks at its timers at least this often, whatever they are set to
HOLD_MAX = 4096  # first packets held for their lookup at most; beyond, they pass at once


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
        self._held: list[Packet] = []  # outgoing packets waiting for their flow's lookup (_on_packet)
        self._hold_max = HOLD_MAX if config.hold_new_connections else 0
        self.faults = Faults()
        self._pending_gaps: list[dict] = []  # unaccounted gaps whose write failed; retried
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
        self.sockdiag = SockDiag(cfg.netns)
        self._resources.callback(self.sockdiag.close)
        self.resolver = Resolver(self.sockdiag)
        self.engine = Engine(submit=self.resolver.submit, config=cfg.gc)
        # Opened before the queue moves: its integrity check and migration (1.3 s for 93 MB
        # from a cold disk) must not hold the packets a takeover's new queue collects.
        self.store = self._open_store()
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
        self.rules, self.rules_problem = None, "no nfacct rules installed in the namespace"
        try:
            self.rules = Rules(cfg.netns)
        except RulesError as e:
            self.rules_problem = str(e)
        if cfg.takeover:
            first, second = takeover_pair(cfg.queue)
            number = second if self._predecessor_queue() == first else first
        else:
            self._listen()  # refuses at once if another daemon answers here
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
                handed = self._handover()
                self._claim(wait=5.0)  # the predecessor lets go as it exits
                self._listen()
            if queues - {number}:
                self.rules.drop_queues_except(number)
            move.pop_all()
        self._restore(counter_at_start, handed)

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

    def _open_store(self) -> Store:
        store = Store(self.config.db_path)
        self._undo.callback(store.discard)  # a failed start leaves no empty database behind
        self._resources.callback(store.close)
        return store

    def _listen(self) -> None:
        self.control = control.Server(self.config.control_path, self.handle, self._sel, self.faults)
        self._resources.callback(self.control.close)
        self._undo.callback(remove_dirs, self.control.created_dirs)

    def _predecessor_queue(self) -> int:
        """The queue the running daemon reads (where the rules point), checked before anything changes."""
        cfg = self.config
        control.request(cfg.control_path, "ping")  # ControlError names the path if nobody answers
        held = claim.holder(cfg.netns)
        if held is None or held.get("control") != os.path.abspath(cfg.control_path):
            accounted = f"accounted by pid {held['pid']} at {held['control']}" if held else "not accounted"
            raise ServiceError(
                f"--takeover replaces the daemon of {cfg.netns or 'this namespace'}, but the namespace is"
                f" {accounted}, not by the daemon at {cfg.control_path}"
            )
        queues = self.rules.queue_rules() if self.rules is not None else []
        if not queues:
            raise ServiceError(f"--takeover needs the nfacct rules installed ({self.rules_problem})")
        return queues[0][-1]

    def _handover(self) -> dict:
        """Ask the predecessor to drain its queue, flush everything to the database, hand us
        its tables and exit. Returns the tables.

        Meanwhile our queue holds the packets the moved rules send us; we read them once the
        predecessor has counted its last one, so every packet is counted exactly once, and
        flows keep their owners even if the owner exited in between.
        """
        path = self.config.control_path
        answer = control.request(path, "handover", timeout=60)
        deadline = time.monotonic() + 10
        while os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)  # the predecessor removes its control socket last, as it exits
        if not os.path.exists(path):
            return answer["tables"]
        raise ServiceError(f"the daemon at {path} (pid {answer.get('pid')}) did not exit after handover")

    def _queued(self) -> int | None:
        if self.rules is None:
            return None
        try:
            return self.rules.queued_packets()
        except RulesError as e:
            log.warning("cannot read the queue rules' counter: %s", e)
            return None

    def _waiting(self) -> int:
        """Packets queued for us or a predecessor and not yet read."""
        stats = self.queue.all_kernel_stats()
        return sum(s.waiting for n, s in stats.items() if n in (self.queue.number, *self._other_queues))

    @property
    def _other_queues(self) -> tuple[int, ...]:
        return tuple(set(takeover_pair(self.config.queue)) - {self.queue.number})

    def _restore(self, counter_at_start: int | None, handed: dict | None = None) -> None:
        """Continue the counts of a predecessor: its tables if it handed them over, else its
        checkpoint; record processes that exited while we were down, and the packets that
        passed while no daemon counted them."""
        if handed is not None:
            for key in self.engine.tables.load(handed):
                self.resolver.submit(key, 0)
        gone = []
        for row in self.store.live() if handed is None else ():
            task = TaskInfo(
                row["pid"],
                row["btime"],
                row["command"],
                row["cmdline"],
                row["uid"],
                row["cgroup"] or "",
                [row[c] for c in COUNTER_NAMES],
            )
            task.checkpointed = list(task.counters)
            if is_alive(task.pid, task.btime):
                self.engine.tables.restore(task)
            else:
                task.exit_time = row["checkpoint_time"]  # the latest moment we know it ran
                gone.append(task.row())
        self.store.save_exited(gone)
        self.coverage: Coverage | None = None
        counter = self._queued()
        if counter is None:
            return
        covered = self.store.state(self.config.coverage_key)
        if covered is None:  # the first daemon here: nothing before our bind is ours to claim
            self.coverage = Coverage(counter_at_start if counter_at_start is not None else 0, time.time())
        else:
            self.coverage = Coverage.parse(covered)
        self.checkpoint(reason=NOT_COUNTING)

    # ---- per packet ---------------------------------------------------------------------------

    def _on_packet(self, pkt: Packet) -> None:
        outgoing = pkt.hook == HOOK_LOCAL_OUT
        try:
            asked = self.engine.account(pkt.get_payload(), outgoing, pkt.outdev if outgoing else pkt.indev)
        except Exception as e:  # a bug must cost one packet's attribution, never its verdict
            self.engine.errors += 1
            self.faults.record("engine", e)
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

    # ---- events -------------------------------------------------------------------------------

    def _on_proc_events(self) -> None:
        tables = self.engine.tables
        now = time.time()
        for ev in self.events.read():
            if ev.kind == "exit":
                task = tables.running.get(ev.tgid)
                if task is not None and ev.pid == ev.tgid:
                    tables.exited(task, now)
            elif ev.kind == "fork":
                self.resolver.index.note_new_process(ev.tgid)
            elif ev.kind == "exec":
                task = tables.running.get(ev.tgid)
                facts = process_facts(ev.tgid) if task is not None else None
                if facts is not None and abs(facts.btime - task.btime) < 0.01:
                    task.comm, task.cmdline = facts.comm, facts.cmdline
        if self.events.overruns:
            self._poll_liveness()  # events were lost: check every task once

    def _on_destroy_events(self) -> None:
        tables = self.engine.tables
        for proto, e in self.destroy.read():
            tables.closed(proto, e.local, e.lport, e.remote, e.rport)

    def _poll_liveness(self) -> None:
        tables = self.engine.tables
        now = time.time()
        for task in list(tables.running.values()):
            if not is_alive(task.pid, task.btime):
                tables.exited(task, now)

    def _dump_closed(self) -> None:
        live = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for proto in (6, 17):
                for e in self.sockdiag.dump(family, proto, ALL_STATES):
                    if e.inode:
                        live.add((proto, e.lport))
        self.engine.tables.close_all_but(live)

    # ---- persistence --------------------------------------------------------------------------

    def persist_exited(self, grace: float | None = None) -> None:
        """Write exited tasks (again, if late packets changed them) once their grace has passed."""
        grace = self.config.exit_grace if grace is None else grace
        now = time.time()
        rows, done = [], []
        for task in self.engine.tables.tasks.values():
            if task.exit_time is not None and now - task.exit_time >= grace and task.saved != task.counters:
                rows.append(task.row())
                done.append(task)
        if rows:
            self.store.save_exited(rows)
            for task in done:
                task.saved = list(task.counters)

    def checkpoint(self, reason: str | None = None) -> None:
        """Write live totals, exited processes still in their grace, and what went unaccounted."""
        self.persist_exited(grace=0.0)  # late packets rewrite them later; a crash must not lose them
        state = {}
        counter = self._queued() if self.coverage is not None else None
        if counter is not None:
            extra = {"reason": reason} if reason else {}
            gap = self.coverage.update(counter, self.engine.packets, self._waiting(), time.time(), **extra)
            if gap is not None:
                log.warning("%d packets passed unaccounted: %s", gap.packets, gap.reason)
                self._pending_gaps.append(gap.as_dict())
            state[self.config.coverage_key] = self.coverage.state(self.engine.packets)
        changed = [t for t in self.engine.tables.running.values() if t.checkpointed != t.counters]
        self.store.checkpoint([t.row() for t in changed], self._pending_gaps, state)
        self._pending_gaps = []
        for t in changed:
            t.checkpointed = list(t.counters)

    # ---- control ------------------------------------------------------------------------------

    def handle(self, cmd: str) -> dict:
        if cmd == "ping":
            return {"ok": True}
        self.engine.apply_answers(self.resolver.work())
        if cmd == "top":
            tasks = sorted(
                self.engine.tables.tasks.values(), key=lambda t: (t.exit_time is not None, -t.total)
            )
            return {"time": time.time(), "tasks": [{**t.as_dict(), "exit_time": t.exit_time} for t in tasks]}
        if cmd == "status":
            return self.status()
        if cmd == "handover":
            self._handing_over = True
            self._running = False
            return control.LATER  # answered with our tables once the queue is drained and flushed
        return {"error": f"unknown command {cmd!r}"}

    def status(self) -> dict:
        kernel = self.queue.kernel_stats()
        queue = {"number": self.queue.number, "flags": self.queue.flags}
        if kernel is not None:
            queue.update(vars(kernel))
            # Packet ids count every packet handed to us since bind; any we did not see was
            # lost to a full socket buffer (and, with FAIL_OPEN, accepted without accounting).
            queue["missed"] = kernel.id_sequence - self.engine.packets
        queue["maxlen"] = self.queue.maxlen
        coverage = {"rules": self.rules_problem if self.coverage is None else "counting rule found"}
        counter = self._queued() if self.coverage is not None else None
        if counter is not None:
            # Not settled here (that is the checkpoint's job): a snapshot of what is missing now.
            pending = counter - self._waiting() - self.coverage.covered
            coverage.update(
                queued_by_kernel=counter,
                unaccounted=self.coverage.unaccounted
                + max(0, pending - (self.engine.packets - self.coverage.seen)),
            )
        cfg = self.config
        return {
            "pid": os.getpid(),
            "faults": self.faults.status(),
            "control": self.control.status(),
            "netns": cfg.netns,
            "uptime": time.time() - self.started,
            "engine": self.engine.status(),
            "queue": queue,
            "coverage": coverage,
            "resolver": {
                "in_flight": self.resolver.in_flight,
                "resolved": self.resolver.resolved,
                "gave_up": self.resolver.gave_up,
                "by_listener": self.resolver.by_listener,
                "errors": self.resolver.errors,
                "sock_diag_requests": self.sockdiag.requests,
                "proc_scans": self.resolver.index.scans,
                "socket_index": len(self.resolver.index),
            },
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
        sel.register(self.queue.fileno(), selectors.EVENT_READ, lambda _m: self.queue.dispatch())
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
        log.info("accounting queue %d in netns %s", self.queue.number, cfg.netns or "(own)")
        try:
            while self._running:
                now = time.monotonic()
                wait = min(MAX_WAIT, min(due.values()) - now)
                resolver_due = self.resolver.next_due()
                if resolver_due is not None:
                    wait = min(wait, resolver_due)
                if self.control.busy:
                    wait = 0.0
                for key, mask in sel.select(timeout=max(0.0, wait)):
                    key.data(mask)
                # After the batch: find the owners of the flows it brought while they still exist.
                try:
                    self.engine.apply_answers(self.resolver.work())
                finally:
                    self._release_held()
                self.control.work()  # one command per turn: the queue is served between them
                self._timers(due)
            self._drain()
            self.engine.apply_answers(self.resolver.work())
            self._poll_liveness()
            self.checkpoint()
            if self.control.held:
                tables = self.engine.tables.export()
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
            ("persist", PERSIST_TICK, self.persist_exited),
            ("poll", cfg.poll_interval, self._poll_liveness),
            ("gc", cfg.gc.cycle, self._gc),
            ("checkpoint", cfg.checkpoint_interval, self.checkpoint),
        ):
            if job in due and now >= due[job]:
                due[job] = now + period
                try:
                    work()
                except Exception as e:  # a full disk or a bug: retried next time, counted, logged once
                    self.faults.record(job, e)

    def _gc(self) -> None:
        try:
            if self.destroy is None:
                self._dump_closed()
        finally:  # a failed dump must not cost the cycle its idle and exited removals
            self.engine.tables.gc()

    def close(self) -> None:
        self._resources.close()
