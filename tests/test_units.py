"""The unit or container of a cgroup (`nfacct.units`): the mapping on real-world paths (pure), and
`top --by unit`, `history --by unit` and the metrics' `unit` label end to end, for processes
placed in real cgroup v2 directories and sending real traffic through a daemon in a lab namespace.
"""

from __future__ import annotations

import pytest
from conftest import PROFILE
from hypothesis import given
from hypothesis import strategies as st

from nfacct import text
from nfacct.store import Store
from nfacct.tables import COUNTER_NAMES
from nfacct.units import nfacct_unit, shown, unit

D = "3f4a6b0c9d8e7f60123456789abcdef0123456789abcdef0123456789abcdef0"  # a 64-hex container id
P = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
POD = "pod5e3f1c2a_9b8d_4e7f_a6b5_c4d3e2f1a0b9"  # kubelet's systemd driver: the pod uid's - as _

# Paths as /proc/PID/cgroup shows them ("0::" cut), from the runtimes' documentation, issue
# reports and machines: see the comment on each.
REAL = [
    # systemd (systemd-cgls on Debian 12)
    ("/system.slice/nginx.service", "nginx.service"),
    ("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service"),
    ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
    ("/user.slice/user-1000.slice/user@1000.service/init.scope", "init.scope"),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service", "foo.service"),
    (
        "/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-org.Terminal-4242.scope",
        "app-gnome-org.Terminal-4242.scope",
    ),
    ("/init.scope", "init.scope"),
    ("/system.slice/run-u42.service", "run-u42.service"),  # systemd-run
    ("/machine.slice/machine-qemu\\x2d1\\x2dvm.scope", "machine-qemu\\x2d1\\x2dvm.scope"),  # libvirt
    ("/machine.slice/systemd-nspawn@web.service/payload", "systemd-nspawn@web.service"),
    ("/user.slice", "user.slice"),  # a process straight in a slice: only by hand
    # docker: systemd cgroup driver, and cgroupfs (`docker info`: Cgroup Driver)
    (f"/system.slice/docker-{D}.scope", f"docker:{D[:12]}"),
    (f"/docker/{D}", f"docker:{D[:12]}"),
    (f"/system.slice/docker-{D}.scope/init.scope", f"docker:{D[:12]}"),  # systemd in a container
    (f"/system.slice/docker-{D}.scope/system.slice/nginx.service", f"docker:{D[:12]}"),
    ("/system.slice/docker.service", "docker.service"),  # dockerd itself
    ("/system.slice/containerd.service", "containerd.service"),
    # podman: rootful and rootless (systemd), with its `container` sub-cgroup, cgroupfs, conmon
    (f"/machine.slice/libpod-{P}.scope", f"podman:{P[:12]}"),
    (f"/machine.slice/libpod-{P}.scope/container", f"podman:{P[:12]}"),
    (
        f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{P}.scope",
        f"podman:{P[:12]}",
    ),
    (f"/libpod_parent/libpod-{P}", f"podman:{P[:12]}"),
    (f"/machine.slice/libpod-conmon-{P}.scope", f"libpod-conmon-{P}.scope"),
    # kubernetes: containerd and CRI-O with the systemd driver, then the cgroupfs driver
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{POD}.slice/cri-containerd-{D}.scope",
        f"containerd:{D[:12]}",
    ),
    (f"/kubepods.slice/kubepods-{POD}.slice/cri-containerd-{P}.scope", f"containerd:{P[:12]}"),
    (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{POD}.slice/crio-{D}.scope",
        f"cri-o:{D[:12]}",
    ),
    (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{POD}.slice/crio-conmon-{D}.scope",
        f"crio-conmon-{D}.scope",
    ),
    (f"/kubepods/burstable/pod5e3f1c2a-9b8d-4e7f-a6b5-c4d3e2f1a0b9/{D}", f"k8s:{D[:12]}"),
    (f"/kubepods/pod5e3f1c2a-9b8d-4e7f-a6b5-c4d3e2f1a0b9/{P}", f"k8s:{P[:12]}"),
    ("/kubepods.slice/kubepods-burstable.slice", "kubepods-burstable.slice"),
    (f"/system.slice/nerdctl-{D}.scope", f"nerdctl:{D[:12]}"),
    # LXC 4+ and LXD (needrestart PR #238: 0::/lxc.payload.focal/system.slice/avahi-daemon.service),
    # LXC 3.1 (lxc/lxc#2782), LXC 3 and earlier, and lxc-attach's `.lxc` (lxc/lxc#3373)
    ("/lxc.payload.focal/system.slice/avahi-daemon.service", "lxc:focal"),
    ("/lxc.payload.c1", "lxc:c1"),
    ("/lxc.payload.c1/.lxc", "lxc:c1"),
    ("/lxc.payload/c1", "lxc:c1"),
    ("/lxc/web01", "lxc:web01"),
    ("/lxc.monitor.c1", ""),  # LXC's monitor process, not the container
    # nothing systemd or a runtime names
    ("/", ""),
    ("", ""),
    ("/nfacct-queries-20073", ""),
    ("/process_api/05af0a1d023d4c0317d536b053bc52f7", ""),
]


