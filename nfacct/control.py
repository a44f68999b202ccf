"""The control socket: one JSON request line in, one JSON answer line out.

A UNIX stream socket, root-only by default (mode 0600), so `nfacct top` and `nfacct status`
can ask a running daemon for live figures.
"""

from __future__ import annotations

import json
import os
import socket

DEFAULT_CONTROL = "/run/nfacct/control.sock"
MAX_REQUEST = 4096


class ControlError(Exception):
    pass


def request(path: str, cmd: str, timeout: float = 5.0) -> dict:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            chunks = []
            while chunk := s.recv(1 << 16):
                chunks.append(chunk)
    except FileNotFoundError:
        raise ControlError(f"no nfacct daemon at {path} (start one with `nfacct run`)") from None
    except OSError as e:
        raise ControlError(f"cannot talk to the nfacct daemon at {path}: {e.strerror or e}") from None
    answer = json.loads(b"".join(chunks))
    if "error" in answer:
        raise ControlError(answer["error"])
    return answer


def listen(path: str) -> socket.socket:
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    if os.path.exists(path):
        try:
            request(path, "ping", timeout=1.0)
        except ControlError:
            os.unlink(path)  # left behind by a daemon that died
        else:
            raise ControlError(f"another nfacct daemon is already answering at {path}")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(path)
    finally:
        os.umask(old)
    s.listen(16)
    s.setblocking(False)
    return s


LATER = object()  # a handler's answer meaning "the caller will answer this connection itself"


def serve_one(listener: socket.socket, handler) -> socket.socket | None:
    """Answer one client: `handler(cmd)` returns the answer dict, or LATER to keep the
    connection open; it is then returned, to be answered with `answer()`."""
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return None
    conn.settimeout(1.0)
    try:
        data = b""
        while b"\n" not in data and len(data) < MAX_REQUEST:
            chunk = conn.recv(MAX_REQUEST)
            if not chunk:
                break
            data += chunk
        try:
            cmd = json.loads(data)["cmd"]
            result = handler(cmd)
        except (ValueError, KeyError, TypeError):
            result = {"error": 'bad request: expected one JSON line like {"cmd": "status"}'}
        if result is LATER:
            return conn
    except OSError:
        conn.close()  # a client that goes away mid-request is its own problem
        return None
    answer(conn, result)
    return None


def answer(conn: socket.socket, result: dict) -> None:
    with conn:
        try:
            conn.settimeout(10.0)
            conn.sendall(json.dumps(result).encode() + b"\n")
        except OSError:
            pass  # a client that goes away mid-answer is its own problem
