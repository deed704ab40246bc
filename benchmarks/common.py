"""
What the benchmark scripts share: reading a node's ``/status``, timing
CPU, and driving load with ``wrk``.

Every figure comes from a real ``twistd counterdb`` node started by
:class:`counterdb.localcluster.LocalCluster`; this module only measures.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import resource
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's counterdb
from counterdb.localcluster import LocalCluster

__all__ = ["LocalCluster"]

#: Latency percentiles asked of wrk: enough points for a CDF plot.
CDF_POINTS = (1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9, 99.99)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * p // 100) - 1)] if ordered else float("nan")


def status(url: str) -> dict:
    with urllib.request.urlopen(url + "/status", timeout=10) as answer:
        return json.load(answer)


def value(url: str, name: str) -> int:
    with urllib.request.urlopen(f"{url}/counter/{name}/value", timeout=10) as answer:
        return int(answer.read())


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of process ``pid`` (all its
    threads) and of its live children (a node's store writer)."""
    return sum(_own_cpu_seconds(p) for p in (pid, *children(pid)))


def rss_mib(pid: int) -> float:
    """A node's memory: the resident size of process ``pid`` plus what its
    live children (the store writer) hold of their own. A child's pages
    shared with the node are counted once, in the node's resident size."""
    own = _status_kib(pid, "VmRSS")
    private = sum(_private_kib(child) for child in children(pid))
    return (own + private) / 1024


def children(pid: int) -> list[int]:
    """The live descendants of ``pid`` (a node's store spawner, and the
    writer it forked)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    family: set[int] = set()
    grown = {pid}
    while grown:
        grown = {child for child, parent in parents.items() if parent in grown} - family
        family |= grown
    return sorted(family)


def _own_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0  # a child that exited meanwhile
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return float("nan")


def _private_kib(pid: int) -> int:
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0
    return sum(int(line.split()[1]) for line in lines if line.startswith(("Private_Clean:", "Private_Dirty:")))


def node_pids(cluster: LocalCluster) -> dict[str, int]:
    return {s.name: s.pid for s in cluster.status()}


def connect(url: str, timeout: float = 10) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn.request(method, path, body=body)
    answer = conn.getresponse()
    return answer.status, answer.read()


def cpu_used() -> tuple[float, float]:
    """CPU seconds since boot of the whole machine (/proc/stat), and of this
    script with its children that have ended (the nodes, wrk)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    machine = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = sum(
        r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
    return machine, own


def partial(i: int, k: int) -> int:
    """The partial of replica number ``k`` in counter number ``i`` of a
    table made by :func:`fill`."""
    return 1 + (i * 31 + k * 17) % 1000


def replica_id(db_path: Path) -> str:
    """The replica id a stopped node's database holds."""
    db = sqlite3.connect(db_path)
    try:
        return db.execute("SELECT value FROM meta WHERE key = 'replica_id'").fetchone()[0]
    finally:
        db.close()


def fill(db_path: Path, counters: int, replicas: list[str]) -> None:
    """Add counters ``counter-0`` to ``counter-<counters - 1>``, each with a
    partial (:func:`partial`) for every id in ``replicas``, to a stopped
    node's database, and leave it as a clean stop does."""
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO partials (counter, replica, count) VALUES (?, ?, ?)",
            ((f"counter-{i}", r, partial(i, k)) for i in range(counters) for k, r in enumerate(replicas)),
        )
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        db.close()


def log_problems(cluster: LocalCluster) -> list[str]:
    found = []
    for node in cluster.nodes:
        text = cluster.log_path(node).read_text(errors="replace")
        found += [f"{node}: {text.count(m)} x {m!r}" for m in ("Traceback", "Unhandled") if m in text]
    return found


def _wrk_script(method: str, body: str | None, headers: dict[str, str]) -> str:
    lines = [f"wrk.method = {json.dumps(method)}"]
    if body is not None:
        lines.append(f"wrk.body = {json.dumps(body)}")
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    points = ", ".join(str(p) for p in CDF_POINTS)
    lines.append(
        "done = function(summary, latency, requests)\n"
        f"  for _, p in ipairs({{{points}}}) do\n"
        '    io.write(string.format("CDF %g %d\\n", p, latency:percentile(p)))\n'
        "  end\n"
        '  io.write(string.format("CDF 100 %d\\n", latency.max))\n'
        "end"
    )
    return "\n".join(lines) + "\n"


