#!/usr/bin/env python3
"""
Benchmark real counterdb nodes on loopback and print the figures.

Not a test: it starts ``twistd counterdb`` subprocesses from this checkout
(PYTHONPATH = the repository root), measures, prints a table and stops every
process it started (SIGTERM, then SIGKILL), also on Ctrl-C or SIGTERM.

Measured:

1. increments/s and latency p50/p99 on one unconfigured node (a one-node
   cluster) with 1, 8 and 32 concurrent keep-alive clients;
2. ack-to-peer convergence in a 3-node cluster on 127.0.0.2-4 with the
   default 1 s poll interval: POST an increment on A, note when the 200
   arrives, poll GET /counter/<name>/value on B and C until they show it;
3. increments/s on node A of a 3-node cluster while it pushes to B and C,
   and how many push requests (POST /sync) a burst of 10,000 increments
   caused. The access log omits /sync, so pushes are counted from the
   peers' change versions instead (GET /sync): a node's version grows by
   one per merge that raised a counter, so with one counter incremented on
   A only and the burst cluster's polls set to once an hour, each peer's
   version grows by exactly one per push it received (checked against an
   strace count of "POST /sync" reads; see docs/benchmarks.md).

Usage::

    python benchmarks/bench_cluster.py            # full run, about 1-2 minutes
    python benchmarks/bench_cluster.py --quick    # about 20 s

The load generator is ``wrk`` when installed (``--loadgen auto``), else a
separate Python process driving keep-alive HTTP/1.1 connections with asyncio
(``--loadgen python``); ``--loadgen both`` runs the single-node figures with
each. Fixed-size bursts always use the Python generator (wrk runs for a
duration, not a request count).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: Where the nodes import counterdb from (PYTHONPATH); --code changes it.
CODE = REPO
#: Extra counterdb options for every node (--durability).
NODE_ARGS: list[str] = []

#: Runs twistd in this interpreter. (``python -m twisted`` is ``twist``, which
#: takes no -n/--pidfile; twisted.scripts.twistd has no __main__ block.)
TWISTD = "from twisted.scripts.twistd import run; run()"

SINGLE_HOST = "127.0.0.2"
CLUSTER_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
MAX_NODES_AT_ONCE = 3
START_DEADLINE = 30.0  # seconds for a node to answer HTTP
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
CONVERGENCE_DEADLINE = 5.0  # per sample; longer than the 1 s poll interval
BURST = 10_000

for _host in (SINGLE_HOST, *CLUSTER_HOSTS):
    assert ipaddress.ip_address(_host) in ipaddress.ip_network("127.0.0.0/8"), _host


# ---------------------------------------------------------------------------
# A small keep-alive HTTP/1.1 client (used by the load generator and the
# orchestration): one request in flight per connection, Content-Length or
# chunked answers.
# ---------------------------------------------------------------------------


class HTTPError(Exception):
    pass


class _ClientProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None or self.waiter.done():
            return
        parsed = _parse_response(self.buf)
        if parsed is not None:
            status, body, used = parsed
            del self.buf[:used]
            self.waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HTTPError(f"connection closed: {exc}"))


def _parse_response(buf: bytearray) -> tuple[int, bytes, int] | None:
    """(status, body, bytes used) if ``buf`` holds a whole response."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).split(b"\r\n")
    status = int(head[0].split(b" ", 2)[1])
    headers = {}
    for line in head[1:]:
        key, _, val = line.partition(b":")
        headers[key.strip().lower()] = val.strip()
    pos = end + 4
    if b"content-length" in headers:
        size = int(headers[b"content-length"])
        if len(buf) < pos + size:
            return None
        return status, bytes(buf[pos : pos + size]), pos + size
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = bytearray()
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
            start = line_end + 2
            if size == 0:
                trailer_end = buf.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    return None
                return status, bytes(body), trailer_end + 4
            if len(buf) < start + size + 2:
                return None
            body += buf[start : start + size]
            pos = start + size + 2
    raise HTTPError("response without Content-Length or chunked encoding is not supported")


