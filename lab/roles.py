"""Traffic roles for the lab, each run as a real process inside a lab namespace:
`python -m lab.roles ROLE ...` (see `roles`; `Lab.role` and `Lab.run` set PYTHONPATH so that
this works from any directory). The standard library only: the system's python3 can run them.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time

SO_RCVBUFFORCE = 33  # Linux; Python's socket module does not name it


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _hold(args: argparse.Namespace, report: dict) -> None:
    print(json.dumps(report), flush=True)
    if args.hold:
        sys.stdin.read()  # stay alive until the parent closes our stdin


def _echo_round(s: socket.socket, payload: bytes) -> int:
    """Send `payload` on a TCP socket and read back its echo; returns the bytes received."""
    s.sendall(payload)
    need = len(payload)
    while need:
        chunk = s.recv(need)
        if not chunk:
            raise SystemExit("server closed early")
        need -= len(chunk)
    return len(payload)


def role_echo_server(args: argparse.Namespace) -> None:
    fam = _family(args.bind)
    if args.proto == "udp":
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((args.bind, args.port))
        print(json.dumps({"ready": True}), flush=True)
        while True:
            data, addr = s.recvfrom(65535)
            s.sendto(data, addr)
    srv = socket.socket(fam, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.bind, args.port))
    srv.listen(128)
    print(json.dumps({"ready": True}), flush=True)

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def role_client(args: argparse.Namespace) -> None:
    fam = _family(args.connect)
    payload = b"n" * args.size
    if args.proto == "tcp":
        s = socket.socket(fam, socket.SOCK_STREAM)
        if args.sport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", args.sport))
        s.connect((args.connect, args.port))
        got = 0
        for _ in range(args.rounds):
            time.sleep(args.pause)
            got += _echo_round(s, payload)
        s.close()
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM)
        if args.sport:
            s.bind(("", args.sport))
        s.settimeout(5)
        got = 0
        for _ in range(args.rounds):
            s.sendto(payload, (args.connect, args.port))
            got += len(s.recv(65535))
        s.close()
    _hold(args, {"pid": os.getpid(), "received": got})


def role_sink(args: argparse.Namespace) -> None:
    """A UDP server that only receives: netatop could never attribute this one."""
    s = socket.socket(_family(args.bind), socket.SOCK_DGRAM)
    s.bind((args.bind, args.port))
    if args.rcvbuf:  # FORCE: beyond net.core.rmem_max (we run as root)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, args.rcvbuf)
    s.settimeout(args.idle)  # a test waiting for a datagram that never comes fails, not hangs
    print(json.dumps({"ready": True}), flush=True)
    got = 0
    for _ in range(args.count):
        try:
            got += len(s.recv(65535))
        except TimeoutError:
            break
    _hold(args, {"pid": os.getpid(), "received": got})


def role_sender(args: argparse.Namespace) -> None:
    s = socket.socket(_family(args.connect), socket.SOCK_DGRAM)
    if args.sport:
        s.bind(("", args.sport))
    start = time.monotonic()
    for i in range(args.count):
        if args.rate:  # paced: packet i leaves at start + i/rate
            delay = start + i / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        s.sendto(b"s" * args.size, (args.connect, args.port))
    _hold(args, {"pid": os.getpid(), "sent": args.count})


def role_flows(args: argparse.Namespace) -> None:
    """Short TCP connections one after another (connect, send, receive the echo, close) until
    `--count` are done or `--seconds` have passed, to ports --port .. --port + --ports - 1 in
    turn. A failed connection is counted by its errno and the next one is tried; 100 failures
    in a row end the run.

    Several server ports keep connect() fast: the kernel looks for a free local port per
    destination, and its search slows down as the closed connections' TIME_WAIT entries for the
    same destination pile up (measured: ~2,900/s over the first 10,000 flows to one port, ~790/s
    over the next 25,000)."""
    fam = _family(args.connect)
    payload = b"f" * args.size
    done = failed = in_a_row = 0
    errors: dict[str, int] = {}
    start = time.monotonic()
    deadline = start + args.seconds
    while done < args.count and in_a_row < 100 and time.monotonic() < deadline:
        port = args.port + (done + failed) % args.ports
        try:
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect((args.connect, port))
                s.sendall(payload)
                need = len(payload)
                while need:
                    chunk = s.recv(need)
                    if not chunk:
                        raise ConnectionResetError(errno.ECONNRESET, "closed before the echo")
                    need -= len(chunk)
        except OSError as e:
            failed += 1
            in_a_row += 1
            name = errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__
            errors[name] = errors.get(name, 0) + 1
            continue
        done += 1
        in_a_row = 0
    elapsed = time.monotonic() - start
    report = {"pid": os.getpid(), "flows": done, "failed": failed, "errors": errors, "seconds": elapsed}
    _hold(args, report)


def role_holder(args: argparse.Namespace) -> None:
    """One socket that changes hands between processes, driven by commands on stdin.

    The socket is opened here (UDP bound to --sport, or a TCP connection from --sport),
    adopted from an inherited descriptor (--fd), received later over a UNIX socket (--listen
    PATH, then `receive`), or accepted (--accept: listen on --port, then `accept`; this end
    does not echo, it only closes when told). Each command is answered by one JSON line:
      send N          N echo rounds with --connect:--port through the socket
      spawn RFD WFD   fork and exec a new holder (`--fd`) that inherits the socket; its stdin
                      and stdout are RFD and WFD, descriptors our own parent passed to us
      pass PATH       send the socket (SCM_RIGHTS) to the holder listening at PATH
      receive         accept one connection on --listen and adopt the socket it carries
      accept          accept one TCP connection on --port (with --accept)
      close           drop our copy of the socket
    End of stdin ends the process.
    """
    dest = (args.connect, args.port)
    payload = b"h" * args.size
    s: socket.socket | None = None
    listener = None
    if args.fd >= 0:
        s = socket.socket(fileno=args.fd)
    elif args.listen:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(args.listen)
        listener.listen(1)
    elif args.accept:
        listener = socket.socket(_family(args.connect), socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("", args.port))
        listener.listen(1)
    else:
        kind = socket.SOCK_STREAM if args.proto == "tcp" else socket.SOCK_DGRAM
        s = socket.socket(_family(args.connect), kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", args.sport))
        if args.proto == "tcp":
            if args.linger2:  # FIN_WAIT2 stays a full socket after close instead of a timewait one
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_LINGER2, args.linger2)
            s.connect(dest)

    def answer(**report) -> None:
        print(json.dumps({"pid": os.getpid(), **report}), flush=True)

    answer(ready=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "send":
            got = 0
            s.settimeout(5)
            for _ in range(int(rest[0])):
                if s.type == socket.SOCK_STREAM:
                    got += _echo_round(s, payload)
                else:
                    s.sendto(payload, dest)
                    got += len(s.recv(65535))
            answer(received=got)
        elif cmd == "spawn":
            rfd, wfd = int(rest[0]), int(rest[1])
            argv = [sys.executable, "-m", "lab.roles", "holder", "--fd", str(s.fileno())]
            argv += ["--proto", args.proto, "--connect", args.connect, "--port", str(args.port)]
            argv += ["--size", str(args.size)]
            child = subprocess.Popen(argv, stdin=rfd, stdout=wfd, pass_fds=(s.fileno(),))
            os.close(rfd)
            os.close(wfd)
            answer(child=child.pid)
        elif cmd == "pass":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as u:
                u.connect(rest[0])
                socket.send_fds(u, [b"fd"], [s.fileno()])
                u.recv(1)  # the receiver has adopted it
            answer(passed=True)
        elif cmd == "receive":
            conn, _ = listener.accept()
            with conn:
                _msg, fds, _flags, _addr = socket.recv_fds(conn, 16, 1)
                s = socket.socket(fileno=fds[0])
                conn.sendall(b"k")
            answer(received_fd=True)
        elif cmd == "accept":
            s, _ = listener.accept()
            answer(accepted=True)
        elif cmd == "close":
            s.close()
            answer(closed=True)
        else:
            raise SystemExit(f"unknown command {cmd!r}")


def roles(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lab.roles")
    sub = p.add_subparsers(dest="role", required=True)
    a = sub.add_parser("echo-server")
    a.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    a.add_argument("--bind", default="0.0.0.0")
    a.add_argument("--port", type=int, required=True)
    a = sub.add_parser("client")
    a.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    a.add_argument("--connect", required=True)
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--sport", type=int, default=0)
    a.add_argument("--size", type=int, default=1000)
    a.add_argument("--rounds", type=int, default=10)
    a.add_argument("--pause", type=float, default=0.0, help="seconds before each TCP round")
    a.add_argument("--hold", action="store_true")
    a = sub.add_parser("sink")
    a.add_argument("--bind", default="0.0.0.0")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--count", type=int, required=True)
    a.add_argument("--idle", type=float, default=10.0, help="give up after this many seconds of silence")
    a.add_argument("--rcvbuf", type=int, default=0, help="SO_RCVBUF in bytes (default: the system's)")
    a.add_argument("--hold", action="store_true")
    a = sub.add_parser("sender")
    a.add_argument("--connect", required=True)
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--sport", type=int, default=0)
    a.add_argument("--count", type=int, default=10)
    a.add_argument("--size", type=int, default=200)
    a.add_argument("--rate", type=float, default=0, help="packets per second (default: as fast as possible)")
    a.add_argument("--hold", action="store_true")
    a = sub.add_parser("flows")
    a.add_argument("--connect", required=True)
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--ports", type=int, default=1)
    a.add_argument("--count", type=int, required=True)
    a.add_argument("--size", type=int, default=32)
    a.add_argument("--seconds", type=float, default=120.0)
    a.add_argument("--hold", action="store_true")
    a = sub.add_parser("holder")
    a.add_argument("--proto", choices=("tcp", "udp"), default="udp")
    a.add_argument("--connect", required=True)
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--sport", type=int, default=0)
    a.add_argument("--size", type=int, default=300)
    a.add_argument("--fd", type=int, default=-1)
    a.add_argument("--listen", default="")
    a.add_argument("--accept", action="store_true")
    a.add_argument("--linger2", type=int, default=0)
    args = p.parse_args(argv)
    {
        "echo-server": role_echo_server,
        "client": role_client,
        "sink": role_sink,
        "sender": role_sender,
        "flows": role_flows,
        "holder": role_holder,
    }[args.role](args)


if __name__ == "__main__":
    roles()
