"""`nfacct`: a thin command line over the library."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime

from . import __version__, atop, control, text, units
from .atop import AtopError
from .control import ControlError
from .netns import NetnsError, NoSuchNetns
from .queue import QUEUE_MAXLEN, QueueError
from .rules import DEFAULT_QUEUE, FLOW_SET_SIZE, OFFLOAD_MARK, Rules, RulesError
from .scrape import ScrapeError, parse_address
from .sockets import SocketsError
from .store import BY_COLUMNS, DEFAULT_DB, Store, StoreError
from .tables import COUNTER_NAMES, GcConfig
from .topview import GROUPINGS

HANDED_OVER = 3  # `nfacct run`'s exit status after a successor took over (--takeover)
EXPECTED_ERRORS = (
    AtopError,
    ControlError,
    NetnsError,
    QueueError,
    RulesError,
    ScrapeError,
    SocketsError,
    StoreError,
    PermissionError,
)


def queue_number(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"queue number must be an integer, not {value!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"queue number {n} is out of range 0-65535")
    return n


def mark_bit(value: str) -> int:
    try:
        n = int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"mark bit must be a number (0x10000000), not {value!r}") from None
    if n <= 0 or n > 0xFFFFFFFF or n & (n - 1):
        raise argparse.ArgumentTypeError(f"mark bit {value} must be a single bit of the 32-bit mark")
    return n


DAY = 86_400.0
YEAR = 365 * DAY
MAX_QUEUE_MAXLEN = 1 << 20
MAX_SOCKINFO = 10_000_000  # about 1 KiB each (docs/lifecycle.md): 10 GiB
MAX_TASKINFO = 4_194_304  # the kernel's PID_MAX_LIMIT: more processes never run at once


def seconds(most: float) -> Callable[[str], float]:
    """A parser of a number of seconds above 0 and at most `most` (NaN and infinity refused)."""

    def parse(value: str) -> float:
        try:
            n = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds, not {value!r}") from None
        if not math.isfinite(n):
            raise argparse.ArgumentTypeError(f"expected a finite number of seconds, not {value!r}")
        if n <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {value!r}")
        if n > most:
            raise argparse.ArgumentTypeError(f"{value} seconds is more than the limit of {most:,.0f}")
        return n

    return parse


def count(most: int) -> Callable[[str], int]:
    """A parser of an integer from 1 to `most`."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, not {value!r}") from None
        if n <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive integer, not {value!r}")
        if n > most:
            raise argparse.ArgumentTypeError(f"{value} is more than the limit of {most:,}")
        return n

    return parse