class HTTPConnection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.proto: _ClientProtocol | None = None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, self.proto = await loop.create_connection(_ClientProtocol, self.host, self.port)

    async def request(self, method: str, path: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
        if self.proto is None or self.proto.closed:
            await self.connect()
        return await self.send_raw(_request_bytes(method, path, body, self.host, self.port), timeout)

    async def send_raw(self, data: bytes, timeout: float | None = None) -> tuple[int, bytes]:
        proto = self.proto
        assert proto is not None and proto.transport is not None
        proto.waiter = asyncio.get_running_loop().create_future()
        proto.transport.write(data)
        if timeout is None:
            return await proto.waiter
        return await asyncio.wait_for(proto.waiter, timeout)

    def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()


def _request_bytes(method: str, path: str, body: bytes, host: str, port: int) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
        + ("Content-Type: application/json\r\n" if body else "")
        + "\r\n"
    ).encode("ascii") + body


async def http_once(host: str, port: int, method: str, path: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
    conn = HTTPConnection(host, port)
    try:
        return await conn.request(method, path, body, timeout)
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# Load generator (runs in its own process: ``--_loadgen JSON``)
# ---------------------------------------------------------------------------


async def _loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    host, port, path = spec["host"], spec["port"], spec["path"]
    clients, duration, max_requests, warmup = spec["clients"], spec["duration"], spec["max_requests"], spec["warmup"]
    payload = _request_bytes("POST", path, b"", host, port)
    conns = [HTTPConnection(host, port) for _ in range(clients)]
    await asyncio.gather(*(c.connect() for c in conns))

    clock = time.perf_counter
    state = {"issued": 0, "measuring": False}
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def client(conn: HTTPConnection, stop_at: float, limit: int | None) -> None:
        while clock() < stop_at and (limit is None or state["issued"] < limit):
            state["issued"] += 1
            t0 = clock()
            try:
                status, _ = await conn.send_raw(payload)
            except Exception as e:  # noqa: BLE001 - counted and reported
                key = type(e).__name__
                errors[key] = errors.get(key, 0) + 1
                return
            if status != 200:
                errors[str(status)] = errors.get(str(status), 0) + 1
            elif state["measuring"]:
                latencies.append(clock() - t0)

    # A watchdog bounds each phase even if the node stops answering.
    if warmup > 0:
        await asyncio.wait_for(asyncio.gather(*(client(c, clock() + warmup, None) for c in conns)), warmup + 30)
    state["issued"] = 0
    state["measuring"] = True
    print("GO", flush=True)  # the parent samples the node's CPU time now
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t_start = clock()
    await asyncio.wait_for(asyncio.gather(*(client(c, t_start + duration, max_requests) for c in conns)), duration + 30)
    elapsed = clock() - t_start
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    for c in conns:
        c.close()
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {
        "generator": "python",
        "ok": len(latencies),
        "errors": errors,
        "elapsed": elapsed,
        "rps": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "latency": _summary(latencies),
        "loadgen_cpu": cpu / elapsed if elapsed > 0 else 0.0,
    }


def _percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[int(rank) - 1]


def _summary(values: list[float]) -> dict[str, float]:
    """p50/p99/max in milliseconds of durations in seconds."""
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": _percentile(ordered, 50) * 1000,
        "p99": _percentile(ordered, 99) * 1000,
        "max": (ordered[-1] * 1000) if ordered else float("nan"),
    }


# ---------------------------------------------------------------------------
# Processes: every child goes through one registry that always stops them.
# ---------------------------------------------------------------------------


class Registry:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        if len([p for p in self.procs if p.poll() is None]) >= MAX_NODES_AT_ONCE + 1:
            raise RuntimeError("refusing to start more processes than the benchmark needs")
        proc = subprocess.Popen(args, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, procs: list[subprocess.Popen[bytes]]) -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_GRACE
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for p in procs:
            if p in self.procs:
                self.procs.remove(p)

    def stop_all(self) -> None:
        self.stop(list(self.procs))


