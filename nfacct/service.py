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

from . import control
from .engine import Engine
from .events import EventsUnavailable, ProcConnector
from .procs import is_alive, process_facts
from .queue import HOOK_LOCAL_OUT, Queue
from .resolver import Resolver
from .sockdiag import ALL_STATES, DestroyEvents, SockDiag, SockDiagError
from .store import DEFAULT_DB, Store
from .tables import COUNTER_NAMES, GcConfig, TaskInfo

log = logging.getLogger("nfacct")

PERSIST_TICK = 0.25


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


class Service:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.started = time.time()
        self._running = False
        self._closers: list = []
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        cfg = self.config
        self.sockdiag = SockDiag(cfg.netns)
        self._closers.append(self.sockdiag.close)
        self.resolver = Resolver(self.sockdiag)
        self.engine = Engine(submit=self.resolver.submit, config=cfg.gc)
        self.store = Store(cfg.db_path)
        self._closers.append(self.store.close)
        self.events: ProcConnector | None = None
        self.events_mode = "polling /proc (disabled by --no-proc-connector)"
        if cfg.proc_connector:
            try:
                self.events = ProcConnector()
                self._closers.append(self.events.close)
                self.events_mode = "proc connector"
            except EventsUnavailable as e:
                self.events_mode = f"polling /proc ({e})"
                log.warning("%s; falling back to polling /proc every %ss", e, cfg.poll_interval)
        self.destroy: DestroyEvents | None = None
        try:
            self.destroy = DestroyEvents(cfg.netns)
            self._closers.append(self.destroy.close)
            self.destroy_mode = "sock_diag destroy events"
        except SockDiagError as e:
            self.destroy_mode = f"socket dump each GC cycle ({e})"
        self._restore()
        self.queue = Queue(cfg.queue, self._on_packet, cfg.netns)
        self._closers.append(self.queue.close)
        self._listener = control.listen(cfg.control_path)
        self._closers.append(self._close_listener)

    def _close_listener(self) -> None:
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.control_path)

    def _restore(self) -> None:
        """Continue the counts of a checkpoint; record processes that exited while we were down."""
        gone = []
        for row in self.store.live():
            task = TaskInfo(
                row["pid"],
                row["btime"],
                row["command"],
                row["cmdline"],
                row["uid"],
                row["cgroup"] or "",
                [row[c] for c in COUNTER_NAMES],
            )
            if is_alive(task.pid, task.btime):
                self.engine.tables.restore(task)
            else:
                task.exit_time = row["checkpoint_time"]  # the latest moment we know it ran
                gone.append(task.row())
        self.store.save_exited(gone)

    # ---- per packet ---------------------------------------------------------------------------

    def _on_packet(self, pkt: Packet) -> None:
        # The verdict goes first: accounting never holds a packet back.
        pkt.accept()
        try:
            outgoing = pkt.hook == HOOK_LOCAL_OUT
            self.engine.account(pkt.get_payload(), outgoing, pkt.outdev if outgoing else pkt.indev)
        except Exception:
            self.engine.errors += 1

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

    def checkpoint(self) -> None:
        self.store.checkpoint([t.row() for t in self.engine.tables.running.values()])

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
        return {"error": f"unknown command {cmd!r}"}

    def status(self) -> dict:
        kernel = self.queue.kernel_stats()
        queue = {"number": self.queue.number, "flags": self.queue.flags}
        if kernel is not None:
            queue.update(vars(kernel))
            # Packet ids count every packet handed to us since bind; any we did not see was
            # lost to a full socket buffer (and, with FAIL_OPEN, accepted without accounting).
            queue["missed"] = kernel.id_sequence - self.engine.packets
        cfg = self.config
        return {
            "pid": os.getpid(),
            "netns": cfg.netns,
            "uptime": time.time() - self.started,
            "engine": self.engine.status(),
            "queue": queue,
            "resolver": {
                "in_flight": self.resolver.in_flight,
                "resolved": self.resolver.resolved,
                "gave_up": self.resolver.gave_up,
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
        sel = selectors.DefaultSelector()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        old_handlers = {s: signal.signal(s, self.stop) for s in (signal.SIGTERM, signal.SIGINT)}
        sel.register(self.queue.fileno(), selectors.EVENT_READ, "queue")
        sel.register(self._listener, selectors.EVENT_READ, "control")
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        if self.events:
            sel.register(self.events, selectors.EVENT_READ, "procs")
        if self.destroy:
            sel.register(self.destroy, selectors.EVENT_READ, "destroy")
        now = time.monotonic()
        due = {
            "persist": now + PERSIST_TICK,
            "gc": now + cfg.gc.cycle,
            "checkpoint": now + cfg.checkpoint_interval,
        }
        if not self.events:
            due["poll"] = now + cfg.poll_interval
        self._running = True
        log.info("accounting queue %d in netns %s", self.queue.number, cfg.netns or "(own)")
        try:
            while self._running:
                now = time.monotonic()
                wait = min(due.values()) - now
                resolver_due = self.resolver.next_due()
                if resolver_due is not None:
                    wait = min(wait, resolver_due)
                for key, _ in sel.select(timeout=max(0.0, wait)):
                    if key.data == "queue":
                        self.queue.dispatch()
                    elif key.data == "procs":
                        self._on_proc_events()
                    elif key.data == "destroy":
                        self._on_destroy_events()
                    elif key.data == "control":
                        control.serve_one(self._listener, self.handle)
                    else:
                        os.read(wake_r, 512)
                # After the batch: find the owners of the flows it brought while they still exist.
                self.engine.apply_answers(self.resolver.work())
                self._timers(due)
            self.queue.dispatch()  # what is already queued still gets its verdict and its count
            self.engine.apply_answers(self.resolver.work())
            self._poll_liveness()
            self.persist_exited(grace=0.0)
            self.checkpoint()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            sel.close()
            os.close(wake_r)
            os.close(wake_w)
            self.close()

    def _timers(self, due: dict[str, float]) -> None:
        cfg = self.config
        now = time.monotonic()
        if now >= due["persist"]:
            self.persist_exited()
            due["persist"] = now + PERSIST_TICK
        if "poll" in due and now >= due["poll"]:
            self._poll_liveness()
            due["poll"] = now + cfg.poll_interval
        if now >= due["gc"]:
            if self.destroy is None:
                self._dump_closed()
            self.engine.tables.gc(now)
            due["gc"] = now + cfg.gc.cycle
        if now >= due["checkpoint"]:
            self.checkpoint()
            due["checkpoint"] = now + cfg.checkpoint_interval

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()