@pytest.mark.parametrize("cgroup, expected", REAL)
def test_real_world_paths(cgroup, expected):
    assert unit(cgroup) == expected


@pytest.mark.parametrize(
    "cgroup, expected",
    [
        ("/system.slice/docker-foo.scope", "docker-foo.scope"),  # `systemd-run --scope --unit docker-foo`
        (f"/system.slice/docker-{D[:63]}.scope", f"docker-{D[:63]}.scope"),  # 63 digits
        (f"/system.slice/docker-{D.upper()}.scope", f"docker-{D.upper()}.scope"),  # runtimes write lowercase
        (f"/system.slice/docker-{D}.service", f"docker-{D}.service"),  # not the runtime's scope
        (f"/mine/{D}", ""),  # 64 hex digits under no runtime's directory
        (f"/x/docker/{D}/y", f"docker:{D[:12]}"),  # dockerd with a --cgroup-parent
        ("/a/lxc/c1", ""),  # LXC 3's directory is at the top only
        ("/lxc.payload.", ""),
        ("/system.slice/.service", "system.slice"),
        ("/system.slice//nginx.service/", "nginx.service"),  # empty components are nothing
    ],
)
def test_near_misses(cgroup, expected):
    assert unit(cgroup) == expected


def test_tables_show_none_as_a_dash():
    assert (shown("/"), shown(""), shown("/system.slice/a.service")) == ("-", "-", "a.service")


HOSTILE = b"/user.slice/\x1b[2J\xff\x07.service"


def test_hostile_bytes_are_kept_exact_for_escaping_on_output():
    cgroup = text.decode(HOSTILE)
    found = unit(cgroup)
    assert text.encode(found) == b"\x1b[2J\xff\x07.service"
    assert text.escape(found) == "\\x1b[2J\\xff\\x07.service"
    assert unit(text.decode(b"/lxc.payload.\xfe\x1b")) == text.decode(b"lxc:\xfe\x1b")


def test_the_sqlite_function_answers_in_the_kind_it_was_given():
    assert nfacct_unit("/system.slice/nginx.service") == "nginx.service"
    assert nfacct_unit(HOSTILE) == b"\x1b[2J\xff\x07.service"  # a BLOB name: a BLOB unit
    assert nfacct_unit(b"/") == "" and nfacct_unit(None) is None


@PROFILE
@given(
    st.lists(
        st.sampled_from(
            [
                "docker",
                "lxc",
                "kubepods",
                f"docker-{D}.scope",
                "a.service",
                "b.slice",
                "lxc.payload.x",
                D,
                "x.scope",
                "\udcff",
                "\x1b",
            ]
        )
        | st.text(),
        max_size=6,
    )
)
def test_any_path_maps_to_one_of_its_components_or_a_container(parts):
    path = "/" + "/".join(p.replace("/", "") for p in parts)
    found = unit(path)
    assert "/" not in found
    components = [p for p in path.split("/") if p]
    if found.startswith(("docker:", "podman:", "containerd:", "cri-o:", "k8s:", "nerdctl:")):
        _runtime, short = found.split(":")
        assert len(short) == 12 and any(short in c for c in components)
    elif found.startswith("lxc:"):
        assert any(c.endswith(found[4:]) for c in components)
    else:
        assert found == "" or found in components


def test_history_groups_by_unit_at_query_time(tmp_path):
    """Rows as the daemon writes them (a cgroup that is not UTF-8 stored as a BLOB); the unit is
    derived in the query, so rows written before nfacct knew units have one too."""
    store = Store(str(tmp_path / "n.db"))
    docker = f"/system.slice/docker-{D}.scope"
    hostile = text.decode(HOSTILE)
    rows = [
        (1, docker, 100),
        (2, docker + "/init.scope", 50),
        (3, "/system.slice/nginx.service", 10),
        (4, hostile, 7),
        (5, "/", 1),
        (6, "", 2),
    ]
    store.save_exited(
        [
            dict.fromkeys(COUNTER_NAMES, 0)
            | {"pid": pid, "btime": 1.0, "command": "c", "cmdline": "c", "uid": 0, "cgroup": cgroup}
            | {"exit_time": 2.0, "tcpsndpacks": 1, "tcpsndbytes": sent}
            for pid, cgroup, sent in rows
        ]
    )
    store.close()
    reader = Store(str(tmp_path / "n.db"), readonly=True)
    try:
        found = [(r["unit"], r["processes"], r["tcpsndbytes"]) for r in reader.history(None, None, "unit")]
    finally:
        reader.close()
    assert found == [
        (f"docker:{D[:12]}", 2, 150),
        ("nginx.service", 1, 10),
        (text.decode(b"\x1b[2J\xff\x07.service"), 1, 7),  # exact, for escaping on output
        ("", 2, 3),
    ]