def metrics_address(value: str) -> tuple[str, int]:
    try:
        return parse_address(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def control_path(value: str) -> str:
    try:
        return control.check_path(value)
    except ControlError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def when(value: str) -> float:
    """A moment: a duration ago (90s, 30m, 1h, 2d, 1w) or an ISO date/time (local time)."""
    if value and value[-1] in _UNITS and value[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(value[:-1]) * _UNITS[value[-1]]
    try:
        return datetime.fromisoformat(value).timestamp()
    except (ValueError, OverflowError, OSError):  # year 0, or beyond what the C library takes
        raise argparse.ArgumentTypeError(
            f"expected a duration like 1h or a date like 2026-11-23T10:00, not {value!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nfacct", description="Per-process network accounting over NFQUEUE.")
    p.add_argument("--version", action="version", version=f"nfacct {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rules = sub.add_parser("rules", help="install, remove or show the queue ruleset")
    rsub = rules.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (
        ("install", "install the ruleset (idempotent)"),
        ("remove", "remove every nfacct rule"),
        ("show", "show the active backend and rules"),
    ):
        a = rsub.add_parser(name, help=help_text)
        a.add_argument(
            "--netns",
            action="append",
            metavar="NS",
            help="named network namespace (default: the current one); repeat it for several",
        )
        if name == "install":
            a.add_argument("--queue", type=queue_number, default=DEFAULT_QUEUE, metavar="N")
            a.add_argument("--backend", choices=("auto", "nft", "iptables-nft"), default="auto")
            a.add_argument(
                "--offload-mark",
                type=mark_bit,
                default=OFFLOAD_MARK,
                metavar="BIT",
                help=f"the mark bit that tells iptables-nft's queue rules a packet was counted by the "
                f"flow sets (default {OFFLOAD_MARK:#x}; one bit, cleared and set by nfacct only; "
                "see docs/install.md)",
            )
        if name == "show":
            a.add_argument("--json", action="store_true")

    run = sub.add_parser("run", help="run the accounting service in the foreground")
    run.add_argument(
        "--netns",
        action="append",
        default=[],
        metavar="NS",
        help="account this named network namespace; repeat it for several. A shell pattern ('ct-*')"
        " names every namespace it matches that has the nfacct rules installed, now and at each"
        " reload (see docs/namespaces.md)",
    )
    run.add_argument("--queue", type=queue_number, default=DEFAULT_QUEUE, metavar="N")
    run.add_argument("--control", type=control_path, default=control.DEFAULT_CONTROL, metavar="PATH")
    run.add_argument(
        "--db", default=DEFAULT_DB, metavar="PATH", help=f"SQLite database (default {DEFAULT_DB})"
    )
    gc = GcConfig()
    for flag, attr, most, help_text in (
        ("--gc-cycle", "cycle", DAY, "garbage collector period"),
        ("--tcp-idle", "tcp_idle", YEAR, "drop idle TCP sockinfo after"),
        ("--udp-idle", "udp_idle", YEAR, "drop idle UDP sockinfo (local port > 1024) after"),
        ("--unreferenced-idle", "unreferenced_idle", YEAR, "drop sockinfo without a live owner after"),
        ("--closed-idle", "closed_idle", YEAR, "drop sockinfo of a destroyed socket after"),
    ):
        run.add_argument(
            flag,
            type=seconds(most),
            default=getattr(gc, attr),
            metavar="SECONDS",
            help=f"{help_text} (default {getattr(gc, attr):g}, at most {most:,.0f})",
        )
    run.add_argument(
        "--max-sockinfo",
        type=count(MAX_SOCKINFO),
        default=gc.max_sockinfo,
        metavar="N",
        help=f"flows tracked at most, about 1 KiB each (default {gc.max_sockinfo:,}, "
        f"at most {MAX_SOCKINFO:,})",
    )
    run.add_argument(
        "--max-taskinfo",
        type=count(MAX_TASKINFO),
        default=gc.max_taskinfo,
        metavar="N",
        help=f"processes tracked at most (default {gc.max_taskinfo:,}, at most {MAX_TASKINFO:,})",
    )
    run.add_argument(
        "--checkpoint-interval",
        type=seconds(DAY),
        default=10.0,
        metavar="SECONDS",
        help="how often live counts are written; a SIGKILL loses at most this much (default 10)",
    )
    run.add_argument(
        "--queue-maxlen",
        type=count(MAX_QUEUE_MAXLEN),
        default=QUEUE_MAXLEN,
        metavar="N",
        help="packets the kernel holds for the daemon before fail-open lets them pass unaccounted "
        "(it does not bound how long a stopped daemon stalls senders: see docs/limits.md); "
        f"default {QUEUE_MAXLEN}, at most {MAX_QUEUE_MAXLEN:,}: each queued packet pins a buffer of "
        "up to 64 KiB with GSO, 64 GiB at the limit",
    )
    run.add_argument(
        "--mode",
        choices=("offload", "queue"),
        default="offload",
        help="offload (default): once a flow's owner is known, the kernel counts it in the flow sets "
        "and its packets no longer wait for the daemon; queue: every packet goes through the daemon",
    )
    run.add_argument(
        "--max-offloaded",
        type=count(FLOW_SET_SIZE),
        default=FLOW_SET_SIZE,
        metavar="N",
        help=f"flows counted in the kernel at once; beyond, they stay on the queue path and `status` "
        f"counts them as overflow (default and most {FLOW_SET_SIZE:,}, the size of each flow set)",
    )
    run.add_argument(
        "--no-hold",
        action="store_true",
        help="let the first packet of a new outgoing TCP connection pass before its owner is found "
        "(faster connection setup; connections shorter than a lookup may stay unidentified)",
    )
    run.add_argument(
        "--takeover",
        action="store_true",
        help="replace the daemon answering at --control without losing a packet (queue N and N+1 alternate)",
    )
    run.add_argument(
        "--no-proc-connector",
        action="store_true",
        help="detect process exits by polling /proc instead of the proc connector",
    )
    run.add_argument(
        "--atop-socket",
        nargs="?",
        const=atop.DEFAULT_ATOP_SOCKET,
        metavar="PATH",
        help=f"serve `atop -K` (atop 2.10 and later) at PATH (default {atop.DEFAULT_ATOP_SOCKET}, "
        "where atop looks), as netatop-bpf does",
    )
    run.add_argument(
        "--metrics",
        type=metrics_address,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (a bare PORT: on 127.0.0.1); "
        "see docs/metrics.md",
    )
    run.add_argument("-v", "--verbose", action="store_true")

    hist = sub.add_parser("history", help="top talkers of a period, from the database")
    hist.add_argument("--db", default=DEFAULT_DB, metavar="PATH")
    hist.add_argument("--since", type=when, metavar="TIME", help="e.g. 1h, 30m, 2d or 2026-11-23T10:00")
    hist.add_argument("--until", type=when, metavar="TIME")
    hist.add_argument("--by", choices=tuple(BY_COLUMNS), default="command")
    # A pid is at most the kernel's PID_MAX_LIMIT, as MAX_TASKINFO.
    hist.add_argument("--pid", type=count(MAX_TASKINFO), metavar="PID", help="only processes with this pid")
    fmt = hist.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")

    top = sub.add_parser("top", help="live per-process counters")
    top.add_argument("--control", type=control_path, default=control.DEFAULT_CONTROL, metavar="PATH")
    top.add_argument("--json", action="store_true")
    top.add_argument("--once", action="store_true", help="print once and exit")
    top.add_argument("--interval", type=seconds(DAY), default=2.0, metavar="SECONDS")
    top.add_argument("--by", choices=GROUPINGS, default="process", help="grouping (keys p c u s t, g: next)")

    socks = sub.add_parser("sockets", help="every TCP and UDP socket: owner, options, diagnostics, counters")
    socks.add_argument("--netns", metavar="NS", help="named network namespace (default: the current one)")
    socks.add_argument(
        "--pid", type=count(MAX_TASKINFO), metavar="N", help="only the sockets process N holds"
    )
    which = socks.add_mutually_exclusive_group()
    which.add_argument("--tcp", action="store_true", help="TCP sockets only")
    which.add_argument("--udp", action="store_true", help="UDP sockets only")
    socks.add_argument("--json", action="store_true", help="one JSON object per line and socket")
    socks.add_argument(
        "--control",
        type=control_path,
        metavar="PATH",
        help="the daemon to take counters from (default: the one accounting the namespace, if any)",
    )

    reload = sub.add_parser(
        "reload",
        help="account namespaces added since the daemon started (as SIGHUP does); see docs/namespaces.md",
    )
    reload.add_argument("--netns", metavar="NS", help="account this named namespace from now on")
    reload.add_argument("--control", type=control_path, default=control.DEFAULT_CONTROL, metavar="PATH")

    status = sub.add_parser("status", help="engine and kernel queue counters")
    status.add_argument("--control", type=control_path, default=control.DEFAULT_CONTROL, metavar="PATH")
    status.add_argument("--json", action="store_true")
    return p


def cmd_rules(args: argparse.Namespace) -> int:
    names = args.netns or [None]
    every = [Rules(name) for name in names]  # every name checked before anything changes
    for name, rules in zip(names, every, strict=True):
        where = f" in network namespace {name}" if len(names) > 1 else ""
        if args.action == "install":
            backend = rules.install(args.queue, args.backend, args.offload_mark)
            print(f"installed queue {args.queue} rules with backend {backend}{where}")
        elif args.action == "remove":
            rules.remove()
            print(f"removed nfacct rules{where}")
        else:
            show_rules(rules, args.json, where)
    return 0


def show_rules(rules: Rules, as_json: bool, where: str) -> None:
    state = rules.show()
    if as_json:
        print(json.dumps(state.as_dict(), indent=2))
        return
    if where:
        print(f"#{where}")
    native = "yes" if state.native_queue_supported else "no (falls back to iptables-nft)"
    print(f"backend: {state.backend}\nqueue: {state.queue}\nnative nft queue supported: {native}")
    print(state.ruleset, end="")


def cmd_run(args: argparse.Namespace) -> int:
    from .service import Service, ServiceConfig, ServiceError

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="nfacct: %(message)s")
    gc = GcConfig(
        cycle=args.gc_cycle,
        tcp_idle=args.tcp_idle,
        udp_idle=args.udp_idle,
        unreferenced_idle=args.unreferenced_idle,
        closed_idle=args.closed_idle,
        max_sockinfo=args.max_sockinfo,
        max_taskinfo=args.max_taskinfo,
    )
    if args.atop_socket is not None:
        atop.check_usable(args.atop_socket)  # now: a takeover's predecessor is gone when it is made
    config = ServiceConfig(
        netns=tuple(args.netns),
        queue=args.queue,
        control_path=args.control,
        db_path=args.db,
        gc=gc,
        checkpoint_interval=args.checkpoint_interval,
        proc_connector=not args.no_proc_connector,
        queue_maxlen=args.queue_maxlen,
        takeover=args.takeover,
        hold_new_connections=not args.no_hold,
        mode=args.mode,
        max_offloaded=args.max_offloaded,
        atop_socket=args.atop_socket,
        metrics=args.metrics,
    )
    try:
        service = Service(config)
    except ServiceError as e:
        print(f"nfacct: error: {e}", file=sys.stderr)
        return 1
    service.run()
    # Not 0: under systemd's Restart=always a daemon that handed over must not be started again
    # (packaging/nfacct.service: SuccessExitStatus=, RestartPreventExitStatus=).
    return HANDED_OVER if service.handed_over else 0


def cmd_reload(args: argparse.Namespace) -> int:
    answer = control.request(args.control, f"reload {args.netns}" if args.netns else "reload")
    added = ", ".join(answer["added"]) or "none"
    accounted = ", ".join(n or "(own)" for n in answer["accounted"]) or "none"
    print(f"added: {added}; accounting: {accounted}")
    for name, why in answer["refused"].items():
        print(f"nfacct: error: cannot account {name}: {why}", file=sys.stderr)
    return 1 if answer["refused"] else 0


def cmd_history(args: argparse.Namespace) -> int:
    from . import display

    store = Store(args.db, readonly=True)
    try:
        rows = store.history(args.since, args.until, args.by, args.pid)
        unaccounted = store.unaccounted(args.since, args.until)
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2))  # ASCII: undecodable bytes as \udcXX (see nfacct.text)
    elif args.csv:
        named = args.by != "netns" and display.several_namespaces(rows)
        write_csv(rows, [args.by, "processes", *COUNTER_NAMES, *(["netns"] if named else [])])
    else:
        display.print_history(rows, args.by, unaccounted)
    return 0


