"""
The network of a netns cluster: one namespace per node, joined to a Linux
bridge in the root namespace by a veth pair, on a private subnet chosen so
that it overlaps nothing on this machine; and the faults, as iptables
``DROP`` rules inside the namespaces (partitions and packet loss). Needs
root, ``ip`` (iproute2) and, for faults, ``iptables``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from counterdb.localcluster.state import ClusterError, ClusterState, Faults, locked_file, wait_for

log = logging.getLogger(__name__)

DEFAULT_NETNS_PORT = 8080
#: Subnets tried, in order, when a netns cluster is not given one.
DEFAULT_SUBNETS = tuple(f"10.213.{i}.0/24" for i in range(256))
#: The interface name of the veth end inside each namespace.
NS_IFACE = "eth0"
COMMAND_TIMEOUT = 30.0
_PACKAGES = {"ip": "iproute2"}


# -- tools ---------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """``name`` on PATH or in the sbin directories (not always on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def tool(name: str) -> str:
    """Like :func:`find_tool`, but says what to install when it is missing."""
    found = find_tool(name)
    if found is None:
        package = _PACKAGES.get(name, "iptables")
        raise ClusterError(f"`{name}` is not installed (package {package}); netns clusters and their faults need it")
    return found


def require_netns_tools() -> None:
    if os.geteuid() != 0:
        raise ClusterError("netns mode needs root (it creates network namespaces, veth pairs and a bridge)")
    tool("ip")


def run(command: list[str], input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with a deadline; with ``check``, fail on a non-zero exit."""
    try:
        result = subprocess.run(
            command,
            input=input,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            stdin=None if input else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`{' '.join(command)}` did not finish within {COMMAND_TIMEOUT:g} s") from None
    if check and result.returncode != 0:
        raise ClusterError(f"`{' '.join(command)}` failed (exit {result.returncode}): {result.stderr.strip()}")
    return result


def in_netns(netns: str | None, command: list[str]) -> list[str]:
    """``command``, run inside ``netns`` when there is one."""
    return command if netns is None else [tool("ip"), "netns", "exec", netns, *command]


# -- what exists -------------------------------------------------------------------


def netns_names() -> set[str]:
    ip = find_tool("ip")
    if ip is None:
        return set()
    out = run([ip, "netns", "list"], check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def link_names() -> set[str]:
    ip = find_tool("ip")
    if ip is None:
        return set()
    names = set()
    for line in run([ip, "-o", "link", "show"], check=False).stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.add(parts[1].strip().split("@")[0])
    return names


def new_id() -> str:
    """A 6-hex-digit id no namespace or link on this machine uses yet."""
    for _ in range(20):
        candidate = secrets.token_hex(3)
        if not any(candidate in name for name in netns_names() | link_names()):
            return candidate
    raise ClusterError("could not find an unused cluster id")


def _used_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    ip = tool("ip")
    used = []
    for line in run([ip, "-o", "-4", "addr", "show"]).stdout.splitlines():
        match = re.search(r"\binet (\S+)", line)
        if match:
            used.append(ipaddress.ip_interface(match.group(1)).network)
    route_types = ("broadcast", "local", "unreachable", "blackhole", "prohibit", "throw", "multicast")
    for line in run([ip, "-4", "route", "show", "table", "all"], check=False).stdout.splitlines():
        words = line.split()
        first = words[1] if len(words) > 1 and words[0] in route_types else (words[0] if words else "")
        with contextlib.suppress(ValueError):
            if first and first != "default":
                used.append(ipaddress.ip_network(first, strict=False))
    return used


def choose_subnet(wanted: str | None, size: int) -> ipaddress.IPv4Network:
    """``wanted``, checked; or the first default subnet in use nowhere here."""
    candidates = [wanted] if wanted is not None else list(DEFAULT_SUBNETS)
    used = _used_networks()
    for text in candidates:
        try:
            subnet = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            raise ClusterError(f"subnet {text!r}: {e}") from None
        if not isinstance(subnet, ipaddress.IPv4Network) or not subnet.is_private:
            raise ClusterError(f"subnet {text}: use a private IPv4 subnet such as 10.213.0.0/24")
        if subnet.num_addresses - 2 < size + 1:
            raise ClusterError(f"subnet {text} is too small for a bridge and {size} nodes")
        clash = [str(n) for n in used if n.overlaps(subnet)]
        if not clash:
            return subnet
        if wanted is not None:
            raise ClusterError(f"subnet {text} overlaps networks already in use on this machine: {clash}")
    raise ClusterError("every subnet 10.213.N.0/24 is in use; pass a free private subnet")


@contextlib.contextmanager
def _global_lock() -> Iterator[None]:
    """Serialises subnet choice between clusters on this machine."""
    directory = Path("/run/lock") if os.access("/run/lock", os.W_OK) else Path(tempfile.gettempdir())
    with locked_file(directory / "counterdb-cluster-netns.lock"):
        yield


def _bridge_netfilter() -> bool:
    try:
        return Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip() == "1"
    except OSError:
        return False


# -- creating and deleting ----------------------------------------------------------


def create_network(state: ClusterState, wanted_subnet: str | None, save: Callable[[], None]) -> None:
    """Choose the subnet and addresses, then make the bridge, namespaces and
    veth pairs ``state`` names. ``save()`` records progress in cluster.json,
    so a later ``down`` can delete what was made even if this fails midway."""
    ip = tool("ip")
    with _global_lock():
        subnet = choose_subnet(wanted_subnet, len(state.nodes))
        hosts = list(itertools.islice(subnet.hosts(), len(state.nodes) + 1))
        state.subnet = str(subnet)
        state.bridge_address = str(hosts[0])
        for node, address in zip(state.nodes, hosts[1:]):
            node.address = str(address)
        save()
        bridge = _bridge_name(state)
        run([ip, "link", "add", bridge, "type", "bridge"])
        run([ip, "addr", "add", f"{state.bridge_address}/{subnet.prefixlen}", "dev", bridge])
        run([ip, "link", "set", bridge, "up"])
    # With br_netfilter, bridged packets go through the root namespace's
    # FORWARD chain, whose policy may be DROP (Docker).
    if _bridge_netfilter() and find_tool("iptables") is not None:
        run([tool("iptables"), "-I", "FORWARD", *_forward_rule(bridge)])
        state.forward_rule = True
        save()
    for node in state.nodes:
        assert node.netns is not None and node.veth is not None
        _create_namespace(ip, node.netns, node.veth, bridge, f"{node.address}/{subnet.prefixlen}")
    log.info("network %s: bridge %s (%s), %d namespaces", state.subnet, bridge, state.bridge_address, len(state.nodes))


def _create_namespace(ip: str, ns: str, veth: str, bridge: str, address: str) -> None:
    run([ip, "netns", "add", ns])
    run([ip, "link", "add", veth, "type", "veth", "peer", "name", NS_IFACE, "netns", ns])
    run([ip, "link", "set", veth, "master", bridge])
    run([ip, "link", "set", veth, "up"])
    run([ip, "-n", ns, "link", "set", "lo", "up"])
    run([ip, "-n", ns, "addr", "add", address, "dev", NS_IFACE])
    run([ip, "-n", ns, "link", "set", NS_IFACE, "up"])


def delete_network(state: ClusterState) -> list[str]:
    """Delete every namespace, link and rule of the cluster that still
    exists, killing whatever still runs in its namespaces; return what
    could not be deleted."""
    ip = find_tool("ip")
    if ip is None:
        return ["`ip` (iproute2) is not installed: cannot delete namespaces and links"]
    problems: list[str] = []
    namespaces, links = netns_names(), link_names()
    for node in state.nodes:
        if node.netns in namespaces:
            _kill_inside(ip, node.netns)
        if node.veth in links:
            problems += _delete(ip, ["link", "del", node.veth], lambda n=node.veth: n in link_names())
        if node.netns in namespaces:
            problems += _delete(ip, ["netns", "del", node.netns], lambda n=node.netns: n in netns_names())
    if state.forward_rule:
        _delete_forward_rule(_bridge_name(state))
        state.forward_rule = False
    if state.bridge in links:
        problems += _delete(ip, ["link", "del", state.bridge], lambda: state.bridge in link_names())
    mine = {node.veth for node in state.nodes} | {state.bridge}
    if not wait_for(lambda: not (mine & link_names()), 5.0):
        problems.append(f"links still present: {sorted(str(name) for name in mine & link_names())}")
    return problems


def _kill_inside(ip: str, netns: str) -> None:
    """SIGKILL every process in ``netns`` (anything there is ours)."""
    for pid in run([ip, "netns", "pids", netns], check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _delete(ip: str, args: list[str], still_there: Callable[[], bool]) -> list[str]:
    result = run([ip, *args], check=False)
    if result.returncode != 0 and still_there():
        return [f"ip {' '.join(args)}: {result.stderr.strip()}"]
    return []


def _bridge_name(state: ClusterState) -> str:
    assert state.bridge is not None
    return state.bridge


def _forward_rule(bridge: str) -> list[str]:
    return ["-i", bridge, "-o", bridge, "-j", "ACCEPT"]


def _delete_forward_rule(bridge: str) -> None:
    iptables = find_tool("iptables")
    if iptables is None:
        return
    rule = ["FORWARD", *_forward_rule(bridge)]
    for _ in range(10):  # every copy, in case it was added twice
        if run([iptables, "-C", *rule], check=False).returncode != 0:
            break
        run([iptables, "-D", *rule], check=False)


# -- faults ---------------------------------------------------------------------------


def apply_firewall(state: ClusterState, faults: Faults) -> None:
    """Make every namespace's INPUT chain drop what ``faults`` blocks or
    loses (whole tables replaced: idempotent)."""
    restore = find_tool("iptables-restore")
    if restore is None:
        if faults.blocked or faults.loss:
            tool("iptables-restore")  # raises: says what to install
        return  # no iptables, and nothing to drop: nothing to undo either
    for node in state.nodes:
        run([tool("ip"), "netns", "exec", str(node.netns), restore], input=firewall_table(state, faults, node.name))


def firewall_table(state: ClusterState, faults: Faults, name: str) -> str:
    """The ``iptables-restore`` input for node ``name``'s namespace."""
    address = {node.name: node.address for node in state.nodes}
    rules = [f"-A INPUT -s {address[src]}/32 -j DROP" for src, dst in faults.blocked if dst == name]
    if name in faults.loss:
        probability = f"{faults.loss[name]:.6f}"
        rules.append(f"-A INPUT -i {NS_IFACE} -m statistic --mode random --probability {probability} -j DROP")
    return "\n".join(
        ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", *rules, "COMMIT", ""]
    )