class NodeProc:
    def __init__(self, registry: Registry, host: str, port: int, poll_interval: float, workdir: Path,
                 extra_args: list[str]) -> None:
        self.host, self.port, self.workdir = host, port, workdir
        self.log_path = workdir / "twistd.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CODE), env.get("PYTHONPATH")]))
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        args = [
            sys.executable, "-c", TWISTD,
            "-n", "--pidfile=",
            "counterdb", "--port", str(port), "--interface", host, "--poll-interval", repr(poll_interval),
            *extra_args,
        ]
        self._log = open(self.log_path, "wb")
        # A session of its own: a Ctrl-C reaches only us, and we stop the node.
        self.proc = registry.popen(
            args, cwd=workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def wait_ready(self, deadline: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.base} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = await http_once(self.host, self.port, "GET", "/config", timeout=1.0)
                if status == 200:
                    return
            except (OSError, HTTPError, asyncio.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.base} did not answer within {START_DEADLINE:g} s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    def cpu_seconds(self) -> float | None:
        """utime + stime of the node process (Linux /proc), else None."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def close_log(self) -> None:
        self._log.close()


def pick_port(hosts: tuple[str, ...]) -> int:
    """A port free on every one of ``hosts`` (bare-IP configs share one port)."""
    rng = random.Random()
    for _ in range(50):
        port = rng.randrange(20000, 60000)
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("found no free port on loopback")


class Cluster:
    def __init__(self, registry: Registry, root: Path, hosts: tuple[str, ...], poll_interval: float) -> None:
        self.registry = registry
        self.port = pick_port(hosts)
        self.nodes = []
        for host in hosts:
            workdir = root / f"{host}_{self.port}"
            workdir.mkdir()
            self.nodes.append(NodeProc(registry, host, self.port, poll_interval, workdir, NODE_ARGS))

    async def start(self) -> None:
        deadline = time.monotonic() + START_DEADLINE
        await asyncio.gather(*(n.wait_ready(deadline) for n in self.nodes))

    async def configure(self) -> None:
        body = json.dumps({"actors": [n.host for n in self.nodes]}).encode()
        for n in self.nodes:
            status, answer = await http_once(n.host, n.port, "POST", "/config", body)
            if status != 200:
                raise RuntimeError(f"POST /config to {n.base} answered {status}: {answer!r}")

    def stop(self) -> list[str]:
        """Stop the nodes; return problems found in their logs."""
        self.registry.stop([n.proc for n in self.nodes])
        problems = []
        for n in self.nodes:
            text = n.log_text()
            n.close_log()
            for marker in ("Traceback", "Unhandled", "CRITICAL", "#critical]", "#error]", "#warn]"):
                count = text.count(marker)
                if count:
                    problems.append(f"{n.base}: {count} log line(s) with {marker!r} ({n.log_path})")
        return problems


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


def run_python_loadgen(registry: Registry, spec: dict[str, Any], on_start: Any) -> dict[str, Any]:
    args = [sys.executable, str(Path(__file__).resolve()), "--_loadgen", json.dumps(spec)]
    with tempfile.TemporaryFile() as err_file:
        proc = registry.popen(args, stdout=subprocess.PIPE, stderr=err_file, stdin=subprocess.DEVNULL)
        try:
            assert proc.stdout is not None
            # Bounded by the generator's own duration limit; the final stop()
            # kills it if it hangs (e.g. the node stopped answering).
            first = proc.stdout.readline()
            if first.strip() == b"GO":
                on_start()
            out = first + proc.stdout.read()
            proc.wait(timeout=30)
        finally:
            registry.stop([proc])
        if proc.returncode in (130, -signal.SIGINT):
            raise KeyboardInterrupt
        if proc.returncode != 0:
            err_file.seek(0)
            raise RuntimeError(f"load generator failed ({proc.returncode}): {err_file.read().decode(errors='replace')[-2000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def run_wrk(registry: Registry, workdir: Path, spec: dict[str, Any], on_start: Any) -> dict[str, Any]:
    script = workdir / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Length"] = "0"\n')
    url = f"http://{spec['host']}:{spec['port']}{spec['path']}"
    duration = max(1, round(spec["duration"]))
    if spec["warmup"] > 0:  # warm-up run, figures discarded
        warm = ["wrk", "-t1", f"-c{spec['clients']}", f"-d{max(1, round(spec['warmup']))}s", "-s", str(script), url]
        wp = registry.popen(warm, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            wp.wait(timeout=spec["warmup"] + 30)
        finally:
            registry.stop([wp])
    args = ["wrk", "-t1", f"-c{spec['clients']}", f"-d{duration}s", "--latency", "-s", str(script), url]
    on_start()
    proc = registry.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    t0 = time.perf_counter()
    try:
        out, err = proc.communicate(timeout=duration + 30)
    finally:
        registry.stop([proc])
    elapsed = time.perf_counter() - t0
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {text} {err.decode(errors='replace')}")

    def latency(pct: str) -> float:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        return float(m.group(1)) * _WRK_UNITS[m.group(2)] if m else float("nan")

    total = re.search(r"(\d+) requests in", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: (.*)", text)
    errors = {}
    if bad:
        errors["non-2xx"] = int(bad.group(1))
    if sock:
        errors["socket"] = sock.group(1).strip()
    n = int(total.group(1)) if total else 0
    return {
        "generator": "wrk",
        "ok": n - errors.get("non-2xx", 0),
        "errors": errors,
        "elapsed": elapsed,
        "rps": float(rps.group(1)) if rps else float("nan"),
        "latency": {"n": n, "p50": latency("50"), "p99": latency("99"), "max": float("nan")},
        "loadgen_cpu": None,
    }


def load(registry: Registry, root: Path, node: NodeProc, generator: str, **spec: Any) -> dict[str, Any]:
    spec = {"host": node.host, "port": node.port, **spec}
    start: list[tuple[float | None, float]] = []

    def on_start() -> None:
        start.append((node.cpu_seconds(), time.perf_counter()))

    if generator == "wrk":
        result = run_wrk(registry, root, spec, on_start)
    else:
        result = run_python_loadgen(registry, spec, on_start)
    cpu1, t1 = node.cpu_seconds(), time.perf_counter()
    # Share of one core the node used while measured (warm-up excluded).
    cpu0, t0 = start[0] if start else (None, t1)
    result["node_cpu"] = (cpu1 - cpu0) / (t1 - t0) if cpu0 is not None and cpu1 is not None and t1 > t0 else None
    return result


async def get_value(conn: HTTPConnection, name: str) -> int:
    status, body = await conn.request("GET", f"/counter/{name}/value")
    if status != 200:
        raise RuntimeError(f"GET value from {conn.host} answered {status}: {body!r}")
    return int(body)


async def measure_convergence(cluster: Cluster, samples: int) -> dict[str, Any]:
    a, *peers = cluster.nodes
    conn_a = HTTPConnection(a.host, a.port)
    peer_conns = [HTTPConnection(p.host, p.port) for p in peers]
    name = "convergence"
    delays: dict[str, list[float]] = {p.host: [] for p in peers}
    timeouts = 0
    polls = 0
    errors: dict[str, int] = {}
    first_error = ""
    clock = time.perf_counter
    try:
        for i in range(samples + 1):  # sample 0 is a warm-up (opens peer connections)
            status, body = await conn_a.request("POST", f"/counter/{name}")
            acked = clock()
            if status != 200:  # counted and reported: a failing node is a finding, not a crash
                errors[str(status)] = errors.get(str(status), 0) + 1
                first_error = first_error or f"{status} {body[:200].decode(errors='replace')}"
                continue
            total = int(body)
            waiting = dict(zip((p.host for p in peers), peer_conns))
            deadline = acked + CONVERGENCE_DEADLINE
            while waiting:
                for host, conn in list(waiting.items()):
                    seen = await get_value(conn, name)
                    polls += 1
                    if seen >= total:
                        if i > 0:
                            delays[host].append(clock() - acked)
                        del waiting[host]
                if waiting and clock() > deadline:
                    timeouts += len(waiting)
                    break
    finally:
        conn_a.close()
        for c in peer_conns:
            c.close()
    every = [d for ds in delays.values() for d in ds]
    return {
        "samples": samples,
        "timeouts": timeouts,
        "errors": errors,
        "first_error": first_error,
        "reads": polls,
        "all": _summary(every),
        "per_peer": {host: _summary(ds) for host, ds in delays.items()},
    }


async def sync_version(node: NodeProc, epoch: str | None = None) -> tuple[str, int]:
    """The node's change version: it grows by one for every merge that raised
    a counter, so with one counter incremented on one node it counts the
    pushes (and polls) that brought a peer news."""
    if epoch is None:
        status, body = await http_once(node.host, node.port, "GET", "/sync?since=0&limit=1")
        epoch = json.loads(body)["epoch"]
    status, body = await http_once(node.host, node.port, "GET", f"/sync?since={2**62}&epoch={epoch}&limit=1")
    if status != 200:
        raise RuntimeError(f"GET /sync from {node.base} answered {status}: {body!r}")
    answer = json.loads(body)
    if answer["epoch"] != epoch:
        raise RuntimeError(f"{node.base} restarted during the burst")
    return epoch, int(answer["version"])


async def measure_burst(registry: Registry, root: Path, cluster: Cluster, clients: int) -> dict[str, Any]:
    a, *peers = cluster.nodes
    name = "burst"
    before = {p.host: await sync_version(p) for p in peers}
    peer_cpu0 = {p.host: p.cpu_seconds() for p in peers}
    t0 = time.perf_counter()
    result = load(registry, root, a, "python", path=f"/counter/{name}", clients=clients,
                  duration=120.0, max_requests=BURST, warmup=0.0)
    t1 = time.perf_counter()
    peer_cpu = {}
    for p in peers:
        c0, c1 = peer_cpu0[p.host], p.cpu_seconds()
        peer_cpu[p.host] = (c1 - c0) / (t1 - t0) if c0 is not None and c1 is not None else None
    conn_a = HTTPConnection(a.host, a.port)
    try:
        final = await get_value(conn_a, name)
    finally:
        conn_a.close()
    # Wait (bounded) until both peers hold the final value: then every push landed.
    converged = {}
    deadline = time.monotonic() + 10.0
    for p in peers:
        conn = HTTPConnection(p.host, p.port)
        try:
            while (seen := await get_value(conn, name)) < final and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            conn.close()
        converged[p.host] = seen
    pushes = {}
    for p in peers:
        epoch, v0 = before[p.host]
        _, v1 = await sync_version(p, epoch)
        pushes[p.host] = v1 - v0
    result.update(final=final, converged=converged, pushes=pushes, peer_cpu=peer_cpu)
    return result


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import twisted

        tw = twisted.__version__
    except ImportError:
        tw = "not importable here"
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        rev = subprocess.run(["git", "-C", str(CODE), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip() or "?"
        if rev != "?":
            dirty = subprocess.run(["git", "-C", str(CODE), "status", "--porcelain", "--", "counterdb", "twisted"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            rev += " + uncommitted changes in counterdb/" if dirty else " (clean)"
    except (OSError, subprocess.SubprocessError):
        rev = "?"
    if rev == "?" and (CODE / "COMMIT").exists():  # e.g. a `git archive` export
        rev = (CODE / "COMMIT").read_text().strip()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": affinity,
        "cpu": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "twisted": tw,
        "platform": platform.platform(),
        "commit": rev,
        "code": str(CODE),
        "loadavg_before": os.getloadavg()[0],
        "data_fs": filesystem_of(Path(tempfile.gettempdir())),
        "node_args": " ".join(NODE_ARGS) or "(none: node defaults)",
    }


def filesystem_of(path: Path) -> str:
    """'TYPE on DEVICE' of the mount holding ``path`` (the nodes' data dirs)."""
    best = ("", "unknown", "?")
    try:
        target = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best[0]):
                best = (mount, fstype, device)
    except OSError:
        pass
    return f"{best[1]} on {best[2]} ({path})"


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes used since boot (Linux /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def own_cpu_seconds() -> float:
    """CPU seconds of this script and every child it waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


def _no_nan(obj: Any) -> Any:
    """``obj`` with NaN (a figure wrk does not give) as null: strict JSON."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_nan(v) for v in obj]
    return obj


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None or x != x else format(x, spec)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.0f}%"


def _errors(e: dict[str, Any]) -> str:
    return ",".join(f"{k}:{v}" for k, v in e.items()) if e else "0"


def print_report(facts: dict[str, Any], results: dict[str, Any], args: argparse.Namespace) -> None:
    line = "=" * 88
    print(f"\n{line}\ncounterdb cluster benchmark ({'quick' if args.quick else 'full'} run)\n{line}")
    print(f"date {facts['date']}   nproc {facts['nproc']}   {facts['implementation']} {facts['python']}   "
          f"Twisted {facts['twisted']}")
    print(f"code {facts['code']} at {facts['commit']}")
    print(f"node options {facts['node_args']}; data dirs on {facts['data_fs']}")
    print(f"cpu  {facts['cpu']}\nos   {facts['platform']}")
    print("All nodes, load generators and this script share these CPUs; all traffic is loopback.")
    other = facts.get("other_cpu")
    if other is not None:
        print(f"CPU used by processes other than this benchmark during the run: {other:.2f} cores on average"
              + ("   <- contended: figures may be low" if other > 0.25 else ""))
    else:
        print(f"load average (1 min) before the run {facts['loadavg_before']:.2f}, after {facts['loadavg_after']:.2f}"
              + ("   <- other work was running: figures may be low" if facts["loadavg_before"] > 0.5 else ""))
    print("CPU columns: share of one core, from /proc (node) and getrusage (python load generator).")

    print("\n[1] increments/s on one node (unconfigured, one-node cluster); POST /counter/<name>, keep-alive")
    print(f"    {'generator':<9} {'clients':>7} {'requests':>9} {'errors':>7} {'incr/s':>9} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'node CPU':>9} {'loadgen CPU':>12}")
    for r in results.get("single", []):
        print(f"    {r['generator']:<9} {r['clients']:>7} {r['ok']:>9} {_errors(r['errors']):>7} {_fmt(r['rps'], '.0f'):>9} "
              f"{_fmt(r['latency']['p50'], '.2f'):>8} {_fmt(r['latency']['p99'], '.2f'):>8} "
              f"{_pct(r['node_cpu']):>9} {_pct(r['loadgen_cpu']):>12}")

    conv = results.get("convergence")
    if conv:
        print(f"\n[2] ack-to-peer convergence, 3 nodes {', '.join(CLUSTER_HOSTS)}, poll interval "
              f"{args.poll_interval:g} s (default)")
        print("    time from the 200 of POST on A to the first GET /value on a peer showing the increment")
        print(f"    {'peer':<12} {'samples':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        rows = list(conv["per_peer"].items()) + [("both", conv["all"])]
        for host, s in rows:
            print(f"    {host:<12} {s['n']:>7} {_fmt(s['p50'], '.2f'):>8} {_fmt(s['p99'], '.2f'):>8} {_fmt(s['max'], '.2f'):>8}")
        print(f"    timeouts (> {CONVERGENCE_DEADLINE:g} s): {conv['timeouts']}; value reads issued: {conv['reads']}; "
              f"failed increments: {_errors(conv['errors'])}")
        if conv["first_error"]:
            print(f"    first failure: {conv['first_error']}")
        if not conv["timeouts"] and conv["all"]["max"] < args.poll_interval * 1000 / 10:
            print(f"    every sample arrived in under a tenth of the {args.poll_interval:g} s poll interval: "
                  "the push delivered it, not a poll")

    burst = results.get("burst")
    if burst:
        print(f"\n[3] increments/s on node A of a 3-node cluster (pushing to B and C), burst of {BURST:,} increments, "
              f"{burst['clients']} clients, poll interval {args.burst_poll_interval:g} s")
        print(f"    {'requests':>9} {'errors':>7} {'incr/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'A CPU':>6}   "
              f"POST /sync received (per peer)")
        pushes = ", ".join(f"{h}: {n}" for h, n in burst["pushes"].items())
        print(f"    {burst['ok']:>9} {_errors(burst['errors']):>7} {_fmt(burst['rps'], '.0f'):>9} "
              f"{_fmt(burst['latency']['p50'], '.2f'):>8} {_fmt(burst['latency']['p99'], '.2f'):>8} "
              f"{_pct(burst['node_cpu']):>6}   {pushes}")
        conv_ok = all(v == burst["final"] for v in burst["converged"].values())
        cpu = ", ".join(f"{h}: {_pct(c)}" for h, c in burst["peer_cpu"].items())
        print(f"    peers' CPU during the burst (receiving pushes): {cpu}")
        print(f"    final value on A {burst['final']}; peers {burst['converged']} "
              f"({'converged' if conv_ok else 'NOT converged within 10 s'})")
        print("    pushes counted as the growth of each peer's /sync change version (one step per push that")
        print("    raised A's partial; polls are 1/hour here so they add none). The access log omits /sync.")
        single = {r["clients"]: r for r in results.get("single", []) if r["generator"] == "python"}
        if burst["clients"] in single:
            print(f"    same clients on a lone node: {single[burst['clients']]['rps']:.0f} incr/s")

    if results.get("problems"):
        print("\nnode log lines worth a look:")
        for p in results["problems"]:
            print(f"    {p}")
    print(line)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


async def bench(args: argparse.Namespace, registry: Registry, root: Path, results: dict[str, Any]) -> None:
    generators = {
        "auto": ["wrk"] if shutil.which("wrk") else ["python"],
        "python": ["python"],
        "wrk": ["wrk"],
        "both": ["python", "wrk"] if shutil.which("wrk") else ["python"],
    }[args.loadgen]
    if args.loadgen == "wrk" and not shutil.which("wrk"):
        raise SystemExit("--loadgen wrk: wrk is not installed (apt-get install wrk)")
    results["problems"] = []

    # [1] one node
    print(f"[1] one node on {SINGLE_HOST} ...", flush=True)
    single = Cluster(registry, root, (SINGLE_HOST,), args.poll_interval)
    try:
        await single.start()
        results["single"] = []
        for gen in generators:
            for clients in args.clients:
                r = load(registry, root, single.nodes[0], gen, path=f"/counter/single-{clients}", clients=clients,
                         duration=args.duration, max_requests=None, warmup=args.warmup)
                r["clients"] = clients
                results["single"].append(r)
                print(f"    {gen} c={clients}: {r['rps']:.0f} incr/s", flush=True)
    finally:
        results["problems"] += single.stop()

    # [2] convergence, default poll interval
    print(f"[2] 3-node cluster, convergence ({args.samples} samples) ...", flush=True)
    cluster = Cluster(registry, root, CLUSTER_HOSTS, args.poll_interval)
    try:
        await cluster.start()
        await cluster.configure()
        results["convergence"] = await measure_convergence(cluster, args.samples)
    finally:
        results["problems"] += cluster.stop()

    # [3] burst on a cluster whose pollers are idle, so peer versions count pushes
    print(f"[3] 3-node cluster, burst of {BURST} increments ...", flush=True)
    cluster = Cluster(registry, root, CLUSTER_HOSTS, args.burst_poll_interval)
    try:
        await cluster.start()
        await cluster.configure()
        # Let the links' first exchange (initial poll and push) finish first.
        warm = await measure_convergence(cluster, 3)
        if warm["timeouts"] or warm["errors"]:
            raise RuntimeError("the burst cluster did not converge on its warm-up increments")
        burst = await measure_burst(registry, root, cluster, args.burst_clients)
        burst["clients"] = args.burst_clients
        results["burst"] = burst
    finally:
        results["problems"] += cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (about 20 s)")
    parser.add_argument("--loadgen", choices=["auto", "python", "wrk", "both"], default="auto",
                        help="single-node load generator: auto = wrk if installed, else python (default)")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32],
                        help="comma-separated concurrent client counts for [1] (default 1,8,32)")
    parser.add_argument("--duration", type=float, help="seconds per single-node run (default 5, quick 2)")
    parser.add_argument("--samples", type=int, help="convergence samples (default 500, quick 100)")
    parser.add_argument("--burst-clients", type=int, default=32, help="concurrent clients of the burst (default 32)")
    parser.add_argument("--code", type=Path, default=REPO,
                        help="directory the nodes import counterdb from (PYTHONPATH); default: this checkout")
    parser.add_argument("--durability", choices=["full", "fast"],
                        help="passed to every node (default: not passed, the node's own default)")
    parser.add_argument("--json", type=Path, help="also write the raw results to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the nodes' working dirs and twistd logs")
    parser.add_argument("--_loadgen", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._loadgen:
        try:
            print(json.dumps(asyncio.run(_loadgen(json.loads(args._loadgen)))))
        except KeyboardInterrupt:
            return 130  # Ctrl-C: the parent reports it and stops the nodes
        return 0

    global CODE
    CODE = args.code.resolve()
    if args.durability:
        NODE_ARGS[:] = ["--durability", args.durability]
    if not (CODE / "counterdb" / "__init__.py").exists():
        parser.error(f"--code {args.code}: no counterdb package there")
    if args.duration is None:
        args.duration = 2.0 if args.quick else 5.0
    if args.samples is None:
        args.samples = 100 if args.quick else 500
    args.warmup = 0.5 if args.quick else 1.0
    args.poll_interval = 1.0  # the node's default
    args.burst_poll_interval = 3600.0
    if not 1 <= args.samples <= 10_000 or not 0 < args.duration <= 60 or not all(1 <= c <= 256 for c in args.clients):
        parser.error("bounds: 1-10000 samples, 0-60 s duration, 1-256 clients")
    if not 1 <= args.burst_clients <= 256:
        parser.error("bounds: 1-256 burst clients")

    facts = machine_facts()
    print(f"counterdb benchmark: nproc {facts['nproc']}, Python {facts['python']}, code {CODE} at {facts['commit']}",
          flush=True)
    registry = Registry()
    root = Path(tempfile.mkdtemp(prefix="counterdb-bench-"))
    results: dict[str, Any] = {}

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    started = time.monotonic()
    busy0, own0 = machine_busy_seconds(), own_cpu_seconds()
    try:
        asyncio.run(bench(args, registry, root, results))
    except KeyboardInterrupt:
        print("\ninterrupted; stopping nodes", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        registry.stop_all()
        if args.keep_logs or results.get("problems"):
            print(f"node logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    facts["loadavg_after"] = os.getloadavg()[0]
    busy1, own1 = machine_busy_seconds(), own_cpu_seconds()
    if busy0 is not None and busy1 is not None:
        facts["other_cpu"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / (time.monotonic() - started)
    results["machine"] = facts
    results["wall_seconds"] = time.monotonic() - started
    print_report(facts, results, args)
    print(f"wall time {results['wall_seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(_no_nan(results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
