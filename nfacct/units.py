"""A cgroup v2 path as an operator names it: the container it belongs to, or its systemd unit.

Pure: no I/O, only the path's text. `unit` answers, in this order:

1. A container, from the innermost path component a container runtime names, outwards (a
   container runs its own systemd units below its cgroup: they are the container's):

   | runtime | cgroup component (examples: tests/test_units.py) | unit |
   |---|---|---|
   | docker, systemd driver | `docker-<64 hex>.scope` | `docker:<12 hex>` |
   | docker, cgroupfs driver | `<64 hex>` right under `docker` | `docker:<12 hex>` |
   | podman | `libpod-<64 hex>.scope`, `libpod-<64 hex>` | `podman:<12 hex>` |
   | containerd (CRI) | `cri-containerd-<64 hex>.scope` | `containerd:<12 hex>` |
   | nerdctl | `nerdctl-<64 hex>.scope` | `nerdctl:<12 hex>` |
   | CRI-O | `crio-<64 hex>.scope` | `cri-o:<12 hex>` |
   | kubelet, cgroupfs driver | `<64 hex>` anywhere below `kubepods` | `k8s:<12 hex>` |
   | LXC 4+, LXD, Incus | `lxc.payload.NAME` | `lxc:NAME` |
   | LXC 3 | `NAME` right under a top `lxc.payload` or `lxc` | `lxc:NAME` |

   The short id is the first 12 hex digits, as `docker ps`, `podman ps` and `nerdctl ps` show
   it (`crictl ps` shows 13; any prefix finds the container). An id must be 64 lowercase hex
   digits, so `docker-foo.scope` (a unit anyone may start with systemd-run) is a unit, not a
   container. A runtime's helper process in a scope of its own (podman's and CRI-O's conmon,
   `libpod-conmon-<id>.scope`) is not the container, and shows as that scope.
2. Else the innermost systemd service or scope: `/system.slice/nginx.service` → `nginx.service`,
   `/user.slice/user-1000.slice/session-3.scope` → `session-3.scope`, a user's own unit
   `/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service` → `foo.service` (what
   `ps -o uunit` shows; `systemctl --user` manages it). Innermost because it is the most
   specific thing that can be started, stopped and limited on its own; its slice is in the
   cgroup path.
3. Else the innermost slice (a process placed straight into one, which systemd never does).
4. Else "": the root cgroup, an unknown one (""), or a hierarchy systemd does not manage
   (`/nfacct-test`). Tables show it as "-".

Names are the path's own text, systemd's escapes included (`machine-qemu\\x2d1\\x2dvm.scope`),
and may hold any byte a cgroup name may (everything but "/", NUL and newline): a user may mkdir
what they like in a delegated subtree. The result is such a name or part of one, kept exact
('surrogateescape' str, as `text` keeps names), and escaped on every output as names are. A
path is a claim, not proof: a process in `docker-<id>.scope` may have been put there by hand.
"""

from __future__ import annotations

import functools
import re

from . import text

_HEX64 = re.compile(r"[0-9a-f]{64}")
# (prefix, runtime, suffix required): `<prefix><64 hex><suffix>` is a container of `runtime`.
_SCOPES = (
    ("docker-", "docker", ".scope"),
    ("libpod-", "podman", ".scope"),
    ("cri-containerd-", "containerd", ".scope"),
    ("nerdctl-", "nerdctl", ".scope"),
    ("crio-", "cri-o", ".scope"),
)
_UNIT_SUFFIXES = (".service", ".scope")
SHORT_ID = 12
NONE = "-"  # how tables show a cgroup with no unit


def _container(parts: list[str], i: int) -> str | None:
    """The container named by component `parts[i]` (its parents: `parts[:i]`), or None."""
    name = parts[i]
    parent = parts[i - 1] if i else ""
    for prefix, runtime, suffix in _SCOPES:
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            if rest.endswith(suffix):
                rest = rest[: -len(suffix)]
            elif runtime != "podman":  # podman's cgroupfs manager: /libpod_parent/libpod-<id>
                continue
            if _HEX64.fullmatch(rest):
                return f"{runtime}:{rest[:SHORT_ID]}"
    if _HEX64.fullmatch(name):
        if parent == "docker":
            return f"docker:{name[:SHORT_ID]}"
        if "kubepods" in parts[:i]:
            return f"k8s:{name[:SHORT_ID]}"
    if name.startswith("lxc.payload.") and len(name) > len("lxc.payload."):
        return "lxc:" + name[len("lxc.payload.") :]
    if parent in ("lxc.payload", "lxc") and i == 1:
        return "lxc:" + name
    return None


@functools.lru_cache(maxsize=4096)
def unit(cgroup: str) -> str:
    """The container or systemd unit of cgroup v2 path `cgroup` ("" if none: see the module)."""
    parts = [p for p in cgroup.split("/") if p]
    for i in range(len(parts) - 1, -1, -1):
        found = _container(parts, i)
        if found is not None:
            return found
    for suffixes in (_UNIT_SUFFIXES, (".slice",)):
        for name in reversed(parts):
            if any(name.endswith(s) and len(name) > len(s) for s in suffixes):
                return name
    return ""


def shown(cgroup: str) -> str:
    """The unit as a table shows it: "-" for none (not escaped yet)."""
    return unit(cgroup) or NONE


def nfacct_unit(cgroup: str | bytes | None) -> str | bytes | None:
    """`unit` as an SQLite function over a stored cgroup column (TEXT, or BLOB when the name is
    not UTF-8: see `text.to_sql`); answers in the same kind. The store registers it for
    `history --by unit`; `sqlite-utils query --functions 'from nfacct.units import nfacct_unit'`
    does the same for ad-hoc SQL."""
    if cgroup is None:
        return None
    return text.to_sql(unit(text.from_sql(cgroup)))
