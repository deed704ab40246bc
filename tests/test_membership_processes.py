"""Membership with real twistd processes: a list posted to one node, a
node joining with --join, and a removal with `counterdb remove`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nodes import (
    CONVERGE,
    NODE_ARGS,
    START_TIMEOUT,
    STOP_TIMEOUT,
    checkout_env,
    http_request,
    twistd_command,
    wait_until,
)

from counterdb.localcluster import free_common_port

HOSTS = ["127.0.0.51", "127.0.0.52", "127.0.0.53"]


@contextmanager
def nodes(tmp_path: Path) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    running: dict[str, subprocess.Popen[bytes]] = {}
    try:
        yield running
    finally:
        for process in running.values():
            process.terminate()
        for process in running.values():
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start(running: dict[str, subprocess.Popen[bytes]], tmp_path: Path, host: str, port: int, *args: str) -> str:
    log = (tmp_path / f"{host}.log").open("wb")
    command = [*twistd_command(), "-n", "--pidfile=", "counterdb", "--port", str(port), "--interface", host]
    command += ["--data-dir", str(tmp_path / host), *NODE_ARGS, *args]
    running[host] = subprocess.Popen(command, cwd=tmp_path, env=checkout_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{host}:{port}"
    wait_until(lambda: http_request(f"{url}/health").status == 200, START_TIMEOUT, message=f"{host} starts")
    return url


def actors(url: str) -> list[str]:
    return http_request(f"{url}/config").json()["actors"]


def value(url: str, name: str) -> str:
    return http_request(f"{url}/counter/{name}/value").text


def test_post_to_one_join_and_remove_with_real_processes(tmp_path: Path) -> None:
    port = free_common_port(HOSTS)
    entries = [f"{host}:{port}" for host in HOSTS]
    with nodes(tmp_path) as running:
        a, b = (start(running, tmp_path, host, port) for host in HOSTS[:2])
        answer = http_request(f"{a}/config", "POST", json.dumps({"actors": entries[:2]}))
        assert answer.status == 200, answer
        wait_until(lambda: actors(b) == entries[:2], CONVERGE, message="the list reaches the other node")
        assert http_request(f"{a}/counter/visits", "POST", "5").text == "5"

        c = start(running, tmp_path, HOSTS[2], port, "--join", entries[0])
        wait_until(lambda: actors(a) == actors(b) == entries, CONVERGE, message="the joined node is listed")
        wait_until(lambda: value(c, "visits") == "5", CONVERGE, message="the joined node catches up")
        assert http_request(f"{c}/counter/visits", "POST", "2").status == 200
        assert http_request(f"{b}/counter/visits/consistent_value").text == "7"

        cli = [sys.executable, "-m", "counterdb.cli", "--url", b, "remove", entries[2]]
        removed = subprocess.run(cli, env=checkout_env(), capture_output=True, text=True, timeout=30)
        assert removed.returncode == 0, removed.stderr
        wait_until(lambda: actors(c) == [], CONVERGE, message="the removed node learns it")
        assert http_request(f"{c}/counter/visits", "POST", "1").status == 503
        for url in (a, b):
            assert http_request(f"{url}/counter/visits/consistent_value").text == "7"
