"""The scaling procedure of docs/operations.md ("Scaling from 3 to 5 pods"),
run with real nodes on loopback addresses standing in for the StatefulSet's
pods: each node is configured only by the COUNTERDB_* variables the pod
template sets, and re-reads COUNTERDB_ACTORS at every start, as a pod does.

1. ``counterdb config set`` with five entries, on one of three running nodes;
2. ``counterdb cluster-status`` until the three show the same list;
3. "kubectl apply": nodes 4 and 5 start with the five-entry variable, then
   nodes 3, 2, 1 restart with it, one at a time;
4. ``cluster-status`` exits 0, and every node has every increment.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodes import START_TIMEOUT, STOP_TIMEOUT, checkout_env, http_request, twistd_command, wait_until

from counterdb import cli

HOSTS = [f"127.0.0.{n}" for n in range(41, 46)]
CONVERGE = 20.0


class Pod:
    """One node, started from environment variables only."""

    def __init__(self, base: Path, host: str, port: int) -> None:
        self.host, self.port, self.dir = host, port, base / host
        self.dir.mkdir()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, actors: list[str]) -> None:
        env = {
            "COUNTERDB_PORT": str(self.port),
            "COUNTERDB_INTERFACE": self.host,
            "COUNTERDB_ADVERTISE": f"{self.host}:{self.port}",
            "COUNTERDB_ACTORS": ",".join(actors),
            "COUNTERDB_DATA_DIR": str(self.dir / "data"),
            "COUNTERDB_POLL_INTERVAL": "0.2",
        }
        with open(self.dir / "node.log", "ab") as log:
            self.process = subprocess.Popen(
                [*twistd_command(), "-n", "--pidfile=", "counterdb"],
                cwd=self.dir,
                env=checkout_env(**env),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(lambda: http_request(f"{self.url}/ready").status == 200, START_TIMEOUT, details=self.log)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def log(self) -> str:
        return (self.dir / "node.log").read_text(errors="replace")

    def actors(self) -> list[str]:
        return http_request(f"{self.url}/config").json()["actors"]


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[list[Pod]]:
    with socket.socket() as s:
        s.bind((HOSTS[0], 0))
        port = s.getsockname()[1]
    started = [Pod(tmp_path, host, port) for host in HOSTS]
    try:
        yield started
    finally:
        for pod in started:
            pod.stop()


def run_cli(pod: Pod, *args: str) -> int:
    return cli.main(["--url", pod.url, *args])


def test_scaling_from_three_to_five_as_documented(pods: list[Pod], capsys: pytest.CaptureFixture[str]) -> None:
    three = [f"{p.host}:{p.port}" for p in pods[:3]]
    five = [f"{p.host}:{p.port}" for p in pods]
    for pod in pods[:3]:
        pod.start(three)
    assert run_cli(pods[0], "incr", "visits", "7") == 0

    # 1. and 2.: the five-entry list, posted to one node, reaches the others.
    assert run_cli(pods[0], "config", "set", *five) == 0
    for pod in pods[:3]:
        wait_until(lambda pod=pod: pod.actors() == five, CONVERGE, message=f"{pod.host} has the 5-node list")
    assert run_cli(pods[0], "cluster-status") == 1  # the new two do not answer yet

    # 3.: the new pods, then a rolling restart of the old ones, highest first.
    for pod in pods[3:]:
        pod.start(five)
    for pod in reversed(pods[:3]):
        pod.stop()
        pod.start(five)

    # 4.: one list everywhere, every increment everywhere.
    capsys.readouterr()
    wait_until(lambda: run_cli(pods[0], "cluster-status") == 0, CONVERGE, message="cluster-status exits 0")
    assert run_cli(pods[4], "incr", "visits", "1") == 0
    for pod in pods:
        assert pod.actors() == five
        wait_until(
            lambda pod=pod: http_request(f"{pod.url}/counter/visits/value").text == "8",
            CONVERGE,
            message=f"{pod.host} counts 8",
            details=pod.log,
        )
