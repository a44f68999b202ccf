"""`nfacct`: a thin command line over the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from . import __version__, control
from .control import ControlError
from .netns import NetnsError
from .queue import QueueError
from .rules import DEFAULT_QUEUE, Rules, RulesError

EXPECTED_ERRORS = (ControlError, NetnsError, QueueError, RulesError, PermissionError)


def queue_number(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"queue number must be an integer, not {text!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"queue number {n} is out of range 0-65535")
    return n


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
        a.add_argument("--netns", metavar="NS", help="named network namespace (default: the current one)")
        if name == "install":
            a.add_argument("--queue", type=queue_number, default=DEFAULT_QUEUE, metavar="N")
            a.add_argument("--backend", choices=("auto", "nft", "iptables-nft"), default="auto")
        if name == "show":
            a.add_argument("--json", action="store_true")

    run = sub.add_parser("run", help="run the accounting service in the foreground")
    run.add_argument("--netns", metavar="NS", help="account this named network namespace")
    run.add_argument("--queue", type=queue_number, default=DEFAULT_QUEUE, metavar="N")
    run.add_argument("--control", default=control.DEFAULT_CONTROL, metavar="PATH")
    run.add_argument("-v", "--verbose", action="store_true")

    top = sub.add_parser("top", help="live per-process counters")
    top.add_argument("--control", default=control.DEFAULT_CONTROL, metavar="PATH")
    top.add_argument("--json", action="store_true")
    top.add_argument("--once", action="store_true", help="print once and exit")
    top.add_argument("--interval", type=float, default=2.0, metavar="SECONDS")

    status = sub.add_parser("status", help="engine and kernel queue counters")
    status.add_argument("--control", default=control.DEFAULT_CONTROL, metavar="PATH")
    status.add_argument("--json", action="store_true")
    return p


def cmd_rules(args: argparse.Namespace) -> int:
    rules = Rules(args.netns)
    if args.action == "install":
        backend = rules.install(args.queue, args.backend)
        print(f"installed queue {args.queue} rules with backend {backend}")
    elif args.action == "remove":
        rules.remove()
        print("removed nfacct rules")
    else:
        state = rules.show()
        if args.json:
            print(json.dumps(state.as_dict(), indent=2))
        else:
            native = "yes" if state.native_queue_supported else "no (falls back to iptables-nft)"
            print(f"backend: {state.backend}\nqueue: {state.queue}\nnative nft queue supported: {native}")
            print(state.ruleset, end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .service import Service  # needs netfilterqueue; keep `rules` usable without it

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="nfacct: %(message)s")
    Service(args.netns, args.queue, args.control).run()
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from . import display

    while True:
        answer = control.request(args.control, "top")
        if args.json:
            print(json.dumps(answer["tasks"]), flush=True)
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


COMMANDS = {"rules": cmd_rules, "run": cmd_run, "top": cmd_top, "status": cmd_status}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except EXPECTED_ERRORS as e:
        print(f"nfacct: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