def wrk(
    url: str,
    clients: int,
    seconds: float,
    method: str = "POST",
    body: str | None = None,
    headers: dict[str, str] | None = None,
    threads: int = 1,
) -> dict:
    """``wrk`` against ``url`` for ``seconds``: requests/s, errors, p50/p99
    in ms and ``cdf`` (percentile -> ms at :data:`CDF_POINTS`)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(_wrk_script(method, body, headers or {}))
        script.flush()
        out = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{clients}", f"-d{max(1, round(seconds))}s", "-s", script.name, url],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=True,
        ).stdout
    cdf = {float(p): int(us) / 1000 for p, us in re.findall(r"^CDF ([\d.]+) (\d+)$", out, re.M)}
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    errors: dict[str, object] = {"non-2xx": int(bad.group(1))} if bad else {}
    if sock:
        errors["socket"] = sock.group(1).strip()
    return {
        "requests": total,
        "ok": total - int(errors.get("non-2xx", 0)),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "errors": errors,
        "p50": cdf.get(50.0, float("nan")),
        "p99": cdf.get(99.0, float("nan")),
        "cdf": cdf,
    }


def visibility(
    cluster: LocalCluster,
    samples: int | None = None,
    seconds: float | None = None,
    counter: str = "visibility",
    timeout: float = 5.0,
    gap: float = 0.0,
) -> dict:
    """Ack-to-peer visibility: increment ``counter`` on the first node (one
    keep-alive ``http.client`` connection) and, from the 200 on, read its
    value on every other node in turn (one connection each) until each
    shows the acknowledged value; a sample is (first answer showing it) -
    (ack), per peer, so it includes one read round trip. Runs ``samples``
    increments, or as many as fit in ``seconds``, waiting ``gap`` s after
    each (a gap longer than the nodes' ``--min-push-interval`` makes every
    increment a lone one); the first one (which opens the connections) is
    not counted. Answers p50/p99/max in ms, the
    sorted ``delays`` and ``timeouts`` (peers that did not show it within
    ``timeout`` s)."""
    a, *peers = cluster.nodes
    conn_a = connect(cluster.url(a))
    conns = {p: connect(cluster.url(p)) for p in peers}
    delays: dict[str, list[float]] = {p: [] for p in peers}
    timeouts, i = 0, 0
    stop_at = time.monotonic() + seconds if seconds is not None else float("inf")
    try:
        while (samples is None or i <= samples) and (i == 0 or time.monotonic() < stop_at):
            code, body = request(conn_a, "POST", f"/counter/{counter}")
            acked = time.perf_counter()
            assert code == 200, (code, body)
            waiting = set(peers)
            while waiting and time.perf_counter() < acked + timeout:
                for p in sorted(waiting):
                    if int(request(conns[p], "GET", f"/counter/{counter}/value")[1]) >= int(body):
                        waiting.discard(p)
                        if i:
                            delays[p].append((time.perf_counter() - acked) * 1000)
            timeouts += len(waiting)
            i += 1
            if gap:
                time.sleep(gap)
    finally:
        for conn in (conn_a, *conns.values()):
            conn.close()
    every = sorted(d for ds in delays.values() for d in ds)
    return {
        "n": len(every),
        "increments": i - 1,
        "p50": percentile(every, 50),
        "p99": percentile(every, 99),
        "max": max(every, default=float("nan")),
        "timeouts": timeouts,
        "delays": [round(d, 3) for d in every],
    }


def statuses(cluster: LocalCluster) -> dict[str, dict]:
    """Every node's ``/status``, by node name."""
    return {node: status(cluster.url(node)) for node in cluster.nodes}


def link_totals(before: dict, after: dict) -> dict[str, int]:
    """What one node's peer links did between two ``/status`` answers:
    each per-peer ``stats`` field summed over its peers (links that exist
    in both)."""
    totals: dict[str, int] = {}
    for peer, now in after["peers"].items():
        then = before["peers"].get(peer)
        if then is not None:
            for key, n in now["stats"].items():
                totals[key] = totals.get(key, 0) + n - then["stats"][key]
    return totals


def sync_poll(conn: http.client.HTTPConnection, since: int, epoch: str | None) -> dict:
    """One ``GET /sync`` as a peer's poll asks it (``since`` of ``epoch``):
    the answer's ``body`` bytes, its ``head`` bytes (status line and
    headers) with those of this request, and the ``version`` and ``epoch``
    to ask from next. ``since=2**62`` with the node's epoch (``/status``)
    reads the current version without any counters."""
    path = f"/sync?since={since}" + (f"&epoch={urllib.parse.quote(epoch)}" if epoch else "")
    conn.putrequest("GET", path)
    conn.endheaders()
    answer = conn.getresponse()
    body = answer.read()
    if answer.status != 200:
        raise RuntimeError(f"GET {path}: {answer.status} {body[:200]!r}")
    sent = len(f"GET {path} HTTP/1.1\r\nHost: {conn.host}:{conn.port}\r\nAccept-Encoding: identity\r\n\r\n")
    head = len(f"HTTP/1.1 {answer.status} {answer.reason}\r\n") + len(answer.headers.as_bytes()) + sent
    decoded = json.loads(body)
    return {"body": len(body), "head": head, "version": decoded["version"], "epoch": decoded["epoch"]}


class PollSampler:
    """Polls every node's ``GET /sync`` once per ``interval`` from a
    thread, as a peer would (from the version of its last answer), and
    keeps each answer's size: what a real poll of that node carried at the
    time. ``with PollSampler(urls) as s:`` ... ``s.mean_body(url)``."""

    def __init__(self, urls: list[str], interval: float = 1.0) -> None:
        self.urls, self.interval = urls, interval
        self.bodies: dict[str, list[int]] = {u: [] for u in urls}
        self.heads: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PollSampler:
        self._conns = {u: connect(u) for u in self.urls}
        self._since = {}
        for u in self.urls:
            first = sync_poll(self._conns[u], 2**62, status(u)["epoch"])
            self._since[u] = (first["version"], first["epoch"])
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for u in self.urls:
                answer = sync_poll(self._conns[u], *self._since[u])
                self._since[u] = (answer["version"], answer["epoch"])
                self.bodies[u].append(answer["body"])
                self.heads.append(answer["head"])

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)
        for conn in self._conns.values():
            conn.close()

    def mean_body(self, url: str) -> float:
        sizes = self.bodies[url]
        return sum(sizes) / len(sizes) if sizes else float("nan")

    def mean_head(self) -> float:
        return sum(self.heads) / len(self.heads) if self.heads else float("nan")
