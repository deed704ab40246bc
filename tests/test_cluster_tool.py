"""
The local cluster tool: :class:`counterdb.localcluster.LocalCluster` and the
``counterdb-cluster`` command line, on real twistd nodes.

Loopback tests run anywhere. The netns tests need root, ``ip`` (iproute2)
and ``iptables``, as CI has (``.ci/run`` installs them); without them they
FAIL with a message saying what is missing. They are never skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from counterdb.localcluster import PACKAGE_PARENT, ClusterError, LocalCluster, free_common_port
from counterdb.localcluster.processes import PROXY, node_command, node_env
from counterdb.localcluster.proxy import HIGH_WATER, DelayedPipe, write_delay
from counterdb.localcluster.state import LOOPBACK, ClusterState, NodeRecord

#: Fast sync so partitions heal within a second or two.
NODE_ARGS = ["--poll-interval", "0.2", "--peer-timeout", "1", "--backoff-max", "0.5"]
CONVERGE = 15.0


# -- helpers ---------------------------------------------------------------------


def http(url: str, method: str = "GET", body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes, float]:
    """(status, body, seconds taken); network failures raise OSError."""
    request = urllib.request.Request(url, data=body, method=method)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read(), time.monotonic() - started
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read(), time.monotonic() - started


def increment(cluster: LocalCluster, node: str, name: str, amount: int) -> int:
    status, body, _ = http(f"{cluster.url(node)}/counter/{name}", "POST", str(amount).encode())
    assert status == 200, f"increment {name} on {node}: {status} {body!r}\n{cluster.log_tail(node)}"
    return int(body)


def value(cluster: LocalCluster, node: str, name: str, timeout: float = 5.0) -> int:
    status, body, _ = http(f"{cluster.url(node)}/counter/{name}/value", timeout=timeout)
    assert status == 200, f"value of {name} on {node}: {status} {body!r}"
    return int(body)


def wait_until(predicate: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what()}")
        time.sleep(0.05)  # poll interval until the deadline


def wait_values(cluster: LocalCluster, nodes: list[str], name: str, expected: int, timeout: float = CONVERGE) -> None:
    def seen() -> str:
        values = {}
        for node in nodes:
            try:
                values[node] = value(cluster, node, name, timeout=1.0)
            except OSError as e:
                values[node] = repr(e)
        logs = "\n".join(cluster.log_tail(node, 15) for node in nodes)
        return f"{name} == {expected} on {nodes}; now {values}\n{logs}"

    wait_until(lambda: all(value(cluster, n, name, timeout=1.0) == expected for n in nodes), timeout, seen)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def pid_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


# -- loopback, Python API ----------------------------------------------------------


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("loop"), size=3, node_args=NODE_ARGS) as cluster:
        yield cluster


def test_loopback_up_status_and_convergence(loop: LocalCluster) -> None:
    assert loop.nodes == ["n1", "n2", "n3"]
    assert [loop.address(n) for n in loop.nodes] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert loop.actors == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    statuses = loop.status()
    assert [s.state for s in statuses] == ["running"] * 3, statuses
    assert len({s.replica for s in statuses}) == 3 and None not in {s.replica for s in statuses}, statuses
    assert all(s.url == f"http://{s.address}:{loop.port}" for s in statuses)
    assert json.loads((loop.base_dir / "cluster.json").read_text())["mode"] == "loopback"

    increment(loop, "n1", "conv", 2)
    increment(loop, "n2", "conv", 3)
    increment(loop, "n3", "conv", 4)
    wait_values(loop, loop.nodes, "conv", 9)


def test_loopback_kill_and_start_keep_data(loop: LocalCluster) -> None:
    replica = {s.name: s.replica for s in loop.status()}["n2"]
    increment(loop, "n2", "kept", 7)
    wait_values(loop, ["n1", "n3"], "kept", 7)

    assert loop.pid("n2") == {s.name: s.pid for s in loop.status()}["n2"] is not None
    with pytest.raises(ClusterError, match="stop it before changing its interpreter"):
        loop.set_python("n2", sys.executable)
    loop.kill("n2")
    n2 = {s.name: s for s in loop.status()}["n2"]
    assert (n2.state, n2.pid, n2.replica, loop.pid("n2")) == ("stopped", None, None, None)
    with pytest.raises(OSError):
        http(loop.url("n2") + "/config", timeout=1.0)
    with pytest.raises(ClusterError, match="not running"):
        loop.kill("n2")
    increment(loop, "n1", "kept", 1)  # while n2 is down

    loop.start("127.0.0.3")  # by address
    n2 = {s.name: s for s in loop.status()}["n2"]
    assert (n2.state, n2.replica) == ("running", replica)
    with pytest.raises(ClusterError, match="already running"):
        loop.start("n2")
    wait_values(loop, loop.nodes, "kept", 8)


def test_a_node_with_its_own_python_runs_only_what_that_python_has_installed() -> None:
    """The upgrade test's hook: a node of an earlier release, in a venv, must
    not get this checkout on its PYTHONPATH; the others must."""
    ours = NodeRecord("n1", "127.0.0.2", "/w1")
    venv = NodeRecord("n2", "127.0.0.3", "/w2", python="/prev/bin/python")
    state = ClusterState(LOOPBACK, "abc123", 18080, 18080, [], [ours, venv])
    assert node_command(state, ours)[:2] == [sys.executable, "-c"]
    assert node_command(state, venv)[:2] == ["/prev/bin/python", "-c"]
    assert node_command(state, venv)[-2:] == ["--data-dir", "/w2/data"]
    assert node_env(None)["PYTHONPATH"].split(os.pathsep)[0] == str(PACKAGE_PARENT)
    assert "PYTHONPATH" not in node_env("/prev/bin/python")
    assert ClusterState.from_json(state.to_json()).nodes[1].python == "/prev/bin/python"


def test_loopback_pause_and_resume(loop: LocalCluster) -> None:
    loop.pause("n3")
    try:
        assert {s.name: s.state for s in loop.status()}["n3"] == "paused"
        with pytest.raises(OSError):
            http(loop.url("n3") + "/config", timeout=0.5)
        increment(loop, "n1", "paused", 4)
        wait_values(loop, ["n2"], "paused", 4)
    finally:
        loop.resume("n3")
    assert {s.name: s.state for s in loop.status()}["n3"] == "running"
    wait_values(loop, ["n3"], "paused", 4)


def test_loopback_refuses_netns_faults_and_unknown_nodes(loop: LocalCluster) -> None:
    for fault in (
        lambda: loop.partition([["n1"], ["n2", "n3"]]),
        lambda: loop.partition_oneway("n1", "n2"),
        lambda: loop.slow("n1", 0.1),
        lambda: loop.flaky("n1", 0.1),
        loop.heal,
    ):
        with pytest.raises(ClusterError, match="needs a netns cluster"):
            fault()
    with pytest.raises(ClusterError, match="unknown node 'n7'"):
        loop.kill("n7")
    other = LocalCluster.load(loop.base_dir)  # what a second process sees
    assert [s.name for s in other.status()] == loop.nodes
    with pytest.raises(ClusterError, match="already has a cluster"):
        LocalCluster(loop.base_dir, size=1).up()


# -- loopback, command line ----------------------------------------------------------


def cli(directory: Path, *args: str, expect: int = 0) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE_PARENT)
    result = subprocess.run(
        [sys.executable, "-m", "counterdb.localcluster", "--dir", str(directory), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == expect, (
        f"counterdb-cluster {' '.join(args)}: exit {result.returncode}, expected {expect}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}"
    )
    return result.stdout + result.stderr


def test_cli_end_to_end(tmp_path: Path) -> None:
    directory = tmp_path / "cli-cluster"
    try:
        out = cli(directory, "up", "-n", "3", "--node-args", " ".join(NODE_ARGS))
        lines = out.split("\n")
        assert [line.split()[0] for line in lines if line] == ["n1", "n2", "n3"], out
        assert lines[0].startswith("n1 http://127.0.0.2:"), out

        status = cli(directory, "status")
        rows = [line.split() for line in status.splitlines()[1:]]
        assert [(r[0], r[1]) for r in rows] == [("n1", "running"), ("n2", "running"), ("n3", "running")], status
        pids = [int(r[2].removeprefix("pid=")) for r in rows]

        assert "n2 killed" in cli(directory, "kill", "n2")
        assert "n2 stopped" in " ".join(cli(directory, "status").split()), cli(directory, "status")
        assert "n2 started" in cli(directory, "start", "n2")
        status = cli(directory, "status")
        assert [line.split()[1] for line in status.splitlines()[1:]] == ["running"] * 3, status
        pids.append(int(status.splitlines()[2].split()[2].removeprefix("pid=")))

        assert "unknown node 'n9'" in cli(directory, "kill", "n9", expect=1)
        assert "needs a netns cluster" in cli(directory, "partition", "n1", "n2,n3", expect=1)
        assert "needs a netns cluster" in cli(directory, "slow", "n1", "200ms", expect=1)
        assert "already has a cluster" in cli(directory, "up", expect=1)
        assert "is down" in cli(directory, "down")
    finally:
        if (directory / "cluster.json").exists():
            LocalCluster.load(directory).down()

    assert "no cluster" in cli(directory, "status", expect=1)
    cli(directory, "down")  # again: nothing to do, not an error
    wait_until(lambda: all(pid_gone(pid) for pid in pids), 5.0, lambda: f"pids {pids} to be gone")
    assert processes_mentioning(str(directory)) == []
    assert (directory / "n1" / "node.log").exists()


def test_cli_without_cluster_fails_clearly(tmp_path: Path) -> None:
    for command in (["status"], ["kill", "n1"], ["heal"]):
        assert "no cluster in" in cli(tmp_path / "nothing", *command, expect=1)


# -- the delaying proxy ----------------------------------------------------------------


def pipe(delay: list[float]) -> tuple[Clock, StringTransport, StringTransport, DelayedPipe]:
    """A pipe from ``source`` to ``sink`` on a fake clock, its delay ``delay[0]``."""
    clock, source, sink = Clock(), StringTransport(), StringTransport()
    piped = DelayedPipe(clock, lambda: delay[0], source=source, sink=sink)
    sink.registerProducer(piped, True)
    piped.start()
    return clock, source, sink, piped


def test_proxy_pipe_writes_each_chunk_after_its_delay_in_order() -> None:
    delay = [0.3]
    clock, _, sink, piped = pipe(delay)
    piped.put(b"a")
    clock.advance(0.1)
    delay[0] = 0.1  # a shorter delay: "b" is due at 0.2, but must not overtake "a"
    piped.put(b"b")
    clock.advance(0.19)
    assert sink.value() == b""
    clock.advance(0.01)
    assert sink.value() == b"ab"
    delay[0] = 0.0
    piped.put(b"c")
    clock.advance(0)
    assert sink.value() == b"abc"
    piped.close()
    clock.advance(0)
    assert sink.disconnecting


def test_proxy_pipe_pauses_its_source_while_the_sink_is_full() -> None:
    clock, source, sink, piped = pipe([0.1])
    piped.put(b"x")
    piped.pauseProducing()  # what the sink does when its buffer is full
    assert source.producerState == "paused"
    clock.advance(1.0)
    assert sink.value() == b""  # nothing written to a paused sink
    piped.resumeProducing()
    assert source.producerState == "producing"
    clock.advance(0)
    assert sink.value() == b"x"


def test_proxy_pipe_bounds_what_it_holds() -> None:
    clock, source, sink, piped = pipe([1.0])
    for _ in range(HIGH_WATER // 1024):
        piped.put(b"y" * 1024)
    assert source.producerState == "paused"  # HIGH_WATER bytes wait: stop reading
    clock.advance(1.0)
    assert len(sink.value()) == HIGH_WATER
    assert source.producerState == "producing"


def test_proxy_process_applies_its_delay_file_and_stops_a_sender_whose_peer_does_not_read(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as target:
        port = free_common_port(["127.0.0.1"], 21000)
        delay = tmp_path / "delay"
        write_delay(delay, 0.0)
        command = [*PROXY, "--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{target.getsockname()[1]}"]
        env = dict(os.environ, PYTHONPATH=str(PACKAGE_PARENT))
        proxy = subprocess.Popen([*command, "--delay-file", str(delay)], env=env, stdout=subprocess.DEVNULL)
        try:
            wait_until(lambda: socket.create_connection(("127.0.0.1", port), 1).close() is None, 15.0, lambda: "proxy")
            target.accept()[0].close()  # the probe's connection
            with socket.create_connection(("127.0.0.1", port), 5) as client:
                server, _ = target.accept()
                with server:
                    write_delay(delay, 0.3)  # applies to open connections
                    started = time.monotonic()
                    client.sendall(b"ping")
                    assert server.recv(4) == b"ping"
                    assert time.monotonic() - started >= 0.3
                    write_delay(delay, 0.0)
                    sent = flood(client, 64 * 1024 * 1024, 3.0)  # the server reads nothing
                    assert sent < 16 * 1024 * 1024, f"{sent} bytes accepted for a peer that reads nothing"
                    rss = proc_kb(proxy.pid, "VmRSS")
                    assert rss < 100 * 1024, f"the proxy holds {rss} kB"
        finally:
            proxy.terminate()
            proxy.wait(10)


def flood(sock: socket.socket, total: int, seconds: float) -> int:
    """Bytes of ``total`` that ``sock`` could send within ``seconds``."""
    sock.settimeout(0.2)
    chunk, sent = b"z" * 65536, 0
    deadline = time.monotonic() + seconds
    while sent < total and time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
        except TimeoutError:
            pass
    return sent


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


# -- network namespaces ----------------------------------------------------------------


def _find_tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (f"{d}/{name}" for d in ("/usr/sbin", "/sbin") if os.access(f"{d}/{name}", os.X_OK)), None
    )


def netns_problems() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append(f"not running as root (euid {os.geteuid()})")
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables"), ("iptables-restore", "iptables")):
        if _find_tool(tool) is None:
            problems.append(f"`{tool}` not found (install {package})")
    return problems


def need_netns(cluster: LocalCluster | None) -> LocalCluster:
    """Fail (never skip) when the machine cannot run netns clusters."""
    problems = netns_problems()
    if problems or cluster is None:
        pytest.fail(
            "the netns cluster tests need root, iproute2 and iptables (CI runs .ci/run as root, which "
            "installs them): " + "; ".join(problems or ["the netns cluster did not come up"]),
            pytrace=False,
        )
    return cluster


@pytest.fixture(scope="module")
def netns_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster | None]:
    if netns_problems():
        yield None  # each test fails with the reason
        return
    with LocalCluster(tmp_path_factory.mktemp("netns"), size=3, netns=True, node_args=NODE_ARGS) as cluster:
        yield cluster


def ip_names() -> str:
    """Everything `ip netns list` and `ip link` show."""
    ip = _find_tool("ip")
    assert ip is not None
    return (
        subprocess.run([ip, "netns", "list"], capture_output=True, text=True).stdout
        + subprocess.run([ip, "-o", "link", "show"], capture_output=True, text=True).stdout
    )


def test_netns_partition_and_heal(netns_cluster: LocalCluster | None) -> None:
    c = need_netns(netns_cluster)
    assert c.actors == [f"{c.address(n)}:8080" for n in c.nodes]
    assert all(s.state == "running" and s.netns for s in c.status())
    c.partition([["n1"], ["n2", "n3"]])
    try:
        increment(c, "n1", "part-x", 5)  # the test client still reaches n1
        increment(c, "n2", "part-y", 3)
        wait_values(c, ["n3"], "part-y", 3)  # n2 <-> n3 still sync
        deadline = time.monotonic() + 1.5  # 7 poll intervals
        while time.monotonic() < deadline:
            assert (value(c, "n2", "part-x"), value(c, "n3", "part-x")) == (0, 0), "the partition leaked n1 -> n2/n3"
            assert value(c, "n1", "part-y") == 0, "the partition leaked n2 -> n1"
            time.sleep(0.1)  # re-check until the deadline: the partition must hold throughout
        assert c.faults.blocked == (("n1", "n2"), ("n1", "n3"), ("n2", "n1"), ("n3", "n1"))
    finally:
        c.heal()
    assert not c.faults
    wait_values(c, c.nodes, "part-x", 5)
    wait_values(c, c.nodes, "part-y", 3)


def test_netns_oneway_partition(netns_cluster: LocalCluster | None) -> None:
    c = need_netns(netns_cluster)
    c.partition_oneway("n1", "n3")
    try:
        increment(c, "n1", "oneway", 2)
        wait_values(c, ["n2"], "oneway", 2)  # n1 -> n2 is fine
        # n3 may still learn it through n2: the fault is per link, not a wall.
    finally:
        c.heal()
    wait_values(c, c.nodes, "oneway", 2)


def test_netns_slow(netns_cluster: LocalCluster | None) -> None:
    c = need_netns(netns_cluster)
    c.slow("n2", 0.3)
    try:
        status, _, elapsed = http(c.url("n2") + "/config")
        assert status == 200 and elapsed >= 0.3, f"GET /config on a 0.3 s slow n2 took {elapsed:.3f} s"
        status, _, fast = http(c.url("n1") + "/config")
        assert status == 200 and fast < 0.3, f"GET /config on n1 took {fast:.3f} s"
        increment(c, "n1", "slow", 1)  # peers still sync through the slow proxy
        wait_values(c, c.nodes, "slow", 1)
    finally:
        c.heal()
    status, _, elapsed = http(c.url("n2") + "/config")
    assert status == 200 and elapsed < 0.3, f"after heal, GET /config on n2 took {elapsed:.3f} s"


def test_netns_flaky(netns_cluster: LocalCluster | None) -> None:
    c = need_netns(netns_cluster)
    c.flaky("n3", 0.2)
    try:
        answered = 0
        for _ in range(10):
            try:
                answered += http(c.url("n3") + "/config", timeout=4.0)[0] == 200
            except OSError:
                pass
        assert answered >= 7, f"only {answered}/10 requests to n3 with 20% loss were answered"
        iptables = _find_tool("iptables")
        assert iptables is not None
        rules = subprocess.run(
            [_find_tool("ip") or "ip", "netns", "exec", c.namespace("n3"), iptables, "-L", "INPUT", "-v", "-n", "-x"],
            capture_output=True,
            text=True,
        ).stdout
        dropped = [line.split() for line in rules.splitlines() if "statistic" in line]
        assert dropped and int(dropped[0][0]) > 0, f"the loss rule dropped nothing:\n{rules}"
    finally:
        c.heal()


def test_netns_second_cluster_and_down_removes_everything(netns_cluster: LocalCluster | None, tmp_path: Path) -> None:
    first = need_netns(netns_cluster)
    second = LocalCluster(tmp_path / "second", size=2, netns=True, node_args=NODE_ARGS)
    second.up()
    try:
        assert second.id != first.id and second.subnet != first.subnet
        state = json.loads((second.base_dir / "cluster.json").read_text())
        names = [n["netns"] for n in state["nodes"]] + [n["veth"] for n in state["nodes"]] + [state["bridge"]]
        assert all(len(n["veth"]) <= 15 for n in state["nodes"]) and len(state["bridge"]) <= 15
        shown = ip_names()
        assert all(name in shown for name in names), (names, shown)
        pids = [s.pid for s in second.status()] + [n["proxy_pid"] for n in state["nodes"]]
        increment(second, "n1", "second", 1)
        wait_values(second, second.nodes, "second", 1)
        assert value(first, "n1", "second") == 0  # separate clusters
    finally:
        second.down()
    second.down()  # idempotent
    shown = ip_names()
    assert second.id not in shown and not any(name in shown for name in names), shown
    forward = [_find_tool("iptables") or "iptables", "-S", "FORWARD"]
    assert state["bridge"] not in subprocess.run(forward, capture_output=True, text=True).stdout
    wait_until(lambda: all(pid_gone(pid) for pid in pids), 5.0, lambda: f"pids {pids} to be gone")
    assert not (second.base_dir / "cluster.json").exists()
    assert value(first, "n2", "part-x") >= 0  # the first cluster is untouched


def test_netns_failed_up_removes_everything(tmp_path: Path) -> None:
    if netns_problems():
        need_netns(None)
    cluster = LocalCluster(tmp_path / "broken", size=2, netns=True, node_args=["--no-such-flag"])
    with pytest.raises(ClusterError, match="exited while starting"):
        cluster.up()
    assert cluster.id and cluster.id not in ip_names()
    assert processes_mentioning(str(tmp_path / "broken")) == []
    assert not (tmp_path / "broken" / "cluster.json").exists()