def write_csv(rows: list[dict], fields: list[str]) -> None:
    """CSV of `rows`: the exact bytes of every name for a pipe or a file, escaped for a
    terminal, which would otherwise act on a hostile command line's escape sequences."""
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    if sys.stdout.isatty():
        rows = [{k: text.escape(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows]
        writer.writerows(rows)
        sys.stdout.write(out.getvalue())
    else:
        writer.writerows(rows)
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode(out.getvalue()))


def cmd_top(args: argparse.Namespace) -> int:
    from . import display, live

    if not (args.once or args.json):
        return live.run(args.control, args.interval, args.by)
    while True:
        answer = control.request(args.control, "top")
        if args.json:
            tasks = [{**t, "unit": units.unit(t["cgroup"])} for t in answer["tasks"]]
            print(json.dumps(tasks), flush=True)
        else:
            display.print_tasks(answer["tasks"])
        if args.once:
            return 0
        time.sleep(args.interval)


def cmd_status(args: argparse.Namespace) -> int:
    from . import display

    answer = control.request(args.control, "status")
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        display.print_status(answer)
    return 0


def cmd_sockets(args: argparse.Namespace) -> int:
    from . import sockets, sockview

    protocols = ("tcp",) if args.tcp else ("udp",) if args.udp else ("tcp", "udp")
    listing = sockets.collect(args.netns, args.pid, protocols, args.control)
    if args.json:
        for r in listing.records:
            print(json.dumps(r))  # ASCII: undecodable bytes of a name as \udcXX (see nfacct.text)
    else:
        print("\n".join(sockview.table(listing.records, listing.counters)))
    if listing.notes:
        print(f"nfacct: note: {'; '.join(listing.notes)}", file=sys.stderr)
    return 0


COMMANDS = {
    "rules": cmd_rules,
    "run": cmd_run,
    "top": cmd_top,
    "status": cmd_status,
    "history": cmd_history,
    "sockets": cmd_sockets,
    "reload": cmd_reload,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except NoSuchNetns as e:  # a mistake on the command line, as argparse's own are: status 2
        print(f"nfacct: error: {e}", file=sys.stderr)
        return 2
    except EXPECTED_ERRORS as e:
        print(f"nfacct: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader left (`| head`): end quietly with the status of a command killed by SIGPIPE,
        # as cat or grep would, and spare Python a second failure flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
